"""Training a text-to-image diffusion model: U-Net + CLIP-architecture text encoder, in pixel
space or in the latent space of a frozen VAE.

One optimiser step (Ho et al. 2020, Alg. 1, in the sigma notation of ``diffusion.py``)::

    captions -> "" with probability caption_dropout            (so CFG has an unconditional model)
    x0 = images (pixel) | latent_format.process_in(VAE.encode(images).sample())   (latent)
    t ~ U{0 .. T-1};  sigma = schedule.sigmas[t];  noise ~ N(0, I)
    output = unet(x0 + sigma * noise) / sqrt(1 + sigma^2), t, text_encoder(captions))
    loss = mean_b  w(sigma_b) * mean((output - target)^2)

with ``target`` the eps or v of ``diffusion.training_target`` and ``w`` 1 or the min-SNR-gamma
weight (Hang et al. 2023).  AdamW with linear warm-up, gradient accumulation, clipping and an
EMA of the weights (``runtime.py``, ``ema.py``); the EMA weights are what samples and the saved
model use.  Checkpoints and exact resume: ``state.py``.  Data-parallel: run the same
``train()`` under ``torchrun --nproc_per_node N`` (DDP, gloo on CPU); each process takes its
share of every batch and only process 0 writes files.

Outputs in ``run.out_dir``: ``config.json``, ``metrics.csv``, ``samples/step_N.png`` (a grid of
the fixed sample prompts, fixed seed, through the real sampler with CFG), ``checkpoints/`` and,
when the run has finished, ``model.safetensors`` (see ``state.py`` for its layout).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from noisecraft.diffusion import add_noise, append_dims, min_snr_weight, training_target
from noisecraft.models.family import Family
from noisecraft.models.latent_formats import LatentFormat
from noisecraft.models.text import CLIPTextEncoder
from noisecraft.models.text_config import TextEncoderConfig
from noisecraft.models.unet import UNetModel
from noisecraft.models.unet_configs import UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig
from noisecraft.schedules import DiscreteSchedule
from noisecraft.training import state as ckpt
from noisecraft.training.ema import EMA
from noisecraft.training.previews import SampleConfig, save_sample_grid
from noisecraft.training.runtime import (
    DataConfig,
    DistEnv,
    MetricsCSV,
    OptimConfig,
    ProgressCallback,
    ProgressEvent,
    Rate,
    RunConfig,
    autocast,
    barrier,
    detect_distributed,
    grad_norm_clip,
    init_distributed,
    load_batch,
    lr_at,
    make_optimizer,
    mean_across,
    open_dataset,
    prepare_run_dir,
    progress_reporter,
    resolve_precision,
)

MODEL_FILE = "model.safetensors"
PIXEL_FORMAT = LatentFormat(channels=3, scaling_factor=1.0)
"""The "latent format" of a pixel-space model: the image itself."""

__all__ = ["ModelConfig", "ObjectiveConfig", "SampleConfig", "TrainConfig", "TrainResult",
           "DataConfig", "OptimConfig", "RunConfig", "train", "diffusion_loss", "drop_captions"]


@dataclass(frozen=True)
class ModelConfig:
    """What is trained.  Latent space when ``vae`` or ``vae_file`` is given, else pixels.

    ``vae_file``: a frozen VAE written by ``vae_trainer`` (its measured scaling factor is used
    unless ``latent_scaling`` is set); ``vae``: a freshly initialised frozen VAE (tests).
    ``train_text_encoder=False`` freezes the (randomly initialised) text encoder.
    """

    unet: UNetConfig
    text: TextEncoderConfig
    vae: VAEConfig | None = None
    vae_file: Path | None = None
    latent_scaling: float | None = None
    train_text_encoder: bool = True
    family_name: str = "noisecraft"

    def __post_init__(self) -> None:
        if self.unet.context_dim != self.text.width:
            raise ValueError(
                f"ModelConfig: the U-Net's context_dim {self.unet.context_dim} must equal the "
                f"text encoder's width {self.text.width} (it cross-attends to its states)"
            )
        if self.vae is not None and self.vae_file is not None:
            raise ValueError("ModelConfig: give vae (fresh) or vae_file (trained), not both")


@dataclass(frozen=True)
class ObjectiveConfig:
    """Prediction type, loss weighting and the training noise schedule (SD's by default)."""

    prediction: str = "eps"
    min_snr_gamma: float | None = None
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction={self.prediction!r}; the trainer supports 'eps', 'v'")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma} must be > 0 (e.g. 5), or None")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    samples: SampleConfig = SampleConfig()


