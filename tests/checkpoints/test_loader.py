"""Single-file loading: dtypes, pickles, noisecraft metadata, separate VAEs, hashes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from noisecraft.checkpoints import (
    CheckpointError,
    file_sha256,
    load_checkpoint,
    load_model,
    load_vae,
    noisecraft_metadata,
)
from noisecraft.checkpoints.assign import read_tensor
from noisecraft.checkpoints.files import open_state_dict
from noisecraft.checkpoints.vae_keys import vae_state_dict_to_diffusers
from noisecraft.models.family import Family
from noisecraft.models.latent_formats import LatentFormat
from tests.fixtures.checkpoints import (
    part_state_dict,
    tiny_spec,
    tiny_state_dict,
    write_single_file,
)

UNET = "model.diffusion_model."


def expected_unet(name, seed=0):
    return part_state_dict(tiny_state_dict(name, seed=seed), UNET)


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    return write_single_file(tmp_path_factory.mktemp("sd1") / "tiny.safetensors", "sd1")


def test_weights_arrive_unchanged_and_ready(sd1_file):
    bundle = load_checkpoint(sd1_file)
    loaded = bundle.unet.state_dict()
    for k, v in expected_unet("sd1").items():
        assert torch.equal(loaded[k], v), k
    assert (bundle.name, bundle.family.name) == ("tiny", "sd1")
    assert bundle.sha256 == file_sha256(sd1_file) and bundle.short_hash == bundle.sha256[:10]
    assert not bundle.unet.training and not bundle.vae.training
    assert bundle.extras["ignored_keys"] == [
        "alphas_cumprod", "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "model_ema.decay"]
    assert load_checkpoint(sd1_file, hash_file=False).sha256 is None


@pytest.mark.parametrize("stored", [torch.float16, torch.bfloat16])
def test_half_files_load_upcast_or_kept(tmp_path, stored):
    path = write_single_file(tmp_path / "half.safetensors", "sd2", dtype=stored, seed=1)
    want = {k: v.to(stored) for k, v in expected_unet("sd2", seed=1).items()}
    up = load_checkpoint(path)  # default float32
    kept = load_checkpoint(path, dtype=stored)
    as_stored = load_checkpoint(path, dtype=None)
    up_sd, kept_sd = up.unet.state_dict(), kept.unet.state_dict()
    for k, v in want.items():
        assert up_sd[k].dtype == torch.float32
        assert torch.equal(up_sd[k], v.float()), k
        assert torch.equal(kept_sd[k], v), k
    for module in (kept.unet, kept.vae, kept.text_encoder, as_stored.text_encoder):
        assert {p.dtype for p in module.parameters()} == {stored}
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():  # the half model runs
        assert kept.vae.decode(x.to(stored)).dtype == stored


def test_float32_to_bfloat16(sd1_file):
    loaded = load_checkpoint(sd1_file, dtype=torch.bfloat16).unet.state_dict()
    for k, v in expected_unet("sd1").items():
        assert torch.equal(loaded[k], v.to(torch.bfloat16)), k


def test_unconverted_tensors_are_views_of_the_file(sd1_file):
    with open_state_dict(sd1_file) as f:
        key = UNET + "out.2.weight"
        t = f[key]
        assert read_tensor(f, key, dtype=torch.float32, device="cpu").data_ptr() == t.data_ptr()
        half = read_tensor(f, key, dtype=torch.float16, device="cpu")
        assert half.dtype == torch.float16 and torch.equal(half, t.half())
        assert torch.equal(f[key], expected_unet("sd1")["out.2.weight"])  # pages re-read fine


def test_pickled_ckpt_gives_the_same_numbers(tmp_path, sd1_file):
    ckpt = write_single_file(tmp_path / "tiny.ckpt", "sd1")
    a, b = load_checkpoint(sd1_file), load_checkpoint(ckpt)
    for part in ("unet", "vae", "text_encoder"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), part


def _own_file(tmp_path, dtype=torch.float16):
    """A noisecraft-trained model: sd1 layout, but its own family, text activation and latent."""
    spec = tiny_spec("sd1")
    family = Family("own-shapes", prediction="v", text="clip",
                    latent=LatentFormat(channels=4, scaling_factor=0.5), native_size=64)
    text = dataclasses.replace(spec.text[0], activation="gelu", pad_id=0, default_clip_skip=2)
    meta = noisecraft_metadata(family, unet=spec.unet, vae=spec.vae, text=[text])
    return write_single_file(tmp_path / "own.safetensors", "sd1", dtype=dtype, metadata=meta), \
        family, text


def test_noisecraft_metadata_takes_priority(tmp_path):
    path, family, text = _own_file(tmp_path)
    bundle = load_checkpoint(path)
    assert bundle.family == family
    assert bundle.text_encoder.config == text
    assert bundle.unet.config == tiny_spec("sd1").unet
    assert {p.dtype for p in bundle.unet.parameters()} == {torch.float32}
    detected = load_checkpoint(path, family="sd1")  # an explicit family wins over metadata
    assert detected.family.name == "sd1"


def test_invalid_metadata_is_named(tmp_path):
    path = write_single_file(tmp_path / "bad.safetensors", "sd1",
                             metadata={"noisecraft.unet_config": '{"model_channels": "x"}'})
    with pytest.raises(CheckpointError, match=r"bad\.safetensors: metadata "
                                              r"'noisecraft.unet_config' is not valid"):
        load_checkpoint(path)


def _vae_files(tmp_path):
    vae = part_state_dict(tiny_state_dict("sd1", seed=9), "first_stage_model.")
    paths = {"bare": tmp_path / "bare.safetensors", "prefixed": tmp_path / "prefixed.pt",
             "diffusers": tmp_path / "diffusers.safetensors"}
    save_file(vae, paths["bare"])
    torch.save({"state_dict": {"first_stage_model." + k: v for k, v in vae.items()},
                "loss.logvar": torch.zeros(())}, paths["prefixed"])
    save_file({k: v.contiguous() for k, v in vae_state_dict_to_diffusers(vae).items()},
              paths["diffusers"])
    return vae, paths


def test_standalone_vae_in_every_layout(tmp_path):
    vae, paths = _vae_files(tmp_path)
    for name, path in paths.items():
        loaded = load_vae(path).state_dict()
        assert loaded.keys() == vae.keys(), name
        assert all(torch.equal(loaded[k], vae[k]) for k in vae), name


def test_separate_vae_replaces_the_checkpoint_one(tmp_path, sd1_file):
    vae, paths = _vae_files(tmp_path)
    bundle = load_model(sd1_file, vae=paths["diffusers"])
    loaded = bundle.vae.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in vae.items())
    no_vae = write_single_file(tmp_path / "novae.safetensors", "sd1", drop=tuple(
        k for k in tiny_state_dict("sd1") if k.startswith("first_stage_model.")))
    with pytest.raises(CheckpointError, match=r"no VAE in the file.*pass vae="):
        load_checkpoint(no_vae)
    loaded = load_checkpoint(no_vae, vae=paths["bare"]).vae.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in vae.items())


def test_a_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder; use load_diffusers_folder"):
        load_checkpoint(tmp_path)
