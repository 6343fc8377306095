"""OpenCLIP <-> transformers key conversion, checked against real key names and diffusers."""

import pytest
import torch

from noisecraft.checkpoints.text_keys import (
    diffusers_to_original,
    hf_to_openclip,
    openclip_to_hf,
    original_to_diffusers,
    text_state_dict_from_checkpoint,
)

WIDTH, LAYERS, MLP, PROJ = 8, 2, 16, 8


def openclip_text_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """An OpenCLIP text tower's state dict with the exact key names of SD2/SDXL files."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "token_embedding.weight": r(49408, WIDTH),
        "positional_embedding": r(77, WIDTH),
        "ln_final.weight": r(WIDTH),
        "ln_final.bias": r(WIDTH),
        "text_projection": r(WIDTH, PROJ),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(LAYERS):
        p = f"transformer.resblocks.{i}."
        sd |= {
            p + "ln_1.weight": r(WIDTH), p + "ln_1.bias": r(WIDTH),
            p + "attn.in_proj_weight": r(3 * WIDTH, WIDTH), p + "attn.in_proj_bias": r(3 * WIDTH),
            p + "attn.out_proj.weight": r(WIDTH, WIDTH), p + "attn.out_proj.bias": r(WIDTH),
            p + "ln_2.weight": r(WIDTH), p + "ln_2.bias": r(WIDTH),
            p + "mlp.c_fc.weight": r(MLP, WIDTH), p + "mlp.c_fc.bias": r(MLP),
            p + "mlp.c_proj.weight": r(WIDTH, MLP), p + "mlp.c_proj.bias": r(WIDTH),
        }
    return sd


def test_split_and_transpose():
    oc = openclip_text_state_dict()
    hf = openclip_to_hf(oc)
    in_proj = oc["transformer.resblocks.1.attn.in_proj_weight"]
    layer = "text_model.encoder.layers.1.self_attn."
    assert torch.equal(hf[layer + "q_proj.weight"], in_proj[:WIDTH])
    assert torch.equal(hf[layer + "k_proj.weight"], in_proj[WIDTH : 2 * WIDTH])
    assert torch.equal(hf[layer + "v_proj.weight"], in_proj[2 * WIDTH :])
    assert torch.equal(hf[layer + "v_proj.bias"],
                       oc["transformer.resblocks.1.attn.in_proj_bias"][2 * WIDTH :])
    assert torch.equal(hf["text_projection.weight"], oc["text_projection"].T)
    assert hf["text_projection.weight"].is_contiguous()
    assert torch.equal(hf["text_model.encoder.layers.0.mlp.fc2.bias"],
                       oc["transformer.resblocks.0.mlp.c_proj.bias"])
    assert "logit_scale" not in hf and len(hf) == len(oc) - 1 + 4 * LAYERS


def test_round_trip_exact():
    oc = openclip_text_state_dict()
    back = hf_to_openclip(openclip_to_hf(oc))
    assert set(back) == set(oc) - {"logit_scale"}
    assert all(torch.equal(back[k], oc[k]) for k in back)
    hf = openclip_to_hf(oc)
    again = openclip_to_hf(hf_to_openclip(hf))
    assert set(again) == set(hf) and all(torch.equal(again[k], hf[k]) for k in hf)


def test_matches_diffusers_single_file_converter():
    """diffusers' own conversion of SDXL's bigG gives the same tensors under the same names.
    (For SD2 diffusers drops text_projection and the last layer: its encoder keeps 23 layers.)"""
    single_file_utils = pytest.importorskip("diffusers.loaders.single_file_utils")
    transformers = pytest.importorskip("transformers")
    oc = openclip_text_state_dict(1)
    prefix = "conditioner.embedders.1.model."
    checkpoint = {prefix + k: v for k, v in oc.items()}
    config = transformers.CLIPTextConfig(hidden_size=WIDTH, projection_dim=PROJ)
    model = transformers.CLIPTextModelWithProjection(config)
    theirs = single_file_utils.convert_open_clip_checkpoint(model, checkpoint, prefix)
    ours = openclip_to_hf(oc)
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_unknown_and_incomplete_keys_explain():
    with pytest.raises(KeyError, match="1 OpenCLIP key.*visual.proj.*allowed: token_embedding"):
        openclip_to_hf({"visual.proj": torch.zeros(1)})
    with pytest.raises(KeyError, match="transformers CLIP key.*text_model.pooler"):
        hf_to_openclip({"text_model.pooler.weight": torch.zeros(1)})
    with pytest.raises(KeyError, match=r"resblocks.0.attn.in_proj_weight: need q_proj.*\['q'\]"):
        hf_to_openclip({"text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2)})


def test_diffusers_folder_round_trip():
    oc = openclip_text_state_dict(2)
    hf = openclip_to_hf(oc)  # what text_encoder_2/model.safetensors holds
    original = diffusers_to_original(hf, "openclip")
    assert "model.transformer.resblocks.0.attn.in_proj_weight" in original
    back = original_to_diffusers(original, "openclip")
    assert set(back) == set(hf) and all(torch.equal(back[k], hf[k]) for k in hf)
    clip_l = {"text_model.final_layer_norm.weight": torch.ones(3),
              "text_model.embeddings.position_ids": torch.arange(77)[None]}
    assert list(diffusers_to_original(clip_l, "hf")) == [
        "transformer.text_model.final_layer_norm.weight"
    ]
    assert list(original_to_diffusers({"transformer.x": torch.ones(1)}, "hf")) == ["x"]
    with pytest.raises(ValueError, match="layout 'ldm'; allowed: hf, openclip"):
        diffusers_to_original(hf, "ldm")
    with pytest.raises(KeyError, match="keys start with 'model.'"):
        original_to_diffusers({"transformer.x": torch.ones(1)}, "openclip")


def test_text_part_of_checkpoint():
    sd = {
        "conditioner.embedders.1.model.ln_final.weight": torch.ones(1),
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(1),
        "model.diffusion_model.out.0.weight": torch.ones(1),
    }
    assert set(text_state_dict_from_checkpoint(sd, "sdxl")) == {
        "embedders.1.model.ln_final.weight",
        "embedders.0.transformer.text_model.final_layer_norm.weight",
    }
    with pytest.raises(KeyError, match="no key starts with 'cond_stage_model.'"):
        text_state_dict_from_checkpoint(sd, "sd1")
    with pytest.raises(ValueError, match="unknown text arrangement 'sd3'"):
        text_state_dict_from_checkpoint(sd, "sd3")
