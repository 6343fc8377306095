"""What every training loop here shares: optimiser and run settings, the learning-rate warm-up,
mixed precision, the data order, data-parallel processes, the metrics CSV and the progress bar.

The diffusion trainer (``trainer.py``) and the VAE trainer (``vae_trainer.py``) both build on it.

Data order.  Sample ``n`` of the stream (counting from 0 over the whole run) is element
``perm_e[n mod N]`` of the data set, where ``perm_e`` is a permutation of the N elements drawn
from a generator seeded with ``(seed, e)`` and ``e = n // N`` the epoch.  So the order is a
pure function of ``(seed, n)``: the only state to save is the counter ``n``.

Precision.  ``"auto"`` trains in bfloat16 autocast when the CPU has native bf16 (AVX512-BF16 or
AMX) and float32 otherwise; weights, optimiser state and EMA stay float32.  Not testable on
this CPU-only machine, and so not implemented: CUDA float16 autocast with a ``GradScaler``
(loss scaling).  On a GPU, bf16 autocast (Ampere and newer) needs no scaler and is what this
code would use.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warm-up, gradient accumulation, clipping, and an optional EMA.

    ``batch_size`` is per process and per micro-step; one optimiser step sees
    ``batch_size * grad_accum * world_size`` samples.  ``ema_decay=None`` turns EMA off.
    ``text_lr_scale`` multiplies ``lr`` for the text encoder's trainable parameters in the
    text-to-image trainers (kohya's separate ``text_encoder_lr``, as a ratio); 1 elsewhere.
    """

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.01
    eps: float = 1e-8
    warmup_steps: int = 0
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    ema_decay: float | None = 0.999
    precision: str = "auto"
    text_lr_scale: float = 1.0

    def __post_init__(self) -> None:
        if not self.text_lr_scale > 0:
            raise ValueError(f"OptimConfig.text_lr_scale={self.text_lr_scale} must be > 0")
        if self.lr <= 0 or self.batch_size < 1 or self.grad_accum < 1 or self.warmup_steps < 0:
            raise ValueError(
                f"OptimConfig: need lr > 0, batch_size >= 1, grad_accum >= 1, warmup_steps >= 0;"
                f" got lr={self.lr}, batch_size={self.batch_size}, grad_accum={self.grad_accum},"
                f" warmup_steps={self.warmup_steps}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}; choose one of {PRECISIONS}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"ema_decay={self.ema_decay} must lie in (0, 1) (or None: no EMA)")


@dataclass(frozen=True)
class RunConfig:
    """Where and how long: the run directory, step count, seed and the periodic work.

    ``resume=True`` continues from the newest checkpoint in ``out_dir`` when there is one (and
    starts fresh otherwise); ``False`` refuses to write into a directory that has checkpoints.
    Intervals of 0 turn that periodic work off (a final checkpoint is always written).
    """

    out_dir: Path = Path("runs/train")
    steps: int = 1000
    seed: int = 0
    checkpoint_every: int = 500
    sample_every: int = 500
    log_every: int = 10
    keep_checkpoints: int = 2
    resume: bool = True
    stop_after: int | None = None
    """Stop (with a checkpoint) after this many steps of THIS invocation: for sessions of a
    limited length, and to test interrupted runs.  None: run to ``steps``."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.steps < 1:
            raise ValueError(f"RunConfig.steps must be >= 1, got {self.steps}")


def lr_at(step: int, optim: OptimConfig) -> float:
    """Linear warm-up from lr / warmup_steps to lr over the first ``warmup_steps``, then flat."""
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    return optim.lr


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled ``lr`` into every param group, times the group's ``lr_scale`` (if any)."""
    for group in opt.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def make_optimizer(params, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over ``params``: tensors, or param-group dicts (a group's ``lr_scale`` multiplies
    the scheduled lr, see :func:`set_lr`)."""
    return torch.optim.AdamW(list(params), lr=optim.lr, betas=optim.betas, eps=optim.eps,
                             weight_decay=optim.weight_decay)


def cpu_has_native_bf16() -> bool:
    """True when this CPU computes bf16 natively (oneDNN reports AVX512-BF16 / AMX support)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "fp32"
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def autocast(precision: str, device: torch.device):
    """The autocast context of a resolved precision (``fp32``: none)."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- data order


def stream_indices(seed: int, count: int, start: int, n: int) -> list[tuple[int, int]]:
    """``(epoch, index)`` of stream positions ``start .. start + n - 1`` (module docstring)."""
    if count < 1:
        raise ValueError("the data set is empty; there is nothing to train on")
    out: list[tuple[int, int]] = []
    pos = start
    while len(out) < n:
        epoch, offset = divmod(pos, count)
        g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(count, generator=g)
        take = min(n - len(out), count - offset)
        out.extend((epoch, i) for i in perm[offset : offset + take].tolist())
        pos += take
    return out


@dataclass(frozen=True)
class DataConfig:
    """Training images: ``source`` is ``"shapes"`` (procedural, ``shapes_count`` of them) or
    an image folder with captions (see ``noisecraft.training.datasets``).

    ``random_crop`` / ``random_flip`` are the data set's augmentations (folders: random crop of
    the resized image; shapes: flips with captions mirrored).  ``caption_dropout`` is the
    probability of training on the empty caption, so classifier-free guidance has an
    unconditional model to push away from.
    """

    source: str = "shapes"
    resolution: int = 128
    random_crop: bool = True
    random_flip: bool = True
    caption_dropout: float = 0.1
    shapes_count: int = 100_000
    seed: int = 0
    shapes_partial_captions: float = 0.0
    """Shapes only: probability of leaving each of size, position and background out of a
    caption ("a red circle"), so the model also learns the short prompts people type."""

    def __post_init__(self) -> None:
        for name in ("caption_dropout", "shapes_partial_captions"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must lie in [0, 1]")
        if self.resolution < 8:
            raise ValueError(f"resolution={self.resolution} is too small; use e.g. 64 or 128")


def open_dataset(data: DataConfig):
    """The torch data set of ``data``; bad folders raise ``datasets.DatasetError``."""
    from noisecraft.training.datasets import ImageFolderDataset, ImageTransform, ShapesTorchDataset

    if data.source == "shapes":
        return ShapesTorchDataset(data.shapes_count, data.resolution, data.seed,
                                  flip=data.random_flip,
                                  partial_captions=data.shapes_partial_captions)
    transform = ImageTransform(data.resolution, "random" if data.random_crop else "center",
                               data.random_flip)
    return ImageFolderDataset(data.source, transform, seed=data.seed)


def load_batch(dataset, seed: int, start: int, n: int) -> tuple[torch.Tensor, list[str]]:
    """Stream positions ``start .. start + n - 1`` as (images [n, 3, H, W], captions)."""
    items = [dataset.with_epoch(e)[i] for e, i in stream_indices(seed, len(dataset), start, n)]
    return torch.stack([image for image, _ in items]), [caption for _, caption in items]


# ----------------------------------------------------------------------------- run directory


def prepare_run_dir(run: RunConfig, config_json: str, env: DistEnv,
                    defaults: dict | None = None) -> bool:
    """Create ``run.out_dir`` and record the config; True when there is a checkpoint to resume.

    Refuses (with the way out) to resume a run whose recorded config differs, or to start over
    in a directory that has checkpoints when ``resume`` is off. A setting the recorded config
    lacks (the run predates it) counts as its default from ``defaults``
    (``state.field_defaults(config)``), so new options do not strand older runs.
    """
    import json

    from noisecraft.training.state import latest_checkpoint

    out = run.out_dir
    ckpt = latest_checkpoint(out) if out.exists() else None
    if ckpt is not None and not run.resume:
        raise FileExistsError(
            f"{out} already holds a training run (checkpoint {ckpt.name}); resume it, or choose "
            "another output directory"
        )
    recorded = out / "config.json"
    if ckpt is not None and recorded.exists():
        before, now = json.loads(recorded.read_text()), json.loads(config_json)
        ignore = {"steps", "stop_after", "resume", "out_dir", "checkpoint_every", "sample_every",
                  "log_every", "keep_checkpoints"}
        diff = sorted(_config_diff(before, now, ignore, defaults=defaults or {}))
        if diff:
            raise ValueError(
                f"cannot resume {out}: its config differs from this one in {', '.join(diff)}; "
                "use the same settings (only steps and the intervals may change) or a new "
                "output directory"
            )
    barrier(env)
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        recorded.write_text(config_json + "\n")
    barrier(env)
    return ckpt is not None


def _config_diff(a, b, ignore: set[str], path: str = "", defaults=None) -> list[str]:
    """Dotted paths where recorded ``a`` and current ``b`` differ; a key ``a`` lacks is read
    as its value in ``defaults`` (same shape) when that has one."""
    defaults = defaults if isinstance(defaults, dict) else {}
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            if key in ignore:
                continue
            old = a[key] if key in a else _default_of(defaults, key, b.get(key))
            out += _config_diff(old, b.get(key), ignore, f"{path}{key}.", defaults.get(key))
        return out
    return [] if a == b else [path.rstrip(".")]


def _default_of(defaults: dict, key: str, current):
    """What a config recorded without ``key`` meant: its default (a nested config: {} so each
    of its fields is read as its default in turn), else None."""
    if key not in defaults:
        return None
    return {} if isinstance(defaults[key], dict) and isinstance(current, dict) else defaults[key]


# ----------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class DistEnv:
    """This process's place in a data-parallel run (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect_distributed(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read torchrun's ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (absent: a single process)."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv()
    return DistEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", env["RANK"])))


def init_distributed(env: DistEnv) -> bool:
    """Join the process group (gloo on CPU, nccl on CUDA); True if this call created it."""
    if not env.distributed or dist.is_initialized():
        return False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size)
    return True


