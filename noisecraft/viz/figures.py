"""The pictures behind ``noisecraft noise`` and ``noisecraft toy``: load, compute, write.

Arguments are checked here, before any work, and bad ones raise ``ValueError`` with a message
that names the argument and what is allowed (the CLI turns it into exit code 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from noisecraft.schedules import BETA_SCHEDULES, DiscreteSchedule
from noisecraft.viz.plots import eight_plot, schedule_plot, toy_plot
from noisecraft.viz.strip import even_timesteps, fit, forward_strip


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, or raise ValueError saying why it cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image {str(path)!r} does not exist or is not a file")
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(
            f"cannot read {str(path)!r} as an image ({e}); give a PNG, JPEG, WebP or other "
            "format Pillow reads"
        ) from None


def default_plot_path(strip_path: str | Path) -> Path:
    """``strip.png`` -> ``strip_schedule.png`` in the same folder."""
    p = Path(strip_path)
    return p.with_name(f"{p.stem}_schedule.png")


def _check_png(path: Path, what: str) -> None:
    if path.suffix.lower() != ".png":
        raise ValueError(f"{what} is written as PNG; give a path ending in .png, got {str(path)!r}")


def write_noise_figures(
    image_path: str | Path,
    out: str | Path,
    schedule: str = "scaled_linear",
    steps: int = 8,
    seed: int = 0,
    plot: str | Path | None = None,
    max_side: int = 256,
) -> tuple[Path, Path]:
    """Forward-process strip of the image (``steps`` tiles from t=0 to t=T-1) and the schedule's
    alpha_bar / log-SNR plot.  Returns (strip path, plot path)."""
    out = Path(out)
    plot = default_plot_path(out) if plot is None else Path(plot)
    if schedule not in BETA_SCHEDULES:
        allowed = ", ".join(BETA_SCHEDULES)
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: {allowed}")
    if not 2 <= steps <= 64:
        raise ValueError(f"steps (tiles in the strip) must be between 2 and 64, got {steps}")
    _check_png(out, "the strip")
    _check_png(plot, "the schedule plot")
    image = fit(load_image(image_path), max_side)
    table = DiscreteSchedule.from_betas(schedule)
    ts = even_timesteps(steps, table.num_timesteps)
    strip = forward_strip(image, table, ts, torch.Generator().manual_seed(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    strip.save(out, format="PNG")
    return out, schedule_plot([schedule], plot)


@dataclass(frozen=True)
class ToyReport:
    path: Path
    train_seconds: float
    final_loss: float
    sample_mean: list[float]
    sample_std: list[float]
    nn_distance: float  # mean distance from a sample to its nearest data point


def write_toy_figure(
    data: str = "moons",
    out: str | Path = "toy.png",
    sampler: str = "euler",
    steps: int = 50,
    train_steps: int = 2000,
    seed: int = 0,
    n: int = 1000,
    n_paths: int = 12,
) -> ToyReport:
    """Train a toy model, sample it, and draw data vs samples plus reverse trajectories (2-D)
    or the sample histogram plus trajectories (``eight``)."""
    import time

    from noisecraft.samplers import sampler_names
    from noisecraft.toy import DATASETS, mean_nn_distance, sample_toy, train_toy

    out = Path(out)
    if data not in DATASETS:
        raise ValueError(f"unknown toy data set {data!r}; choose one of: {', '.join(DATASETS)}")
    if sampler not in sampler_names():
        allowed = ", ".join(sampler_names())
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {allowed}")
    for name, value in (("steps", steps), ("train_steps", train_steps), ("n", n)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    _check_png(out, "the toy picture")
    start = time.perf_counter()
    model = train_toy(data, train_steps, seed)
    seconds = time.perf_counter() - start
    s = sample_toy(model, n, sampler, steps, seed)
    paths = s.path[:, :n_paths]
    title = f"toy {data}: {train_steps} training steps, {sampler} x {steps} steps, seed {seed}"
    if model.data.shape[1] == 1:
        eight_plot(s.x, paths, s.sigmas, out, title)
    else:
        toy_plot(model.data[:n], s.x, paths, out, title)
    tail = model.losses[-100:]
    return ToyReport(
        out,
        seconds,
        sum(tail) / len(tail),
        s.x.mean(0).tolist(),
        s.x.std(0).tolist(),
        mean_nn_distance(s.x, model.data),
    )
