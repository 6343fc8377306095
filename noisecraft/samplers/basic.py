"""Euler-family samplers of the probability-flow ODE / reverse SDE (Karras et al. 2022)."""

from __future__ import annotations

import torch

from noisecraft.diffusion import BoundDenoiser, to_d
from noisecraft.samplers.common import NoiseSource, StepCallback, check_sigmas, report


@torch.no_grad()
def sample_euler(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """Euler's method on dx/dsigma = (x - x0(x, sigma)) / sigma (Karras et al. 2022, Alg. 2
    without churn).  First order.  x: [B, ...] at sigmas[0]; returns x at sigmas[-1]."""
    sigmas = check_sigmas(x, sigmas)
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, sigmas[i] * ones)
        x = x + to_d(x, sigmas[i] * ones, x0) * (sigmas[i + 1] - sigmas[i])
        report(callback, i, sigmas, x, x0)
    return x


SAMPLERS = {"euler": sample_euler}
