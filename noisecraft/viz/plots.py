"""Plots of schedules and toy models, drawn with matplotlib's object API on the Agg canvas.

matplotlib is imported inside the functions (importing noisecraft stays cheap) and pyplot is
never used, so no backend or figure registry - global state - is touched.
"""

from __future__ import annotations

from pathlib import Path

import torch

from noisecraft.schedules import BETA_SCHEDULES, DiscreteSchedule


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"plots are written as PNG; give a path ending in .png, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


def schedule_curves(schedule: DiscreteSchedule) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_bar_t, log SNR_t) [T], with SNR = alpha_bar / (1 - alpha_bar) = 1 / sigma^2."""
    return schedule.alphas_cumprod, -2 * schedule.sigmas.log()


def schedule_plot(schedules: list[str], path: str | Path) -> Path:
    """alpha_bar and log-SNR against t for each named beta schedule (1000 timesteps), as a PNG."""
    if not schedules:
        raise ValueError(f"name at least one schedule; choose from: {', '.join(BETA_SCHEDULES)}")
    fig = _figure(9, 3.4)
    ax_a, ax_s = fig.subplots(1, 2)
    for name in schedules:
        alpha_bar, log_snr = schedule_curves(DiscreteSchedule.from_betas(name))
        t = torch.arange(len(alpha_bar))
        ax_a.plot(t.numpy(), alpha_bar.numpy(), label=name)
        ax_s.plot(t.numpy(), log_snr.numpy(), label=name)
    ax_a.set(xlabel="timestep t", ylabel="alpha_bar_t", title="signal kept: alpha_bar_t")
    ax_s.set(xlabel="timestep t", ylabel="log SNR_t", title="log SNR = log(a / (1 - a))")
    for ax in (ax_a, ax_s):
        ax.grid(alpha=0.3)
        ax.legend()
    return _save(fig, path)


def toy_plot(data: torch.Tensor, samples: torch.Tensor, paths: torch.Tensor, path, title=""):
    """2-D toy model: data vs samples (left), reverse trajectories noise -> data (right).

    data [N, 2], samples [M, 2], paths [steps + 1, K, 2] (variance-preserving scale).
    """
    if data.shape[1] != 2:
        raise ValueError(f"toy_plot draws 2-D data, got {data.shape[1]}-D; use eight_plot for 1-D")
    fig = _figure(10, 4.8)
    ax_s, ax_t = fig.subplots(1, 2, sharex=True, sharey=True)
    d, s, p = data.numpy(), samples.numpy(), paths.numpy()
    ax_s.scatter(d[:, 0], d[:, 1], s=3, c="0.6", label="data")
    ax_s.scatter(s[:, 0], s[:, 1], s=3, c="tab:blue", label="generated")
    ax_s.set_title("data vs generated samples")
    ax_s.legend(loc="upper right", markerscale=4)
    ax_t.scatter(d[:, 0], d[:, 1], s=2, c="0.85")
    for k in range(p.shape[1]):
        line = ax_t.plot(p[:, k, 0], p[:, k, 1], lw=1)[0]
        ax_t.scatter(p[0, k, 0], p[0, k, 1], marker="o", s=14, color=line.get_color())
        ax_t.scatter(p[-1, k, 0], p[-1, k, 1], marker="*", s=60, color=line.get_color())
    ax_t.set_title("reverse trajectories: o noise -> * sample")
    for ax in (ax_s, ax_t):
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def eight_plot(samples: torch.Tensor, paths: torch.Tensor, sigmas: torch.Tensor, path, title=""):
    """1-D toy model (every data point is 8): histogram of samples, and trajectories over steps.

    samples [M, 1], paths [steps + 1, K, 1] (variance-preserving scale), sigmas [steps + 1].
    """
    fig = _figure(10, 4)
    ax_h, ax_t = fig.subplots(1, 2)
    x = samples[:, 0].numpy()
    ax_h.hist(x, bins=60, color="tab:blue")
    ax_h.axvline(8.0, color="k", ls="--", lw=1, label="data: every point is 8")
    ax_h.set(
        xlabel="sample value",
        ylabel="count",
        title=f"{len(x)} samples: mean {x.mean():.3f}, std {x.std():.3f}",
    )
    ax_h.legend()
    steps = torch.arange(paths.shape[0]).numpy()
    ax_t.plot(steps, paths[:, :, 0].numpy(), lw=1)
    ax_t.axhline(8.0, color="k", ls="--", lw=1)
    ax_t.set(
        xlabel=f"sampler step (sigma {float(sigmas[0]):.3g} -> {float(sigmas[-1]):.3g})",
        ylabel="x / sqrt(1 + sigma^2)",
        title="reverse trajectories",
    )
    for ax in (ax_h, ax_t):
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return _save(fig, path)
