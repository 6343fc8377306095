"""Training an AutoencoderKL (the latent diffusion VAE) from scratch.

Loss (Rombach et al. 2022, sec. 3, without the perceptual and GAN terms, which a CPU budget
cannot afford and flat-coloured shapes do not need)::

    l1 * |x - D(z)|  +  l2 * (x - D(z))^2  +  kl * KL(q(z|x) || N(0, I)) / (3 H W)

with ``z`` sampled from the posterior and every term a mean over image elements, so ``kl`` is
on LDM's scale (1e-6 there).  Images are random ``crop`` x ``crop`` windows of the
``resolution`` images (the VAE is convolutional: training on crops costs a quarter of the
compute at crop = resolution / 2 and generalises to the full size).

After the last step the latent scaling factor is measured as ``1 / std`` of posterior samples
of ``scale_images`` held-out training images (Rombach et al. 2022, sec. 4.3.2 / app. D.1: SD's
0.18215), and written into the model file's metadata.

Output: ``RUN_DIR/vae.safetensors`` with ``first_stage_model.*`` keys and metadata
``noisecraft.vae_config`` and ``noisecraft.scaling_factor``; checkpoints and metrics as in
``trainer.py`` (see ``state.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from noisecraft.models.vae import AutoencoderKL, VAEConfig
from noisecraft.training import state as ckpt
from noisecraft.training.ema import EMA
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
    grad_norm_clip,
    load_batch,
    lr_at,
    make_optimizer,
    open_dataset,
    prepare_run_dir,
    progress_reporter,
    resolve_precision,
    set_lr,
)
from noisecraft.training.weighting import foreground_weights

VAE_FILE = "vae.safetensors"


@dataclass(frozen=True)
class VAELossConfig:
    """Loss weights. ``foreground_weight`` > 0 multiplies the L1/L2 terms of every pixel that
    differs from its image's median colour (by more than ``foreground_threshold``, summed over
    channels in [-1, 1] units) by ``1 + foreground_weight``: on images that are mostly flat
    background (the shapes data) the unweighted mean is nearly all background, and the VAE
    learns the background long before the small objects (session 2 measured it)."""

    l1: float = 1.0
    l2: float = 1.0
    kl: float = 1e-5
    foreground_weight: float = 0.0
    foreground_threshold: float = 0.1

    def __post_init__(self) -> None:
        for name in ("l1", "l2", "kl", "foreground_weight", "foreground_threshold"):
            if getattr(self, name) < 0:
                raise ValueError(f"VAELossConfig.{name}={getattr(self, name)} must be >= 0")


@dataclass(frozen=True)
class VAETrainConfig:
    """A VAE run: architecture, data (``crop`` = training window), loss, optimiser, run."""

    vae: VAEConfig = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=128)
    data: DataConfig = DataConfig(caption_dropout=0.0)
    crop: int | None = 64
    loss: VAELossConfig = VAELossConfig()
    optim: OptimConfig = OptimConfig(lr=2e-4, batch_size=8, ema_decay=None)
    run: RunConfig = RunConfig(out_dir=Path("runs/vae"))
    scale_images: int = 256
    init_weights: Path | None = None
    """Start a new run from these VAE weights (a ``vae.safetensors`` or a checkpoint's
    ``model.safetensors``) instead of random ones; ignored when resuming a checkpoint."""

    def __post_init__(self) -> None:
        f = self.vae.downscale_factor
        if self.crop is not None and (self.crop > self.data.resolution or self.crop % f):
            raise ValueError(
                f"VAETrainConfig.crop={self.crop} must be <= the resolution "
                f"{self.data.resolution} and a multiple of the VAE's downscale factor {f}"
            )


@dataclass
class VAETrainResult:
    model_path: Path
    step: int
    scaling_factor: float | None
    losses: list[float] = field(default_factory=list)
    finished: bool = True


def vae_loss(vae: AutoencoderKL, x: torch.Tensor, loss: VAELossConfig,
             generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss of one batch x [B, 3, H, W] in [-1, 1], and its parts."""
    posterior = vae.encode(x)
    z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator,
                                                     dtype=posterior.mean.dtype)
    diff = vae.decode(z).float() - x
    w = pixel_weights(x, loss)
    l1, l2 = (w * diff.abs()).mean(), (w * diff.pow(2)).mean()
    kl = posterior.kl().float().mean() / x[0].numel()
    total = loss.l1 * l1 + loss.l2 * l2 + loss.kl * kl
    return total, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def pixel_weights(x: torch.Tensor, loss: VAELossConfig) -> torch.Tensor | float:
    """[B, 1, H, W] per-pixel loss weights of x (see :class:`VAELossConfig`), or 1.0."""
    return foreground_weights(x, loss.foreground_weight, loss.foreground_threshold)


