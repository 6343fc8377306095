"""Diffusion trainer on tiny models: loss falls (pixel and latent), the model file's layout,
caption dropout, min-SNR weighting, configuration errors."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from noisecraft.diffusion import min_snr_weight
from noisecraft.models.text_config import NOISECRAFT_SMALL, tiny
from noisecraft.models.unet_configs import UNetConfig
from noisecraft.models.vae import TINY_VAE
from noisecraft.schedules import DiscreteSchedule
from noisecraft.training.state import load_trained_model, read_metadata
from noisecraft.training.trainer import (
    DataConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    RunConfig,
    SampleConfig,
    TrainConfig,
    diffusion_loss,
    drop_captions,
    tokenize,
    train,
)

TEXT = tiny(NOISECRAFT_SMALL)  # width 32, 3 layers, CLIP's vocabulary


def tiny_unet(channels: int) -> UNetConfig:
    return UNetConfig(in_channels=channels, out_channels=channels, model_channels=32,
                      channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(0, 1),
                      num_heads=None, head_dim=32, context_dim=TEXT.width,
                      use_linear_in_transformer=True)


def tiny_config(out: Path, *, steps: int = 4, latent: bool = False, **run) -> TrainConfig:
    """4 shapes at 32 px; pixel space, or the latent space of a fresh tiny VAE (16x16x4)."""
    model = ModelConfig(unet=tiny_unet(4 if latent else 3), text=TEXT,
                        vae=TINY_VAE if latent else None)
    return TrainConfig(
        model=model,
        data=DataConfig(resolution=32, shapes_count=4, random_flip=False, caption_dropout=0.2),
        objective=ObjectiveConfig(prediction="eps"),
        optim=OptimConfig(lr=2e-3, batch_size=4, warmup_steps=2, ema_decay=0.9,
                          precision="fp32"),
        run=RunConfig(out_dir=out, steps=steps, **{"checkpoint_every": 2, "sample_every": 0,
                                                   "log_every": 1, **run}),
        samples=SampleConfig(prompts=SampleConfig().prompts[:2], steps=3),
    )


def quiet(event) -> None:
    pass


def eval_loss(path: Path, config: TrainConfig) -> float:
    """The training loss of a saved model on fixed images, noise and timesteps."""
    from noisecraft.training.runtime import load_batch, open_dataset
    from noisecraft.training.trainer import TextToImage, build_vae, to_x0

    bundle = load_trained_model(path)
    model = TextToImage(bundle.unet, bundle.text_encoder)
    vae, latent = build_vae(config.model)
    if vae is not None:
        vae = bundle.vae
    images, captions = load_batch(open_dataset(config.data), 0, 0, 4)
    g = torch.Generator().manual_seed(123)
    x0 = to_x0(images.repeat(8, 1, 1, 1), vae, latent, g, "fp32")
    ids = tokenize(bundle.text_encoder, captions * 8)
    with torch.no_grad():
        loss, _ = diffusion_loss(model, x0, ids, config.objective, bundle.family.schedule(), g)
    return loss.item()


@pytest.mark.parametrize("latent", [False, True], ids=["pixel", "latent"])
def test_a_few_steps_lower_the_loss(tmp_path, latent):
    config = tiny_config(tmp_path, steps=16, latent=latent, checkpoint_every=1,
                         keep_checkpoints=20)
    config = replace(config, optim=replace(config.optim, ema_decay=None))
    result = train(config, progress=quiet)
    assert result.finished and result.step == 16 and len(result.losses) == 16
    first = eval_loss(tmp_path / "checkpoints/step_00000001/model.safetensors", config)
    last = eval_loss(result.model_path, config)
    assert last < 0.85 * first, (first, last)


def test_model_file_has_the_original_layout_and_loads(tmp_path):
    result = train(tiny_config(tmp_path, steps=2, latent=True, sample_every=2), progress=quiet)
    keys = load_file(str(result.model_path)).keys()
    prefixes = {k.split(".")[0] for k in keys}
    assert prefixes == {"model", "first_stage_model", "cond_stage_model"}
    assert "model.diffusion_model.input_blocks.0.0.weight" in keys
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "first_stage_model.decoder.conv_out.weight" in keys
    meta = read_metadata(result.model_path)
    assert meta["noisecraft.family"]["text"] == "clip"
    assert meta["noisecraft.unet_config"]["in_channels"] == 4
    assert meta["noisecraft.text_config"]["vocab_size"] == 49408
    assert meta["noisecraft.vae_config"]["ch"] == TINY_VAE.ch
    bundle = load_trained_model(result.model_path)
    assert bundle.family.prediction == "eps" and bundle.family.native_size == 32
    assert (tmp_path / "samples/step_00000002.png").exists()
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,it_per_s" and len(rows) == 3


def test_caption_dropout_replaces_captions_with_the_empty_prompt():
    caps = [f"caption {i}" for i in range(2000)]
    g = torch.Generator().manual_seed(0)
    assert drop_captions(caps, 0.0, g) == caps
    assert drop_captions(caps, 1.0, g) == [""] * len(caps)
    half = drop_captions(caps, 0.5, g)
    dropped = sum(c == "" for c in half)
    assert 900 < dropped < 1100  # binomial(2000, 0.5): +-4.5 sigma
    assert all(c in ("", o) for c, o in zip(half, caps, strict=True))


def _loss_parts(gamma, prediction="eps"):
    torch.manual_seed(0)
    model = lambda x, t, ids: x * 0.5  # noqa: E731 - any fixed network
    x0 = torch.randn(64, 3, 8, 8)
    ids = torch.zeros(64, 77, dtype=torch.long)
    schedule = DiscreteSchedule.from_betas()
    g = torch.Generator().manual_seed(5)
    objective = ObjectiveConfig(prediction=prediction, min_snr_gamma=gamma)
    _, per_sample = diffusion_loss(model, x0, ids, objective, schedule, g)
    t = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(5))
    return per_sample, schedule.sigmas[t].float()


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_min_snr_weights_each_sample_by_its_snr(prediction):
    plain, sigma = _loss_parts(None, prediction)
    weighted, _ = _loss_parts(5.0, prediction)
    expected = min_snr_weight(sigma, prediction, 5.0)
    torch.testing.assert_close(weighted, plain * expected)
    snr = sigma.pow(-2)
    assert (snr > 5).any() and (snr < 5).any()  # both regimes occur in the batch
    if prediction == "eps":  # clipped where SNR > gamma, untouched elsewhere
        assert torch.equal(weighted[snr <= 5], plain[snr <= 5])
        assert (weighted[snr > 5] < plain[snr > 5]).all()


def test_config_errors_say_what_to_change():
    with pytest.raises(ValueError, match="context_dim 48 must equal the text encoder's width 32"):
        ModelConfig(unet=replace(tiny_unet(3), context_dim=48), text=TEXT)
    with pytest.raises(ValueError, match="in_channels = out_channels = 4"):
        from noisecraft.training.trainer import _check_channels, build_vae

        cfg = ModelConfig(unet=tiny_unet(3), text=TEXT, vae=TINY_VAE)
        _check_channels(cfg, build_vae(cfg)[1])
    with pytest.raises(ValueError, match="'eps', 'v'"):
        ObjectiveConfig(prediction="x0")


def test_default_model_export_is_float16_and_loads(tmp_path):
    from noisecraft.training.default_model import export_default_model

    result = train(tiny_config(tmp_path / "diffusion", steps=1, latent=True), progress=quiet)
    out = export_default_model(tmp_path)  # the only stage with a model file: diffusion
    with pytest.raises(FileNotFoundError, match="vpred_focus"):
        export_default_model(tmp_path, stage="vpred_focus")
    with pytest.raises(ValueError, match="diffusion, vpred_focus, captions"):
        export_default_model(tmp_path, stage="vae")
    half, full = load_file(str(out)), load_file(str(result.model_path))
    assert half.keys() == full.keys()
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    bundle = load_trained_model(out)
    key = "input_blocks.0.0.weight"
    w = full["model.diffusion_model." + key]
    assert torch.equal(bundle.unet.state_dict()[key], w.half().float())


def test_text_lr_scale_moves_the_text_encoder_that_much_faster(tmp_path):
    """Three steps from the same weights and data. The first two move no text weight (the
    U-Net's cross-attention output projections start at zero, so no gradient reaches the
    context yet); in the third, Adam moves the text encoder's weights text_lr_scale times as
    far, with the same gradients, while the U-Net's update is the same."""
    def deltas(scale: float, out: Path) -> tuple[float, float]:
        c = tiny_config(out, steps=3, checkpoint_every=0)
        c = replace(c, optim=replace(c.optim, warmup_steps=0, ema_decay=None,
                                     weight_decay=0.0, text_lr_scale=scale))
        from noisecraft.training.runtime import DistEnv
        from noisecraft.training.trainer import _Run
        run = _Run(c, DistEnv())
        run.train_step()
        run.train_step()
        before = {k: v.clone() for k, v in run.model.state_dict().items()}
        run.train_step()
        after = run.model.state_dict()
        moved = {k: (after[k] - before[k]).abs().max().item() for k in before}
        return (max(v for k, v in moved.items() if k.startswith("text.")),
                max(v for k, v in moved.items() if k.startswith("unet.")))

    text1, unet1 = deltas(1.0, tmp_path / "a")
    text10, unet10 = deltas(10.0, tmp_path / "b")
    assert text1 > 1e-4  # the text encoder does train
    assert text10 == pytest.approx(10 * text1, rel=1e-3)
    assert unet10 == pytest.approx(unet1, rel=1e-6)


