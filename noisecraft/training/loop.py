"""One optimiser step of text-to-image diffusion training, and the loop of steps around it.

Shared by the trainers that optimise a U-Net + text encoder on captioned images: the
full-model trainer (``trainer.py``: the networks from scratch) and the LoRA trainer
(``lora_train.py``: low-rank adapters on a loaded checkpoint).  What is trained is whatever
parameters of :class:`TextToImage` have ``requires_grad``; a subclass of :class:`DiffusionRun`
says which module's state is saved for resume and how the model file, samples and final export
are written.

One optimiser step (Ho et al. 2020, Alg. 1, in the sigma notation of ``diffusion.py``)::

    captions -> "" with probability caption_dropout            (so CFG has an unconditional model)
    x0 = images (pixel) | latent_format.process_in(VAE.encode(images).sample())   (latent)
    t ~ U{0 .. T-1};  sigma = schedule.sigmas[t];  noise ~ N(0, I)
    output = unet(x0 + sigma * noise) / sqrt(1 + sigma^2), t, text_encoder(captions))
    loss = mean_b  w(sigma_b) * mean(m * (output - target)^2)

with ``target`` the eps or v of ``diffusion.training_target``, ``w`` 1 or the min-SNR-gamma
weight (Hang et al. 2023) and ``m`` 1 or the foreground weights of ``weighting.py``.
AdamW with linear warm-up, gradient accumulation, clipping and an optional EMA of the trained
weights (``runtime.py``, ``ema.py``).  Checkpoints and exact resume:
``state.py``.  Data-parallel: under ``torchrun --nproc_per_node N`` (DDP, gloo on CPU) each
process takes its share of every batch and only process 0 writes files.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from noisecraft.diffusion import add_noise, append_dims, min_snr_weight, training_target
from noisecraft.models.latent_formats import LatentFormat
from noisecraft.schedules import DiscreteSchedule
from noisecraft.training import state as ckpt
from noisecraft.training.ema import EMA
from noisecraft.training.runtime import (
    DistEnv,
    MetricsCSV,
    OptimConfig,
    ProgressCallback,
    ProgressEvent,
    Rate,
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
    set_lr,
)
from noisecraft.training.weighting import foreground_weights


@dataclass(frozen=True)
class ObjectiveConfig:
    """Prediction type, loss weighting and the training noise schedule (SD's by default).

    ``zero_terminal_snr`` rescales the schedule so its last step is pure noise (Lin et al. 2023,
    diffusers' ``rescale_betas_zero_snr``). Without it SD's last step keeps 7% of the image,
    and a model learns to read the image's low frequencies (background colour, where the shape
    is) from the initial noise rather than from the prompt - at sampling time that "signal"
    is the seed's, so the prompt loses. It needs ``prediction="v"`` (eps says nothing about
    the image at zero SNR). Models trained with it record it in their family, and samplers
    then start from the last step.

    ``foreground_weight`` > 0 weighs the error at the latent cells over an image's object
    (pixels away from its median colour by more than ``foreground_threshold``, see
    :func:`noisecraft.training.weighting.foreground_weights`) up to ``1 + foreground_weight``:
    for mostly-flat images whose object covers a few percent of the latent."""

    prediction: str = "eps"
    min_snr_gamma: float | None = None
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    zero_terminal_snr: bool = False
    foreground_weight: float = 0.0
    foreground_threshold: float = 0.1

    def __post_init__(self) -> None:
        for name in ("foreground_weight", "foreground_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"ObjectiveConfig.{name}={getattr(self, name)} must be >= 0")
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"prediction={self.prediction!r}; the trainer supports 'eps', 'v'")
        if self.zero_terminal_snr and self.prediction != "v":
            raise ValueError("zero_terminal_snr=True needs prediction='v': at zero SNR the noise"
                             " is the whole input, so an eps target teaches nothing")
        if self.min_snr_gamma is not None and self.min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma} must be > 0 (e.g. 5), or None")


@dataclass
class TrainResult:
    """``model_path``: the exported file (None while the run is unfinished)."""

    model_path: Path | None
    step: int
    losses: list[float] = field(default_factory=list)
    finished: bool = True


class TextToImage(nn.Module):
    """The networks one step runs, as one module (what DDP wraps): ``unet`` and ``text``."""

    def __init__(self, unet: nn.Module, text: nn.Module):
        super().__init__()
        self.unet, self.text = unet, text

    def forward(self, x_in, timesteps, ids):
        context, _ = self.text(ids)
        return self.unet(x_in, timesteps, context)


def param_groups(text_encoder: nn.Module, trainable: list[nn.Parameter], optim: OptimConfig
                 ) -> list[dict]:
    """``trainable`` as AdamW groups: the U-Net's (and anything else) at the
    scheduled lr, the text encoder's at ``optim.text_lr_scale`` times it. A text encoder trained
    from scratch next to a U-Net learns its token embeddings far slower than the U-Net learns
    to denoise (each Adam step moves a weight by about lr), so a from-scratch model may want a
    larger text lr; empty groups are left out. At scale 1, one group (as checkpoints written
    before the option hold, so they still resume)."""
    text = {id(p) for p in text_encoder.parameters()}
    if optim.text_lr_scale == 1.0:
        return [{"params": trainable}]
    groups = [{"params": [p for p in trainable if id(p) not in text], "lr_scale": 1.0},
              {"params": [p for p in trainable if id(p) in text],
               "lr_scale": float(optim.text_lr_scale)}]
    return [g for g in groups if g["params"]]


# ----------------------------------------------------------------------------- the loss


def drop_captions(captions: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Each caption replaced by "" with probability p (one uniform draw per caption)."""
    keep = torch.rand(len(captions), generator=generator) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist(), strict=True)]