def random_crops(x: torch.Tensor, size: int | None, generator: torch.Generator) -> torch.Tensor:
    """One random ``size`` x ``size`` window per image of x [B, C, H, W]."""
    if size is None or size == x.shape[-1] == x.shape[-2]:
        return x
    h, w = x.shape[-2:]
    tops = torch.randint(0, h - size + 1, (x.shape[0],), generator=generator).tolist()
    lefts = torch.randint(0, w - size + 1, (x.shape[0],), generator=generator).tolist()
    return torch.stack([img[:, t : t + size, l : l + size]
                        for img, t, l in zip(x, tops, lefts, strict=True)])


@torch.no_grad()
def measure_scaling_factor(vae: AutoencoderKL, images: torch.Tensor,
                           generator: torch.Generator, batch: int = 32) -> float:
    """1 / std of posterior samples of ``images`` [N, 3, H, W] (LDM's latent scaling)."""
    samples = []
    for chunk in images.split(batch):
        post = vae.encode(chunk)
        samples.append(post.mean + post.std * torch.randn(post.mean.shape, generator=generator))
    return float(1.0 / torch.cat(samples).float().std())


def train_vae(config: VAETrainConfig, *, progress: ProgressCallback | None = None
              ) -> VAETrainResult:
    """Train (or resume) a VAE run; see the module docstring.  Single process."""
    run, optim, env = config.run, config.optim, DistEnv()
    resuming = prepare_run_dir(run, ckpt.to_json(config), env,
                               defaults=ckpt.field_defaults(config))
    torch.manual_seed(run.seed)
    vae = AutoencoderKL(config.vae)
    if config.init_weights is not None and not resuming:
        vae.load_state_dict(_init_state(Path(config.init_weights), config.vae))
    opt = make_optimizer(vae.parameters(), optim)
    ema = EMA(vae, optim.ema_decay) if optim.ema_decay else None
    gen = torch.Generator().manual_seed(run.seed + 1)
    dataset = open_dataset(config.data)
    step, seen = 0, 0
    last = ckpt.latest_checkpoint(run.out_dir) if resuming else None
    if last is not None:
        saved = ckpt.load_state(last / "state.safetensors")
        vae.load_state_dict(saved["trained"])
        opt.load_state_dict(saved["optimizer"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        ckpt.load_rng(last / "rng_rank0.safetensors", {"noise": gen})
        step, seen = saved["step"], saved["extra"]["seen"]
    metrics = MetricsCSV(run.out_dir / "metrics.csv", ["loss", "l1", "l2", "kl", "lr"],
                         step if last else None)
    precision = resolve_precision(optim.precision, torch.device("cpu"))
    end = min(run.steps, step + run.stop_after) if run.stop_after else run.steps
    rate, losses = Rate(), []
    vae.train()
    with progress_reporter(progress, env, step, run.steps, "vae") as report:
        while step < end:
            lr = lr_at(step, optim)
            set_lr(opt, lr)
            total, parts = 0.0, {"l1": 0.0, "l2": 0.0, "kl": 0.0}
            for _ in range(optim.grad_accum):
                images, _ = load_batch(dataset, config.data.seed, seen, optim.batch_size)
                seen += optim.batch_size
                x = random_crops(images, config.crop, gen)
                with autocast(precision, x.device):
                    loss, p = vae_loss(vae, x, config.loss, gen)
                (loss / optim.grad_accum).backward()
                total += loss.item() / optim.grad_accum
                parts = {k: parts[k] + p[k] / optim.grad_accum for k in parts}
            grad_norm_clip(vae.parameters(), optim.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(vae)
            step += 1
            losses.append(total)
            if run.log_every and (step % run.log_every == 0 or step == end):
                metrics.write(step, {"loss": total, **parts, "lr": lr})
            report(ProgressEvent(step, run.steps, total, lr, rate.tick(), parts))
            if step < end and run.checkpoint_every and step % run.checkpoint_every == 0:
                _save(run, step, seen, vae, opt, ema, gen, config)
    _save(run, step, seen, vae, opt, ema, gen, config)
    scale = None
    if step >= run.steps:
        scale = _export(config, vae, ema, dataset)
    return VAETrainResult(run.out_dir / VAE_FILE, step, scale, losses, step >= run.steps)


def _weights(vae: AutoencoderKL, ema: EMA | None) -> dict[str, torch.Tensor]:
    return ema.averaged_state_dict(vae) if ema is not None else vae.state_dict()


def _save(run, step, seen, vae, opt, ema, gen, config) -> None:
    path = ckpt.checkpoint_dir(run.out_dir, step)
    path.mkdir(parents=True, exist_ok=True)
    ckpt.save_model_file(path / "model.safetensors", {ckpt.VAE_PREFIX: _weights(vae, ema)},
                         {"noisecraft.vae_config": config.vae})
    ckpt.save_state(path / "state.safetensors", step=step, trained=vae.state_dict(),
                    optimizer=opt, ema=None if ema is None else ema.state_dict(),
                    extra={"seen": seen})
    ckpt.save_rng(path / "rng_rank0.safetensors", {"noise": gen})
    ckpt.commit_checkpoint(run.out_dir, step, run.keep_checkpoints)


def _export(config: VAETrainConfig, vae: AutoencoderKL, ema: EMA | None, dataset) -> float:
    """Write ``vae.safetensors`` with the measured scaling factor; return the factor."""
    final = AutoencoderKL(config.vae)
    final.load_state_dict(_weights(vae, ema))
    final.eval()
    n = min(config.scale_images, len(dataset))
    images, _ = load_batch(dataset, config.data.seed + 7919, 0, n)
    scale = measure_scaling_factor(final, images, torch.Generator().manual_seed(0))
    ckpt.save_model_file(config.run.out_dir / VAE_FILE, {ckpt.VAE_PREFIX: final.state_dict()},
                         {"noisecraft.vae_config": config.vae, "noisecraft.scaling_factor": scale})
    return scale


def _init_state(path: Path, vae: VAEConfig) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"VAETrainConfig.init_weights={path} does not exist")
    loaded, _ = load_vae_file(path)
    if loaded.config != vae:
        raise ValueError(f"init_weights {path} holds a VAE with config {loaded.config}, but this "
                         f"run trains {vae}; they must match")
    return loaded.state_dict()


def load_vae_file(path: Path) -> tuple[AutoencoderKL, float | None]:
    """A VAE written by :func:`train_vae` (or any file with ``first_stage_model.*`` keys and
    ``noisecraft.vae_config`` metadata), in eval mode, float32; and its scaling factor."""
    from safetensors.torch import load_file

    meta = ckpt.read_metadata(path)
    if "noisecraft.vae_config" not in meta:
        raise ValueError(f"{path} has no noisecraft.vae_config metadata; was it written by "
                         "noisecraft's VAE trainer?")
    cfg = meta["noisecraft.vae_config"]
    vae = AutoencoderKL(VAEConfig(**{**cfg, "ch_mult": tuple(cfg["ch_mult"])}))
    sd = ckpt.split_prefix(load_file(str(path)), ckpt.VAE_PREFIX)
    vae.load_state_dict({k: v.float() for k, v in sd.items()})
    return vae.eval(), meta.get("noisecraft.scaling_factor")