def test_text_lr_scale_group_survives_resume(tmp_path):
    c = tiny_config(tmp_path / "run", steps=4, checkpoint_every=2)
    c = replace(c, optim=replace(c.optim, text_lr_scale=5.0))
    train(replace(c, run=replace(c.run, stop_after=2)), progress=quiet)
    from noisecraft.training.runtime import DistEnv
    from noisecraft.training.state import latest_checkpoint
    from noisecraft.training.trainer import _Run

    run = _Run(c, DistEnv())
    run.restore(latest_checkpoint(c.run.out_dir))
    assert sorted(g["lr_scale"] for g in run.opt.param_groups) == [1.0, 5.0]
    assert train(c, progress=quiet).step == 4


def test_init_weights_start_a_run_from_a_trained_model(tmp_path):
    first = train(tiny_config(tmp_path / "first", steps=2), progress=quiet).model_path
    c = tiny_config(tmp_path / "second", steps=1)
    c = replace(c, model=replace(c.model, init_weights=first))
    from noisecraft.training.runtime import DistEnv
    from noisecraft.training.trainer import _Run

    run = _Run(c, DistEnv())
    loaded = load_trained_model(first)
    for k, v in loaded.unet.state_dict().items():
        assert torch.equal(run.model.unet.state_dict()[k], v), k
    fresh = _Run(tiny_config(tmp_path / "third", steps=1), DistEnv())
    assert not all(torch.equal(fresh.model.unet.state_dict()[k], v)
                   for k, v in loaded.unet.state_dict().items())