def barrier(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.barrier()


def mean_across(value: float, env: DistEnv) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t.item()) / env.world_size


# ----------------------------------------------------------------------------- metrics, progress


class MetricsCSV:
    """``metrics.csv`` with one row per logged step.  On resume, rows after the resumed step are
    dropped, so a resumed run's file equals an uninterrupted one's."""

    def __init__(self, path: Path, columns: list[str], resume_step: int | None):
        self.path, self.columns = Path(path), ["step", *columns]
        rows = []
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, self.columns)
            writer.writeheader()
            writer.writerows(rows)

    def write(self, step: int, values: Mapping[str, float]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, self.columns).writerow({"step": step, **values})


@dataclass
class ProgressEvent:
    """Reported after each optimiser step (``progress`` callback of ``train``)."""

    step: int
    total: int
    loss: float
    lr: float
    it_per_s: float
    extra: dict[str, float] = field(default_factory=dict)


ProgressCallback = Callable[[ProgressEvent], None]


@contextlib.contextmanager
def progress_reporter(
    callback: ProgressCallback | None, env: DistEnv, start: int, total: int, desc: str
) -> Iterator[ProgressCallback]:
    """The given callback, or (main process only) a tqdm bar showing step, loss and it/s."""
    if callback is not None or not env.is_main:
        yield callback or (lambda event: None)
        return
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc=desc, dynamic_ncols=True, mininterval=1.0)

    def show(event: ProgressEvent) -> None:
        bar.update(event.step - bar.n)
        bar.set_postfix(loss=f"{event.loss:.4f}", lr=f"{event.lr:.2e}", refresh=False)

    try:
        yield show
    finally:
        bar.close()


class Rate:
    """Optimiser steps per second over this invocation."""

    def __init__(self) -> None:
        self.t0, self.n = time.perf_counter(), 0

    def tick(self) -> float:
        self.n += 1
        return self.n / max(time.perf_counter() - self.t0, 1e-9)


def grad_norm_clip(params, max_norm: float | None) -> float:
    params = [p for p in params if p.grad is not None]
    if max_norm is None:
        return math.nan
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