@dataclass
class TrainResult:
    model_path: Path | None
    step: int
    losses: list[float] = field(default_factory=list)
    finished: bool = True


class TextToImage(nn.Module):
    """The trained networks as one module (what DDP wraps): ``unet`` and ``text``."""

    def __init__(self, unet: UNetModel, text: CLIPTextEncoder):
        super().__init__()
        self.unet, self.text = unet, text

    def forward(self, x_in, timesteps, ids):
        context, _ = self.text(ids)
        return self.unet(x_in, timesteps, context)


# ----------------------------------------------------------------------------- the loss


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Each caption replaced by "" with probability p (one uniform draw per caption)."""
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


def diffusion_loss(
    model: nn.Module, x0: torch.Tensor, ids: torch.Tensor, objective: ObjectiveConfig,
    schedule: DiscreteSchedule, generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-sample weighted losses [B]) for clean x0 [B, C, H, W] and token ids [B, 77].

    ``model(x_in, t, ids)`` sees the VP input ``x / sqrt(1 + sigma^2)`` (Denoiser's
    convention) at integer timesteps t drawn uniformly from the schedule.
    """
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator)
    sigma = schedule.sigmas[t].to(torch.float32)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    x = add_noise(x0, noise, sigma)
    x_in = x / append_dims((1 + sigma**2).sqrt(), x.ndim)
    out = model(x_in, t.to(torch.float32), ids).float()
    target = training_target(objective.prediction, x0, noise, sigma)
    per_sample = (out - target).pow(2).mean(dim=tuple(range(1, x0.ndim)))
    if objective.min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(sigma, objective.prediction,
                                                 objective.min_snr_gamma)
    return per_sample.mean(), per_sample.detach()


# ----------------------------------------------------------------------------- building


def family_for(config: TrainConfig, latent: LatentFormat) -> Family:
    o = config.objective
    return Family(config.model.family_name, prediction=o.prediction, text="clip", latent=latent,
                  native_size=config.data.resolution, beta_schedule=o.beta_schedule,
                  beta_start=o.beta_start, beta_end=o.beta_end,
                  num_train_timesteps=o.num_train_timesteps)


def build_vae(m: ModelConfig) -> tuple[AutoencoderKL | None, LatentFormat]:
    """The frozen VAE and the latent format (scaling factor) it implies."""
    if m.vae_file is not None:
        from noisecraft.training.vae_trainer import load_vae_file

        vae, measured = load_vae_file(Path(m.vae_file))
        scale = m.latent_scaling or measured
        if scale is None:
            raise ValueError(f"{m.vae_file} records no scaling factor; set latent_scaling")
    elif m.vae is not None:
        vae, scale = AutoencoderKL(m.vae).eval(), m.latent_scaling or 1.0
    else:
        return None, PIXEL_FORMAT
    vae.requires_grad_(False)
    return vae, LatentFormat(channels=vae.config.embed_dim, scaling_factor=float(scale))


def _check_channels(m: ModelConfig, latent: LatentFormat) -> None:
    if m.unet.in_channels != latent.channels or m.unet.out_channels != latent.channels:
        space = "pixel" if latent is PIXEL_FORMAT else "latent"
        raise ValueError(
            f"the U-Net has in/out channels {m.unet.in_channels}/{m.unet.out_channels}, but the "
            f"{space} space has {latent.channels}; set UNetConfig in_channels = out_channels = "
            f"{latent.channels}"
        )