def test_init_weights_errors_name_the_problem(tmp_path):
    c = tiny_config(tmp_path / "x", steps=1)
    from noisecraft.training.runtime import DistEnv
    from noisecraft.training.trainer import _Run

    with pytest.raises(FileNotFoundError, match="init_weights"):
        _Run(replace(c, model=replace(c.model, init_weights=tmp_path / "nope.safetensors")),
             DistEnv())
    first = train(tiny_config(tmp_path / "first", steps=1), progress=quiet).model_path
    other = replace(c.model, unet=replace(c.model.unet, model_channels=64), init_weights=first)
    with pytest.raises(ValueError, match="unet.*must match"):
        _Run(replace(c, model=other), DistEnv())
    with pytest.raises(ValueError, match="text_lr_scale"):
        OptimConfig(text_lr_scale=0)


def test_zero_terminal_snr_is_trained_and_recorded_in_the_family(tmp_path):
    with pytest.raises(ValueError, match="needs prediction='v'"):
        ObjectiveConfig(prediction="eps", zero_terminal_snr=True)
    c = tiny_config(tmp_path / "z", steps=1)
    c = replace(c, objective=ObjectiveConfig(prediction="v", zero_terminal_snr=True))
    path = train(c, progress=quiet).model_path
    family = load_trained_model(path).family
    assert (family.prediction, family.zero_terminal_snr) == ("v", True)
    ac = family.schedule().alphas_cumprod
    assert ac[-1] < 1e-7 < DiscreteSchedule.from_betas().alphas_cumprod[-1]
