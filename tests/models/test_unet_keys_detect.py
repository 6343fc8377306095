"""Key mapping (diffusers <-> original) and architecture detection for the U-Net."""

from __future__ import annotations

import pytest
import torch

from noisecraft.checkpoints.unet_detect import (
    UNET_PREFIX,
    check_unet_state_dict,
    unet_config_from_state_dict,
)
from noisecraft.checkpoints.unet_keys import (
    unet_kohya_module_map,
    unet_module_map,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from noisecraft.models.unet import UNetModel
from noisecraft.models.unet_configs import UNET_PRESETS


def _meta_state_dict(name: str, prefix: str = "") -> dict[str, torch.Tensor]:
    sd = UNetModel(UNET_PRESETS[name], device="meta").state_dict()
    return {prefix + k: v for k, v in sd.items()}


def _param_modules(model: torch.nn.Module) -> set[str]:
    return {k.rpartition(".")[0] for k in model.state_dict()}


@pytest.mark.parametrize("name", list(UNET_PRESETS))
def test_every_preset_is_detected_back(name):
    assert unet_config_from_state_dict(_meta_state_dict(name, UNET_PREFIX)) == UNET_PRESETS[name]


@pytest.mark.parametrize("name", list(UNET_PRESETS))
def test_module_map_covers_exactly_the_model_modules(name):
    mapping = unet_module_map(UNET_PRESETS[name])
    assert set(mapping.values()) == _param_modules(UNetModel(UNET_PRESETS[name], device="meta"))
    assert len(set(mapping.values())) == len(mapping)  # one-to-one


@pytest.mark.parametrize("name", ["sd15", "sd2", "sdxl_base", "sdxl_refiner"])
def test_module_map_diffusers_side_matches_diffusers_model(name):
    diffusers = pytest.importorskip("diffusers")
    from noisecraft.checkpoints.unet_keys import unet_config_to_diffusers

    with torch.device("meta"):
        ref = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(UNET_PRESETS[name]))
    assert set(unet_module_map(UNET_PRESETS[name])) == _param_modules(ref)


def test_known_sd15_names():
    m = unet_module_map(UNET_PRESETS["sd15"])
    assert m["down_blocks.0.resnets.1.conv1"] == "input_blocks.2.0.in_layers.2"
    assert m["down_blocks.0.downsamplers.0.conv"] == "input_blocks.3.0.op"
    assert m["down_blocks.1.resnets.0.conv_shortcut"] == "input_blocks.4.0.skip_connection"
    assert m["up_blocks.0.upsamplers.0.conv"] == "output_blocks.2.1.conv"
    assert m["up_blocks.1.upsamplers.0.conv"] == "output_blocks.5.2.conv"
    assert m["up_blocks.3.attentions.2.proj_out"] == "output_blocks.11.1.proj_out"
    assert m["mid_block.attentions.0.transformer_blocks.0.ff.net.2"] == (
        "middle_block.1.transformer_blocks.0.ff.net.2")
    kohya = unet_kohya_module_map(UNET_PRESETS["sd15"])
    assert kohya["lora_unet_down_blocks_0_attentions_0_proj_in"] == "input_blocks.1.1.proj_in"
    assert kohya["lora_unet_input_blocks_1_1_proj_in"] == "input_blocks.1.1.proj_in"


def test_known_sdxl_names():
    m = unet_module_map(UNET_PRESETS["sdxl_base"])
    assert m["add_embedding.linear_1"] == "label_emb.0.0"
    assert m["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k"] == (
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k")
    assert m["up_blocks.2.resnets.2.conv_shortcut"] == "output_blocks.8.0.skip_connection"


def test_proj_weights_are_reshaped_between_conv_and_linear_layouts():
    config = UNET_PRESETS["tiny_sd2"]  # linear proj_in
    key = "down_blocks.0.attentions.0.proj_in.weight"
    conv_style = {key: torch.randn(64, 64, 1, 1)}
    out = unet_state_dict_from_diffusers(conv_style, config)
    assert out["input_blocks.1.1.proj_in.weight"].shape == (64, 64)
    config1 = UNET_PRESETS["tiny_sd15"]  # conv proj_in
    linear_style = {"input_blocks.1.1.proj_out.weight": torch.randn(32, 32)}
    back = unet_state_dict_to_diffusers(linear_style, config1)
    assert back[key.replace("proj_in", "proj_out")].shape == (32, 32, 1, 1)


def test_unknown_keys_are_named_in_conversion_errors():
    config = UNET_PRESETS["tiny_sd15"]
    with pytest.raises(ValueError, match="down_blocks.9.resnets.0.conv1.weight"):
        unet_state_dict_from_diffusers({"down_blocks.9.resnets.0.conv1.weight": torch.zeros(1)},
                                       config)
    with pytest.raises(ValueError, match="model.diffusion_model.out.2.weight"):
        unet_state_dict_to_diffusers({"model.diffusion_model.out.2.weight": torch.zeros(1)},
                                     config)


def test_missing_key_is_named():
    sd = _meta_state_dict("tiny_sdxl_base", UNET_PREFIX)
    del sd[UNET_PREFIX + "output_blocks.3.1.transformer_blocks.0.attn1.to_q.weight"]
    with pytest.raises(ValueError, match=r"1 missing key\(s\): model\.diffusion_model\."
                                         r"output_blocks\.3\.1\.transformer_blocks\.0\.attn1"):
        unet_config_from_state_dict(sd)


def test_alien_key_is_named():
    sd = _meta_state_dict("tiny_sd15", UNET_PREFIX)
    sd[UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_z.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected key\(s\): .*attn1\.to_z\.weight"):
        unet_config_from_state_dict(sd)


def test_misshaped_tensor_is_named():
    sd = _meta_state_dict("tiny_sd15")
    sd["time_embed.2.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"time_embed\.2\.weight \(3, 3\) \(expected \(128, 128\)"):
        check_unet_state_dict(sd, UNET_PRESETS["tiny_sd15"])


def test_wrong_prefix_and_non_unet_dicts_are_explained():
    sd = _meta_state_dict("tiny_sd15", UNET_PREFIX)
    with pytest.raises(ValueError, match="no keys start with 'unet.'.*'model'"):
        unet_config_from_state_dict(sd, prefix="unet.")
    with pytest.raises(ValueError, match="missing 'input_blocks.0.0.weight'"):
        unet_config_from_state_dict({"conv_in.weight": torch.zeros(32, 4, 3, 3)}, prefix="")
    broken = _meta_state_dict("tiny_sd15")
    for k in [k for k in broken if k.startswith("input_blocks.2.")]:
        del broken[k]
    broken["input_blocks.2.0.foo.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="input_blocks.2 is neither a ResBlock nor a Downsample"):
        unet_config_from_state_dict(broken, prefix="")