def diffusion_loss(
    model: nn.Module, x0: torch.Tensor, ids: torch.Tensor, objective: ObjectiveConfig,
    schedule: DiscreteSchedule, generator: torch.Generator,
    pixel_weights: torch.Tensor | float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, per-sample weighted losses [B]) for clean x0 [B, C, H, W] and token ids [B, 77].

    ``model(x_in, t, ids)`` sees the VP input ``x / sqrt(1 + sigma^2)`` (Denoiser's
    convention) at integer timesteps t drawn uniformly from the schedule.  ``pixel_weights``
    ([B, 1, H, W] or a scalar) multiply the squared error before its mean.
    """
    b = x0.shape[0]
    t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator)
    sigma = schedule.sigmas[t].to(torch.float32)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    x = add_noise(x0, noise, sigma)
    x_in = x / append_dims((1 + sigma**2).sqrt(), x.ndim)
    out = model(x_in, t.to(torch.float32), ids).float()
    target = training_target(objective.prediction, x0, noise, sigma)
    per_sample = (pixel_weights * (out - target).pow(2)).mean(dim=tuple(range(1, x0.ndim)))
    if objective.min_snr_gamma is not None:
        per_sample = per_sample * min_snr_weight(sigma, objective.prediction,
                                                 objective.min_snr_gamma)
    return per_sample.mean(), per_sample.detach()


@torch.no_grad()
def to_x0(images: torch.Tensor, vae: nn.Module | None, latent: LatentFormat,
          generator: torch.Generator, precision: str) -> torch.Tensor:
    """Training targets x0: the images (pixel space) or a sample of their VAE latents."""
    if vae is None:
        return images
    with autocast(precision, images.device):
        post = vae.encode(images)
    z = post.mean.float() + post.std.float() * torch.randn(post.mean.shape, generator=generator)
    return latent.process_in(z)


def tokenize(text: nn.Module, captions: list[str]) -> torch.Tensor:
    """Token ids [B, 77] of captions (cut at 77 tokens; no prompt-weighting syntax)."""
    return torch.tensor([text.tokenizer(c) for c in captions], dtype=torch.long)


# ----------------------------------------------------------------------------- one run


class DiffusionRun(ABC):
    """The state of one invocation of a trainer: built once, then stepped by
    :func:`run_training`.

    The base class owns the optimiser (over ``model``'s parameters with ``requires_grad``), the
    optional EMA, the data stream, the noise generator and the step counters. Subclasses pass
    ``trained`` (the module whose state dict a checkpoint keeps for resume: the whole model, or
    only the LoRA network) and implement :meth:`write_model_file`, :meth:`save_samples` and
    :meth:`export`.
    """

    def __init__(self, config, env: DistEnv, model: TextToImage, trained: nn.Module, *,
                 vae: nn.Module | None, latent: LatentFormat, schedule: DiscreteSchedule,
                 objective: ObjectiveConfig):
        self.config, self.env, self.model, self.trained = config, env, model, trained
        self.vae, self.latent, self.schedule, self.objective = vae, latent, schedule, objective
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.opt = make_optimizer(param_groups(model.text, self.trainable, config.optim),
                                  config.optim)
        self.ema = EMA(model, config.optim.ema_decay) if config.optim.ema_decay else None
        self.gen = torch.Generator().manual_seed(config.run.seed * 1000 + env.rank + 1)
        self.dataset = open_dataset(config.data)
        if hasattr(self.dataset, "verify") and env.is_main:
            self.dataset.verify()  # a bad image fails now, naming the file, not hours in
        self.step, self.seen = 0, 0
        self.precision = resolve_precision(config.optim.precision, torch.device("cpu"))
        self.ddp = model
        if env.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(model)

    # --------------------------------------------------------------------- for subclasses

    @abstractmethod
    def write_model_file(self, directory: Path) -> None:
        """Write the checkpoint's usable model file into ``directory`` (main process only)."""

    @abstractmethod
    def save_samples(self) -> Path | None:
        """Write the sample grid of the current step (main process); its path, or None."""

    @abstractmethod
    def export(self) -> Path:
        """Write the finished run's output file; its path."""

    def extra_state(self) -> dict[str, Any]:
        """JSON-able values a checkpoint keeps besides tensors (read back by :meth:`restore`)."""
        return {"seen": self.seen}

    # --------------------------------------------------------------------- stepping

    def restore(self, path: Path) -> dict[str, Any]:
        """Continue from checkpoint directory ``path``; returns what ``load_state`` read."""
        saved = ckpt.load_state(path / "state.safetensors")
        self.trained.load_state_dict(saved["trained"])
        self.opt.load_state_dict(saved["optimizer"])
        if self.ema is not None:
            self.ema.load_state_dict(saved["ema"])
        ckpt.load_rng(path / f"rng_rank{self.env.rank}.safetensors", {"noise": self.gen})
        self.step, self.seen = saved["step"], saved["extra"]["seen"]
        return saved

    def micro_batch(self) -> tuple[torch.Tensor, list[str]]:
        b, world = self.config.optim.batch_size, self.env.world_size
        start = self.seen + self.env.rank * b
        self.seen += b * world
        return load_batch(self.dataset, self.config.data.seed, start, b)

    def train_step(self) -> tuple[float, float]:
        """One optimiser step over ``grad_accum`` micro-batches; (mean loss, lr used)."""
        optim = self.config.optim
        lr = lr_at(self.step, optim)
        set_lr(self.opt, lr)
        total = 0.0
        for k in range(optim.grad_accum):
            images, captions = self.micro_batch()
            captions = drop_captions(captions, self.config.data.caption_dropout, self.gen)
            x0 = to_x0(images, self.vae, self.latent, self.gen, self.precision)
            ids = tokenize(self.model.text, captions)
            weights = foreground_weights(images, self.objective.foreground_weight,
                                         self.objective.foreground_threshold, x0.shape[-2:])
            sync = k == optim.grad_accum - 1 or not self.env.distributed
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()):
                with autocast(self.precision, x0.device):
                    loss, _ = diffusion_loss(self.ddp, x0, ids, self.objective, self.schedule,
                                             self.gen, weights)
                (loss / optim.grad_accum).backward()
            total += loss.item() / optim.grad_accum
        grad_norm_clip(self.trainable, optim.max_grad_norm)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return mean_across(total, self.env), lr

    def save_checkpoint(self) -> None:
        run = self.config.run
        path = ckpt.checkpoint_dir(run.out_dir, self.step)
        if self.env.is_main:
            path.mkdir(parents=True, exist_ok=True)
            self.write_model_file(path)
            ckpt.save_state(path / "state.safetensors", step=self.step,
                            trained=self.trained.state_dict(), optimizer=self.opt,
                            ema=None if self.ema is None else self.ema.state_dict(),
                            extra=self.extra_state())
        barrier(self.env)
        ckpt.save_rng(path / f"rng_rank{self.env.rank}.safetensors", {"noise": self.gen})
        barrier(self.env)
        if self.env.is_main:
            ckpt.commit_checkpoint(run.out_dir, self.step, run.keep_checkpoints)


