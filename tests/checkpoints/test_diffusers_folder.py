"""Formats tier: a single file and a diffusers folder of the same weights load to identical
numbers, and the folder's U-Net matches diffusers' own UNet2DConditionModel."""

from __future__ import annotations

import json

import pytest
import torch

from noisecraft.checkpoints import load_diffusers_folder, load_model
from noisecraft.checkpoints.files import CheckpointError
from tests.fixtures.checkpoints import (
    tiny_spec,
    unet_inputs,
    write_diffusers_folder,
    write_single_file,
)


def outputs(bundle):
    """U-Net output, VAE decode and text-encoder output of a bundle on fixed inputs."""
    x, t, ctx, y, _ = unet_inputs(bundle.unet.config)
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        emb = bundle.text_encoder.encode_prompts(["a red cube (on a table:1.2)", ""])
        return {"unet": bundle.unet(x, t, ctx, y), "vae": bundle.vae.decode(z),
                "context": emb.context, "pooled": emb.pooled}


@pytest.fixture(scope="module", params=("sd1", "sd1-inpaint", "sd2", "sdxl", "sdxl-refiner"))
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    single = write_single_file(root / "model.safetensors", request.param, seed=5)
    folder = write_diffusers_folder(root / "folder", request.param, seed=5)
    return request.param, load_model(single), load_model(folder), folder


def test_single_file_and_folder_give_identical_numbers(pair):
    name, single, folder, _ = pair
    assert single.family == folder.family
    assert single.inpaint == folder.inpaint == name.endswith("inpaint")
    for part in ("unet", "vae", "text_encoder"):  # the same weights, bit for bit
        sa, sb = getattr(single, part).state_dict(), getattr(folder, part).state_dict()
        # SD2's single file keeps the text encoder's last layer (clip skip 2 leaves it
        # unused); diffusers' folder drops it. Every tensor the folder has must match.
        assert sb.keys() <= sa.keys() if part == "text_encoder" else sa.keys() == sb.keys(), part
        assert all(torch.equal(sa[k], sb[k]) for k in sb), part
    # The outputs agree to float rounding only: oneDNN/MKL may pick different kernels for
    # tensors of different memory layout (seen on one CI CPU: 3e-7 apart in the U-Net).
    a, b = outputs(single), outputs(folder)
    for key in ("unet", "vae", "context"):
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-5, msg=key)
    if tiny_spec(name).arrangement != "sd2":  # diffusers drops SD2's projection (unused by SD2)
        assert (a["pooled"] is None) == (b["pooled"] is None)
        if a["pooled"] is not None:
            torch.testing.assert_close(a["pooled"], b["pooled"], atol=1e-5, rtol=1e-5)


def test_folder_unet_matches_diffusers_from_pretrained(pair):
    diffusers = pytest.importorskip("diffusers")
    name, _, bundle, folder = pair
    ref = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    x, t, ctx, y, added = unet_inputs(bundle.unet.config)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        got = bundle.unet(x, t, ctx, y)
    assert got.abs().max() > 0.1  # not a degenerate (zeroed) network
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_prediction_type_scaling_and_steps_offset_come_from_the_folder(tmp_path):
    folder = write_diffusers_folder(tmp_path / "m", "sd2-v")
    fam = load_diffusers_folder(folder).family
    assert (fam.name, fam.steps_offset) == ("sd2-v", 1)
    vae_cfg = folder / "vae" / "config.json"
    cfg = json.loads(vae_cfg.read_text())
    vae_cfg.write_text(json.dumps({**cfg, "scaling_factor": 0.5}))
    sched = folder / "scheduler" / "scheduler_config.json"
    sched.write_text(json.dumps({**json.loads(sched.read_text()), "prediction_type": "epsilon",
                                 "rescale_betas_zero_snr": True, "steps_offset": 0}))
    fam = load_diffusers_folder(folder).family
    assert (fam.name, fam.prediction, fam.zero_terminal_snr) == ("sd2", "eps", True)
    assert fam.steps_offset == 0  # the leading spacing's default offset for this model
    assert fam.latent.scaling_factor == 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp16_variant_files(tmp_path, dtype):
    plain = load_diffusers_folder(write_diffusers_folder(tmp_path / "a", "sd1", seed=2),
                                  dtype=None)
    folder = write_diffusers_folder(tmp_path / "b", "sd1", seed=2, dtype=dtype, variant="fp16")
    assert sorted(p.name for p in (folder / "unet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors"]
    for variant in ("fp16", None):  # None: the only variant present is used
        half = load_diffusers_folder(folder, variant=variant, dtype=None)
        assert {p.dtype for p in half.unet.parameters()} == {dtype}
    up = load_diffusers_folder(folder, variant="fp16").unet.state_dict()
    for k, v in plain.unet.state_dict().items():
        assert torch.equal(up[k], v.to(dtype).float()), k
    with pytest.raises(CheckpointError, match=r"expected diffusion_pytorch_model\.bf16"):
        load_diffusers_folder(folder, variant="bf16")


def test_not_a_folder_and_incomplete_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers folder"):
        load_diffusers_folder(tmp_path)
    folder = write_diffusers_folder(tmp_path / "m", "sd1")
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete diffusers folder"):
        load_model(folder)


def test_unsupported_unet_config_is_named(tmp_path):
    folder = write_diffusers_folder(tmp_path / "m", "sd1")
    cfg_file = folder / "unet" / "config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()),
                                    "class_embed_type": "timestep"}))
    with pytest.raises(CheckpointError, match=r"unet/config\.json: class_embed_type='timestep'"):
        load_diffusers_folder(folder)


def test_unet_config_round_trips_through_diffusers_config(tmp_path):
    from dataclasses import replace

    from noisecraft.checkpoints.diffusers_folder import unet_config_from_diffusers
    from noisecraft.checkpoints.unet_keys import unet_config_to_diffusers
    from noisecraft.models.unet_configs import UNET_PRESETS

    for config in (UNET_PRESETS["tiny_sd15"], replace(UNET_PRESETS["tiny_sd2"], norm_groups=8)):
        cfg = dict(unet_config_to_diffusers(config))
        cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
        assert unet_config_from_diffusers(cfg, tmp_path) == config