@torch.no_grad()
def to_x0(images: torch.Tensor, vae: AutoencoderKL | None, latent: LatentFormat,
          generator: torch.Generator, precision: str) -> torch.Tensor:
    if vae is None:
        return images
    with autocast(precision, images.device):
        post = vae.encode(images)
    z = post.mean.float() + post.std.float() * torch.randn(post.mean.shape, generator=generator)
    return latent.process_in(z)


def tokenize(text: CLIPTextEncoder, captions: list[str]) -> torch.Tensor:
    return torch.tensor([text.tokenizer(c) for c in captions], dtype=torch.long)


# ----------------------------------------------------------------------------- the loop


class _Run:
    """The state of one invocation of :func:`train` (built once, then stepped)."""

    def __init__(self, config: TrainConfig, env: DistEnv):
        self.config, self.env = config, env
        m, run = config.model, config.run
        torch.manual_seed(run.seed)
        self.vae, self.latent = build_vae(m)
        _check_channels(m, self.latent)
        self.family = family_for(config, self.latent)
        self.schedule = self.family.schedule()
        self.model = TextToImage(UNetModel(m.unet), CLIPTextEncoder(m.text))
        self.model.text.requires_grad_(m.train_text_encoder)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = make_optimizer(self.trainable, config.optim)
        self.ema = EMA(self.model, config.optim.ema_decay) if config.optim.ema_decay else None
        self.gen = torch.Generator().manual_seed(run.seed * 1000 + env.rank + 1)
        self.dataset = open_dataset(config.data)
        if hasattr(self.dataset, "verify") and env.is_main:
            self.dataset.verify()  # a bad image fails now, naming the file, not hours in
        self.step, self.seen = 0, 0
        self.precision = resolve_precision(config.optim.precision, torch.device("cpu"))
        self.ddp = self.model
        if env.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(self.model)

    def restore(self, path: Path) -> None:
        saved = ckpt.load_state(path / "state.safetensors")
        self.model.load_state_dict(saved["trained"])
        self.opt.load_state_dict(saved["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        ckpt.load_rng(path / f"rng_rank{self.env.rank}.safetensors", {"noise": self.gen})
        self.step, self.seen = saved["step"], saved["extra"]["seen"]

    def micro_batch(self) -> tuple[torch.Tensor, list[str]]:
        b, world = self.config.optim.batch_size, self.env.world_size
        start = self.seen + self.env.rank * b
        self.seen += b * world
        return load_batch(self.dataset, self.config.data.seed, start, b)

    def train_step(self) -> tuple[float, float]:
        optim = self.config.optim
        lr = lr_at(self.step, optim)
        for group in self.opt.param_groups:
            group["lr"] = lr
        total = 0.0
        for k in range(optim.grad_accum):
            images, captions = self.micro_batch()
            captions = drop_captions(captions, self.config.data.caption_dropout, self.gen)
            x0 = to_x0(images, self.vae, self.latent, self.gen, self.precision)
            ids = tokenize(self.model.text, captions)
            sync = k == optim.grad_accum - 1 or not self.env.distributed
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                with autocast(self.precision, x0.device):
                    loss, _ = diffusion_loss(self.ddp, x0, ids, self.config.objective,
                                             self.schedule, self.gen)
                (loss / optim.grad_accum).backward()
            total += loss.item() / optim.grad_accum
        grad_norm_clip(self.trainable, optim.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return mean_across(total, self.env), lr

    # --------------------------------------------------------------------- outputs

    def sampling_weights(self) -> dict[str, torch.Tensor]:
        if self.ema is not None:
            return self.ema.averaged_state_dict(self.model)
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def model_parts(self, weights: dict[str, torch.Tensor]) -> dict[str, dict]:
        parts = {ckpt.UNET_PREFIX: ckpt.split_prefix(weights, "unet."),
                 ckpt.TEXT_PREFIX: ckpt.split_prefix(weights, "text.")}
        if self.vae is not None:
            parts[ckpt.VAE_PREFIX] = self.vae.state_dict()
        return parts

    def metadata(self) -> dict:
        m = self.config.model
        meta = {"noisecraft.family": self.family, "noisecraft.unet_config": m.unet,
                "noisecraft.text_config": m.text,
                "noisecraft.training": {"step": self.step, "samples": self.seen}}
        if self.vae is not None:
            meta["noisecraft.vae_config"] = self.vae.config
        return meta

    def save_checkpoint(self) -> None:
        run = self.config.run
        path = ckpt.checkpoint_dir(run.out_dir, self.step)
        if self.env.is_main:
            path.mkdir(parents=True, exist_ok=True)
            ckpt.save_model_file(path / MODEL_FILE, self.model_parts(self.sampling_weights()),
                                 self.metadata())
            ckpt.save_state(path / "state.safetensors", step=self.step,
                            trained=self.model.state_dict(), optimizer=self.opt,
                            ema=None if self.ema is None else self.ema.state_dict(),
                            extra={"seen": self.seen})
        barrier(self.env)
        ckpt.save_rng(path / f"rng_rank{self.env.rank}.safetensors", {"noise": self.gen})
        barrier(self.env)
        if self.env.is_main:
            ckpt.commit_checkpoint(run.out_dir, self.step, run.keep_checkpoints)

    def save_samples(self) -> Path | None:
        if not self.env.is_main or not self.config.samples.prompts:
            return None
        weights = self.sampling_weights()
        unet = UNetModel(self.config.model.unet)
        unet.load_state_dict(ckpt.split_prefix(weights, "unet."))
        text = CLIPTextEncoder(self.config.model.text, tokenizer=self.model.text.tokenizer)
        text.load_state_dict(ckpt.split_prefix(weights, "text."))
        out = self.config.run.out_dir / "samples" / f"step_{self.step:08d}.png"
        return save_sample_grid(out, self.config.samples, unet.eval(), text.eval(), self.vae,
                                self.family, self.config.data.resolution)

    def export(self) -> Path:
        path = self.config.run.out_dir / MODEL_FILE
        if self.env.is_main:
            ckpt.save_model_file(path, self.model_parts(self.sampling_weights()),
                                 self.metadata())
        barrier(self.env)
        return path


def train(config: TrainConfig, *, progress: ProgressCallback | None = None) -> TrainResult:
    """Train (or resume, see ``RunConfig.resume``) a text-to-image model; see the module doc.

    Under torchrun the process group is joined here (and left at the end if joined here).
    """
    env = detect_distributed()
    created = init_distributed(env)
    try:
        return _train(config, env, progress)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def _train(config: TrainConfig, env: DistEnv, progress: ProgressCallback | None) -> TrainResult:
    run = config.run
    resuming = prepare_run_dir(run, ckpt.to_json(config), env)
    r = _Run(config, env)
    last = ckpt.latest_checkpoint(run.out_dir) if resuming else None
    if last is not None:
        r.restore(last)
    metrics = None
    if env.is_main:
        metrics = MetricsCSV(run.out_dir / "metrics.csv", ["loss", "lr", "it_per_s"],
                             r.step if last else None)
    end = min(run.steps, r.step + run.stop_after) if run.stop_after else run.steps
    rate, losses = Rate(), []
    r.model.train()
    with progress_reporter(progress, env, r.step, run.steps, "train") as report:
        while r.step < end:
            loss, lr = r.train_step()
            losses.append(loss)
            speed = rate.tick()
            if metrics and run.log_every and (r.step % run.log_every == 0 or r.step == end):
                metrics.write(r.step, {"loss": loss, "lr": lr, "it_per_s": round(speed, 4)})
            report(ProgressEvent(r.step, run.steps, loss, lr, speed))
            if run.sample_every and r.step % run.sample_every == 0:
                r.save_samples()
            if r.step < end and run.checkpoint_every and r.step % run.checkpoint_every == 0:
                r.save_checkpoint()
    r.save_checkpoint()
    finished = r.step >= run.steps
    path = r.export() if finished else None
    if finished and run.sample_every and r.step % run.sample_every:
        r.save_samples()
    return TrainResult(path, r.step, losses, finished)