# ----------------------------------------------------------------------------- the loop

RunFactory = Callable[[Any, DistEnv], DiffusionRun]


def train_processes(config, make_run: RunFactory, progress: ProgressCallback | None,
                    desc: str) -> TrainResult:
    """:func:`run_training` in this process; under torchrun the process group is joined here
    (and left at the end if joined here)."""
    env = detect_distributed()
    created = init_distributed(env)
    try:
        return run_training(config, env, progress, make_run, desc)
    finally:
        if created:
            torch.distributed.destroy_process_group()


def run_training(config, env: DistEnv, progress: ProgressCallback | None,
                 make_run: RunFactory, desc: str = "train") -> TrainResult:
    """Build the run, resume from ``config.run.out_dir``'s newest checkpoint if there is one,
    step to ``run.steps`` (or ``run.stop_after`` steps), writing metrics, samples and
    checkpoints at their intervals; a last checkpoint always, and the export when finished."""
    run = config.run
    resuming = prepare_run_dir(run, ckpt.to_json(config), env,
                               defaults=ckpt.field_defaults(config))
    r = make_run(config, env)
    last = ckpt.latest_checkpoint(run.out_dir) if resuming else None
    if last is not None:
        r.restore(last)
    metrics = None
    if env.is_main:
        metrics = MetricsCSV(run.out_dir / "metrics.csv", ["loss", "lr", "it_per_s"],
                             r.step if last else None)
    end = min(run.steps, r.step + run.stop_after) if run.stop_after else run.steps
    rate, losses = Rate(), []
    with progress_reporter(progress, env, r.step, run.steps, desc) as report:
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
