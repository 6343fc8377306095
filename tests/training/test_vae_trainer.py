"""VAE trainer: the loss falls, resume is exact, the file loads with its scaling factor."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from noisecraft.models.vae import TINY_VAE
from noisecraft.training.runtime import DataConfig, OptimConfig, RunConfig
from noisecraft.training.state import read_metadata
from noisecraft.training.vae_trainer import (
    VAELossConfig,
    VAETrainConfig,
    load_vae_file,
    pixel_weights,
    random_crops,
    train_vae,
)


def _config(out: Path, steps: int, stop_after: int | None = None, lr: float = 2e-3):
    return VAETrainConfig(
        vae=TINY_VAE,
        data=DataConfig(resolution=32, shapes_count=16, caption_dropout=0.0),
        crop=16,
        optim=OptimConfig(lr=lr, batch_size=4, ema_decay=0.9, precision="fp32"),
        run=RunConfig(out_dir=out, steps=steps, checkpoint_every=2, log_every=1,
                      stop_after=stop_after),
        scale_images=8,
    )


def test_loss_falls_and_file_loads(tmp_path):
    base = _config(tmp_path, 12, lr=3e-3)
    data = replace(base.data, shapes_count=4, random_flip=False)  # the same 4 images each step
    result = train_vae(replace(base, data=data, crop=None), progress=lambda event: None)
    assert result.finished and result.step == 12
    first, last = sum(result.losses[:3]) / 3, sum(result.losses[-3:]) / 3
    assert last < 0.9 * first
    vae, scale = load_vae_file(result.model_path)
    assert scale == pytest.approx(result.scaling_factor) and scale > 0
    assert read_metadata(result.model_path)["noisecraft.vae_config"]["ch"] == TINY_VAE.ch
    keys = load_file(str(result.model_path))
    assert all(k.startswith("first_stage_model.") for k in keys)
    assert vae.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 3, 8, 8)


def test_resume_equals_uninterrupted(tmp_path):
    whole = train_vae(_config(tmp_path / "a", 5), progress=lambda e: None)
    part = train_vae(_config(tmp_path / "b", 5, stop_after=3), progress=lambda e: None)
    assert not part.finished and part.step == 3 and part.scaling_factor is None
    rest = train_vae(_config(tmp_path / "b", 5), progress=lambda e: None)
    assert rest.losses == whole.losses[3:]
    a, b = load_file(str(whole.model_path)), load_file(str(rest.model_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    sa = load_file(str(tmp_path / "a/checkpoints/step_00000005/state.safetensors"))
    sb = load_file(str(tmp_path / "b/checkpoints/step_00000005/state.safetensors"))
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (tmp_path / "a/metrics.csv").read_text() == (tmp_path / "b/metrics.csv").read_text()


def test_resume_refuses_a_changed_config(tmp_path):
    train_vae(_config(tmp_path, 2), progress=lambda e: None)
    with pytest.raises(ValueError, match="optim.lr"):
        train_vae(_config(tmp_path, 4, lr=1e-3), progress=lambda e: None)


def test_random_crops_are_windows_of_the_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    crops = random_crops(x, 4, torch.Generator().manual_seed(0))
    assert crops.shape == (2, 3, 4, 4)
    for img, crop in zip(x, crops, strict=True):
        top, left = divmod(int(crop[0, 0, 0] - img[0, 0, 0]), 8)
        assert torch.equal(crop, img[:, top : top + 4, left : left + 4])


def test_crop_must_fit_the_downscale():
    with pytest.raises(ValueError, match="multiple of the VAE's downscale factor"):
        VAETrainConfig(vae=TINY_VAE, data=DataConfig(resolution=32), crop=15)


def test_foreground_pixels_weigh_more():
    x = torch.full((2, 3, 8, 8), -0.5)
    x[0, :, 2:4, 2:4] = 0.8  # a 2x2 "shape" on image 0; image 1 is flat
    w = pixel_weights(x, VAELossConfig(foreground_weight=5.0))
    assert w.shape == (2, 1, 8, 8)
    assert torch.all(w[0, 0, 2:4, 2:4] == 6.0) and w[0].sum() == 64 + 4 * 5
    assert torch.all(w[1] == 1.0)
    assert pixel_weights(x, VAELossConfig()) == 1.0
    with pytest.raises(ValueError, match="foreground_weight=-1"):
        VAELossConfig(foreground_weight=-1)


def test_init_weights_start_a_new_run_from_a_vae_file(tmp_path):
    first = train_vae(_config(tmp_path / "a", 2), progress=lambda e: None)
    cfg = replace(_config(tmp_path / "b", 1), init_weights=first.model_path,
                  optim=replace(_config(tmp_path / "b", 1).optim, lr=1e-12, ema_decay=None))
    second = train_vae(cfg, progress=lambda e: None)  # lr ~0: the weights stay the init ones
    fresh = train_vae(replace(cfg, init_weights=None, run=replace(cfg.run, out_dir=tmp_path / "e")),
                      progress=lambda e: None)
    a, b = load_file(str(first.model_path)), load_file(str(second.model_path))
    c = load_file(str(fresh.model_path))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert not all(torch.allclose(a[k], c[k], atol=1e-6) for k in a)
    other = replace(cfg, vae=replace(TINY_VAE, ch=16, norm_groups=8),
                    run=replace(cfg.run, out_dir=tmp_path / "c"))
    with pytest.raises(ValueError, match="must match"):
        train_vae(other, progress=lambda e: None)
    missing = replace(cfg, init_weights=tmp_path / "nope.safetensors",
                      run=replace(cfg.run, out_dir=tmp_path / "d"))
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        train_vae(missing, progress=lambda e: None)


def test_reconstruction_score_reads_back_every_image(tmp_path):
    from noisecraft.training.default_model import RESOLUTION, vae_reconstruction_score

    result = train_vae(_config(tmp_path, 1), progress=lambda e: None)
    grid = tmp_path / "recon.png"
    got = vae_reconstruction_score(result.model_path, n=8, grid=grid)
    assert got["n"] == 8 and set(got) >= {"color", "shape", "position", "all"}
    assert 0.0 <= got["all"] <= min(got["color"], got["shape"], got["position"]) <= 1.0
    from PIL import Image

    assert Image.open(grid).size == (8 * RESOLUTION, 2 * RESOLUTION)


def test_diffusion_stage_is_done_only_at_its_step_count(tmp_path, monkeypatch):
    from noisecraft.training import default_model, state

    path = tmp_path / "diffusion" / "model.safetensors"
    path.parent.mkdir(parents=True)
    assert not default_model.stage_done(tmp_path, "diffusion")
    state.save_model_file(path, {"model.": {"w": torch.zeros(1)}},
                          {"noisecraft.training": {"step": 4000, "samples": 64000}})
    monkeypatch.setitem(default_model.STAGE_STEPS, "diffusion", 4000)
    assert default_model.stage_done(tmp_path, "diffusion")
    monkeypatch.setitem(default_model.STAGE_STEPS, "diffusion", 8000)  # raised: continue training
    assert not default_model.stage_done(tmp_path, "diffusion")
    with pytest.raises(ValueError, match="the stages are vae, diffusion, vpred_focus, captions"):
        default_model.stage_done(tmp_path, "nope")


def test_vpred_focus_stage_fine_tunes_stage_2_to_v_with_the_shapes_weighted(tmp_path,
                                                                             monkeypatch):
    from noisecraft.training import default_model, state

    base, cfg = default_model.diffusion_stage(tmp_path), default_model.vpred_focus_stage(tmp_path)
    assert cfg.model.init_weights == tmp_path / "diffusion" / "model.safetensors"
    assert (cfg.objective.prediction, cfg.objective.zero_terminal_snr) == ("v", True)
    assert cfg.objective.min_snr_gamma is None and cfg.objective.foreground_weight == 5.0
    assert cfg.optim == replace(base.optim, warmup_steps=100) and cfg.optim.text_lr_scale == 1
    assert cfg.data == base.data and cfg.run.out_dir == tmp_path / "vpred_focus"
    assert default_model.STAGES[-2] == "vpred_focus"
    path = tmp_path / "vpred_focus" / "model.safetensors"
    path.parent.mkdir(parents=True)
    state.save_model_file(path, {"model.": {"w": torch.zeros(1)}},
                          {"noisecraft.training": {"step": 10, "samples": 160}})
    monkeypatch.setitem(default_model.STAGE_STEPS, "vpred_focus", 10)
    assert default_model.stage_done(tmp_path, "vpred_focus")
    monkeypatch.setitem(default_model.STAGE_STEPS, "vpred_focus", 11)
    assert not default_model.stage_done(tmp_path, "vpred_focus")


def test_captions_stage_continues_stage_3_on_short_captions(tmp_path):
    from noisecraft.training import default_model

    base, cfg = default_model.vpred_focus_stage(tmp_path), default_model.captions_stage(tmp_path)
    assert cfg.model.init_weights == tmp_path / "vpred_focus" / "model.safetensors"
    assert cfg.objective == base.objective and cfg.optim == base.optim
    assert cfg.data == replace(base.data, shapes_partial_captions=0.3)
    assert cfg.run.out_dir == tmp_path / "captions"
    assert default_model.STAGES[-1] == "captions" and not default_model.stage_done(tmp_path,
                                                                                     "captions")
