"""What the learning view (``/learn``) asks the server for: a schedule as a table, and one
image through the forward process.  Both are computed by the library (:mod:`noisecraft.
schedules`, :mod:`noisecraft.viz.strip`); the page only draws them."""

from __future__ import annotations

import base64
import io
import math
from typing import Any

import torch
from PIL import Image

from noisecraft.schedules import BETA_SCHEDULES, DiscreteSchedule, spacing_sigmas
from noisecraft.viz.strip import fit, forward_process, pil_to_tensor, tensor_to_pil

MAX_FRAMES = 41
MAX_SIDE = 256


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def schedule_table(schedule: str = "scaled_linear", steps: int = 20,
                   spacing: str = "normal") -> dict[str, Any]:
    """alpha_bar_t, sigma_t and log10 SNR_t for t = 0..T-1, and the sigmas a sampling run of
    ``steps`` steps with ``spacing`` visits (with their continuous timesteps)."""
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: "
                         f"{', '.join(BETA_SCHEDULES)}")
    if not 1 <= steps <= 1000:
        raise ValueError(f"steps must lie in [1, 1000], got {steps}")
    table = DiscreteSchedule.from_betas(schedule)
    ac = table.alphas_cumprod
    run = spacing_sigmas(spacing, table, steps)
    positive = run[run > 0]
    run_t = table.sigma_to_t(positive).tolist() + [0.0] * (len(run) - len(positive))
    return {
        "schedule": schedule, "spacing": spacing, "steps": steps,
        "num_timesteps": table.num_timesteps,
        "alphas_cumprod": [round(float(a), 8) for a in ac],
        "sigmas": [round(float(s), 6) for s in table.sigmas],
        "log10_snr": [round(float(v), 5) for v in (ac / (1 - ac)).log10()],
        "run_sigmas": [round(float(s), 6) for s in run],
        "run_timesteps": [round(float(t), 3) for t in run_t],
    }


def forward_frames(image: Image.Image, schedule: str = "scaled_linear", frames: int = 21,
                   seed: int = 0) -> dict[str, Any]:
    """``image`` noised to ``frames`` evenly spaced timesteps with one noise draw
    (x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps, Ho et al. 2020 eq. 4) as base64 PNGs."""
    if schedule not in BETA_SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of: "
                         f"{', '.join(BETA_SCHEDULES)}")
    if not 2 <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must lie in [2, {MAX_FRAMES}], got {frames}")
    table = DiscreteSchedule.from_betas(schedule)
    T = table.num_timesteps
    ts = [round(i * (T - 1) / (frames - 1)) for i in range(frames)]
    small = fit(image.convert("RGB"), MAX_SIDE)
    xs = forward_process(pil_to_tensor(small), table, ts,
                         torch.Generator().manual_seed(int(seed)))
    ac = table.alphas_cumprod
    out = []
    for t, x in zip(ts, xs, strict=True):
        buf = io.BytesIO()
        tensor_to_pil(x).save(buf, format="PNG")
        a = float(ac[t])
        out.append({"t": t, "alpha_bar": a, "snr": _finite(a / (1 - a)),
                    "image": base64.b64encode(buf.getvalue()).decode("ascii")})
    return {"schedule": schedule, "frames": out}
