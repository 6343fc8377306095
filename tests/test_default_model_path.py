"""The built-in default model's whole path, end to end, on a tiny model: the real trainer
(latent, tiny VAE, text encoder trained) -> ``export_default_model`` (fp16) -> the engine's
normal loading path (``generate_image(model=file)``, ``Engine.generate``, ``model=None``).

Checked: the checkpoint loader and the trainer's ``load_trained_model`` build identical
networks; family, latent format and native size come from the file's metadata (written in the
loader's own ``noisecraft_metadata`` format); generation runs at the native size; ``model=None``
resolves to the engine's default file, with a clear error when it is absent; and model files
are replaced by rename, never overwritten in place under a reader's memory map.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from noisecraft.api import generate_image
from noisecraft.checkpoints.loader import (
    META_FAMILY,
    META_TEXT,
    META_UNET,
    META_VAE,
    load_model,
    noisecraft_metadata,
    parse_noisecraft_metadata,
)
from noisecraft.engine import DEFAULT_MODEL_PATH, DefaultModelMissing, Engine
from noisecraft.models.vae import TINY_VAE
from noisecraft.request import GenerationRequest
from noisecraft.training.default_model import export_default_model
from noisecraft.training.state import load_trained_model
from noisecraft.training.trainer import (
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    tokenize,
    train,
)
from tests.training.test_trainer import TEXT, quiet, tiny_unet

SCALING = 0.6
"""A latent scaling factor no family has, so the engine can only have it from the metadata."""


def config(out: Path, steps: int) -> TrainConfig:
    model = ModelConfig(unet=tiny_unet(4), text=TEXT, vae=TINY_VAE, latent_scaling=SCALING,
                        train_text_encoder=True, family_name="noisecraft-shapes")
    return TrainConfig(
        model=model,
        data=DataConfig(resolution=32, shapes_count=4, random_flip=False, caption_dropout=0.2),
        objective=ObjectiveConfig(prediction="eps"),
        optim=OptimConfig(lr=2e-3, batch_size=2, warmup_steps=1, ema_decay=0.9,
                          precision="fp32"),
        run=RunConfig(out_dir=out, steps=steps, checkpoint_every=0, sample_every=0,
                      log_every=1),
        samples=SampleConfig(prompts=()),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(the trainer's float32 model file, the exported float16 default-model file)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("default")
    result = train(config(root / "diffusion", steps=2), progress=quiet)
    assert result.finished and result.model_path == root / "diffusion" / "model.safetensors"
    out = export_default_model(root, out=root / "weights" / "default.safetensors")
    return result.model_path, out


def raw_metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def test_export_is_fp16_in_the_loaders_metadata_format(trained):
    _, out = trained
    with safe_open(str(out), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16"}
    raw = raw_metadata(out)
    own = parse_noisecraft_metadata(raw, out)
    canonical = noisecraft_metadata(own[META_FAMILY], unet=own[META_UNET], vae=own[META_VAE],
                                    text=own[META_TEXT])
    assert {k: raw[k] for k in canonical} == canonical
    assert own[META_TEXT] == (TEXT,) and own[META_VAE] == TINY_VAE
    assert own[META_FAMILY].text == "clip" and own[META_FAMILY].native_size == 32


def _equal_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_loader_and_trainer_loader_build_identical_networks(trained):
    _, out = trained
    ours, theirs = load_model(out, hash_file=False), load_trained_model(out)
    assert ours.family == theirs.family
    for name in ("unet", "vae", "text_encoder"):
        _equal_state(getattr(ours, name), getattr(theirs, name))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        ids = tokenize(theirs.text_encoder, ["a red circle"])
        assert torch.equal(tokenize(ours.text_encoder, ["a red circle"]), ids)
        ctx_a, ctx_b = ours.text_encoder(ids), theirs.text_encoder(ids)
        ctx_a = ctx_a[0] if isinstance(ctx_a, tuple) else ctx_a
        ctx_b = ctx_b[0] if isinstance(ctx_b, tuple) else ctx_b
        assert torch.equal(ctx_a, ctx_b)
        t = torch.tensor([500])
        assert torch.equal(ours.unet(x, t, ctx_a), theirs.unet(x, t, ctx_b))
        assert torch.equal(ours.vae.decode(x), theirs.vae.decode(x))


REQUEST = dict(prompt="a red circle", steps=3, cfg_scale=3.0, seed=7)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_engine_default_model_uses_the_metadata_and_native_size(trained):
    _, out = trained
    engine = Engine(device="cpu", default_model=out)
    bundle = engine.model(None)
    assert bundle.family == load_trained_model(out).family
    assert bundle.family.name == "noisecraft-shapes" and bundle.family.prediction == "eps"
    assert bundle.family.latent.channels == 4
    assert bundle.family.latent.scaling_factor == pytest.approx(SCALING)
    result = engine.generate(GenerationRequest(model=None, **REQUEST))
    (image,) = result.images
    assert image.image.size == (32, 32)
    assert tuple(result.latents.shape) == (1, 4, 16, 16)
    assert engine.cached_models == [str(out)]

    by_path = generate_image(model=str(out), device="cpu", **REQUEST)
    assert by_path.size == (32, 32)
    assert np.array_equal(pixels(by_path), pixels(image.image))

    engine.register("trained", load_trained_model(out))
    by_trainer = engine.generate(GenerationRequest(model="trained", **REQUEST)).images[0]
    assert np.array_equal(pixels(by_trainer.image), pixels(image.image))
    other_seed = engine.generate(GenerationRequest(model=None, **{**REQUEST, "seed": 8}))
    assert not np.array_equal(pixels(other_seed.images[0].image), pixels(image.image))


def test_model_none_without_the_file_says_what_to_do(tmp_path):
    absent = tmp_path / "weights" / "default.safetensors"
    engine = Engine(device="cpu", default_model=absent)
    with pytest.raises(DefaultModelMissing) as info:
        engine.generate(GenerationRequest(model=None, **REQUEST))
    message = str(info.value)
    assert str(absent) in message and "model=PATH" in message
    assert "export_default_model" in message
    assert Engine(device="cpu").default_model == DEFAULT_MODEL_PATH


def test_saving_replaces_the_file_under_a_mapped_reader(trained, tmp_path):
    """Resuming the run re-exports ``model.safetensors`` while a loaded (memory-mapped) bundle
    still reads it: the trainer must write a new file and rename it over the old one."""
    src, _ = trained
    run = tmp_path / "diffusion"
    result = train(config(run, steps=1), progress=quiet)
    path = result.model_path
    before = load_model(path, dtype=None, hash_file=False)
    weights = {k: v.clone() for k, v in before.unet.state_dict().items()}
    inode = os.stat(path).st_ino
    again = train(config(run, steps=2), progress=quiet)
    assert again.model_path == path and again.step == 2
    assert os.stat(path).st_ino != inode, "model.safetensors was overwritten in place"
    assert not list(run.glob("*.tmp"))
    for k, v in before.unet.state_dict().items():
        assert torch.equal(v, weights[k]), k
    after = load_model(path, dtype=None, hash_file=False)
    changed = [k for k, v in after.unet.state_dict().items() if not torch.equal(v, weights[k])]
    assert changed, "the second export did not write the newer weights"
    assert src.exists()
