"""What every sampler shares: the per-step report, noise sources, argument checks."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

NoiseSource = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``noise(sigma, sigma_next) -> standard normal tensor shaped like x`` (a fresh draw per call)."""


@dataclass(frozen=True)
class Step:
    """Reported to the callback after each step i: the state x at sigma_next, and x0 estimate."""

    i: int
    total: int
    sigma: float
    sigma_next: float
    x: torch.Tensor
    x0: torch.Tensor


StepCallback = Callable[[Step], None]


def gaussian_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> NoiseSource:
    """Independent N(0, I) draws shaped like ``like``, from ``generator`` on the CPU.

    Drawing on the CPU and moving the result makes a seed give the same noise on any device
    (the convention diffusers, ComfyUI and AUTOMATIC1111 share for the initial latent).
    """

    def draw(sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        z = torch.randn(like.shape, generator=generator, dtype=torch.float32, device="cpu")
        return z.to(device=like.device, dtype=like.dtype)

    return draw


def check_sigmas(x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Validate a descending sigma list of at least two values; return it on x's device."""
    sigmas = torch.as_tensor(sigmas)
    if sigmas.ndim != 1 or len(sigmas) < 2:
        raise ValueError(
            f"sigmas must be a 1-D list of at least 2 values (steps + 1), got shape "
            f"{tuple(sigmas.shape)}"
        )
    if (sigmas < 0).any() or not torch.isfinite(sigmas).all():
        raise ValueError("sigmas must be finite and >= 0")
    if (sigmas[1:] > sigmas[:-1]).any():
        raise ValueError("sigmas must be in descending order (noisiest first)")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    return sigmas.to(device=x.device, dtype=torch.float64 if x.dtype == torch.float64 else x.dtype)


def report(callback: StepCallback | None, i, sigmas, x, x0) -> None:
    if callback is not None:
        callback(Step(i, len(sigmas) - 1, float(sigmas[i]), float(sigmas[i + 1]), x, x0))


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """Split a step into a deterministic part to sigma_down and fresh noise of std sigma_up.

    sigma_up^2 + sigma_down^2 = sigma_to^2 (k-diffusion ``get_ancestral_step``).
    """
    if not eta or sigma_to == 0:
        return sigma_to, torch.zeros_like(sigma_to)
    up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2).sqrt() * eta
    up = torch.minimum(sigma_to, up)
    down = (sigma_to**2 - up**2).sqrt()
    return down, up
