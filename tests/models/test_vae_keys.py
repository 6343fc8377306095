"""VAE key mapping (ldm <-> diffusers), config detection, and files in the real layouts."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from noisecraft.checkpoints.vae_keys import (
    strip_vae_prefix,
    vae_config_from_diffusers,
    vae_config_from_state_dict,
    vae_config_to_diffusers,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)
from noisecraft.models.vae import SD_VAE, TINY_VAE, AutoencoderKL, VAEConfig

# Facts from diffusers' single-file converter (convert_ldm_vae_checkpoint), for a 4-level VAE.
KNOWN_PAIRS = {
    "encoder.norm_out.weight": "encoder.conv_norm_out.weight",
    "encoder.down.1.block.0.nin_shortcut.bias": (
        "encoder.down_blocks.1.resnets.0.conv_shortcut.bias"
    ),
    "encoder.down.2.downsample.conv.weight": "encoder.down_blocks.2.downsamplers.0.conv.weight",
    "encoder.mid.block_2.norm2.weight": "encoder.mid_block.resnets.1.norm2.weight",
    "encoder.mid.attn_1.norm.bias": "encoder.mid_block.attentions.0.group_norm.bias",
    "decoder.mid.attn_1.proj_out.weight": "decoder.mid_block.attentions.0.to_out.0.weight",
    "decoder.up.3.block.0.conv1.weight": "decoder.up_blocks.0.resnets.0.conv1.weight",
    "decoder.up.3.upsample.conv.bias": "decoder.up_blocks.0.upsamplers.0.conv.bias",
    "decoder.up.0.block.2.conv2.weight": "decoder.up_blocks.3.resnets.2.conv2.weight",
    "decoder.up.1.block.0.nin_shortcut.weight": (
        "decoder.up_blocks.2.resnets.0.conv_shortcut.weight"
    ),
    "post_quant_conv.bias": "post_quant_conv.bias",
}


@pytest.fixture(scope="module")
def sd_meta():
    return AutoencoderKL(SD_VAE, device="meta").state_dict()


def test_known_key_pairs_and_attention_reshape(sd_meta):
    # a small tensor holding its key's index stands in for each weight
    tagged = {k: torch.full((2, 2, 1, 1) if v.ndim == 4 else (2,), float(i))
              for i, (k, v) in enumerate(sd_meta.items())}  # fmt: skip
    index = {k: i for i, k in enumerate(sd_meta)}
    diff = vae_state_dict_to_diffusers(tagged)
    assert len(diff) == len(sd_meta)
    for ldm_key, diff_key in KNOWN_PAIRS.items():
        assert diff[diff_key].flatten()[0].item() == index[ldm_key], (ldm_key, diff_key)
    assert diff["encoder.mid_block.attentions.0.to_q.weight"].shape == (2, 2)
    assert diff["encoder.mid_block.resnets.0.conv1.weight"].shape == (2, 2, 1, 1)
    back = vae_state_dict_from_diffusers(diff)
    assert {k: v.shape for k, v in back.items()} == {k: v.shape for k, v in tagged.items()}


def test_round_trip_is_identity_on_values():
    sd = AutoencoderKL(TINY_VAE).state_dict()
    back = vae_state_dict_from_diffusers(vae_state_dict_to_diffusers(sd))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_pre_0_14_diffusers_attention_names_are_read():
    sd = AutoencoderKL(TINY_VAE).state_dict()
    diff = vae_state_dict_to_diffusers(sd)
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in diff.items():
        for new, old in old_names.items():
            k = k.replace(f"attentions.0.{new}.", f"attentions.0.{old}.")
        legacy[k] = v
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in legacy
    back = vae_state_dict_from_diffusers(legacy)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_unknown_keys_are_reported_with_the_allowed_names():
    sd = dict(AutoencoderKL(TINY_VAE, device="meta").state_dict())
    sd["encoder.mid.attn_1.query.weight"] = sd.pop("encoder.mid.attn_1.q.weight")
    with pytest.raises(KeyError, match=r"'encoder\.mid\.attn_1\.query\.weight'.*known modules"):
        vae_state_dict_to_diffusers(sd)


def test_config_from_shapes(sd_meta):
    assert vae_config_from_state_dict(sd_meta) == SD_VAE
    three = VAEConfig(ch=32, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=8, embed_dim=8)
    assert vae_config_from_state_dict(AutoencoderKL(three, device="meta").state_dict()) == three
    no_quant = VAEConfig(ch=32, ch_mult=(1, 1), use_quant_conv=False, mid_attention=False)
    sd = AutoencoderKL(no_quant, device="meta").state_dict()
    assert vae_config_from_state_dict(sd) == no_quant
    with pytest.raises(KeyError, match="encoder.conv_in.weight"):
        vae_config_from_state_dict({"model.diffusion_model.x": torch.zeros(1)})
    with pytest.raises(ValueError, match="divisible by norm_groups=32"):
        narrow = VAEConfig(ch=8, ch_mult=(1, 2), norm_groups=8)
        vae_config_from_state_dict(AutoencoderKL(narrow, device="meta").state_dict())
    narrow_sd = AutoencoderKL(narrow, device="meta").state_dict()
    assert vae_config_from_state_dict(narrow_sd, norm_groups=8) == narrow


def test_diffusers_config_both_ways():
    # The published config.json of stabilityai/sd-vae-ft-mse (architecture fields).
    sd_vae_json = {
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 256,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    }
    assert vae_config_from_diffusers(sd_vae_json) == SD_VAE
    kwargs = vae_config_to_diffusers(SD_VAE, scaling_factor=0.18215)
    assert kwargs["block_out_channels"] == (128, 256, 512, 512)
    assert kwargs["layers_per_block"] == 2 and kwargs["scaling_factor"] == 0.18215
    assert vae_config_from_diffusers(kwargs) == SD_VAE
    with pytest.raises(ValueError, match="embed_dim == z_channels"):
        vae_config_to_diffusers(VAEConfig(embed_dim=8))


def test_single_file_checkpoint_layout_loads(tmp_path):
    """A checkpoint with first_stage_model.* keys next to other models' keys loads exactly."""
    src = AutoencoderKL(TINY_VAE).eval()
    tensors = {f"first_stage_model.{k}": v for k, v in src.state_dict().items()}
    tensors["model.diffusion_model.out.2.bias"] = torch.zeros(4)
    tensors["cond_stage_model.transformer.text_model.final_layer_norm.bias"] = torch.zeros(8)
    path = tmp_path / "tiny.safetensors"
    save_file(tensors, path)
    sd = strip_vae_prefix(load_file(path))
    assert all(k.startswith(("encoder.", "decoder.", "quant_conv", "post_quant_conv")) for k in sd)
    model = AutoencoderKL(vae_config_from_state_dict(sd, resolution=32), device="meta")
    model.load_state_dict(sd, strict=True, assign=True)
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(model.eval().decode(z), src.decode(z))
    with pytest.raises(KeyError, match="no VAE found"):
        strip_vae_prefix({"model.diffusion_model.out.2.bias": torch.zeros(4)})
