"""Samplers born on discrete-time (variance-preserving) models: DDIM, DDPM, LCM.

Each is written in the VE notation x = x0 + sigma * eps, where a VP state is
x_t = x / sqrt(1 + sigma^2) and alpha_bar = 1 / (1 + sigma^2); the updates below are the
papers' updates rewritten in that notation, step for step, so they run on any descending
sigmas (any spacing, part-way runs ending above 0) and agree with diffusers' DDIMScheduler,
DDPMScheduler and LCMScheduler on the same sigmas (tests/samplers/test_discrete_parity.py).

x: [B, ...] at sigmas[0]; sigmas: [steps + 1] descending; each returns x at sigmas[-1].
"""

from __future__ import annotations

import torch

from noisecraft.diffusion import BoundDenoiser
from noisecraft.samplers.common import (
    NoiseSource,
    StepCallback,
    ancestral_step,
    check_sigmas,
    gaussian_noise,
    report,
)


@torch.no_grad()
def sample_ddim(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12), deterministic for eta = 0.

    In VP form x_prev = sqrt(a') x0 + sqrt(1 - a' - s_t^2) eps + s_t z with
    s_t^2 = eta^2 (1 - a') / (1 - a) (1 - a / a').  Divided by sqrt(a') this is
    x_prev = x0 + sigma_down eps + sigma_up z with k-diffusion's ancestral split
    (sigma_up = eta sigma' sqrt(1 - sigma'^2 / sigma^2), sigma_down^2 = sigma'^2 - sigma_up^2):
    for eta = 0 it is exactly the Euler step of the probability-flow ODE (Karras et al. 2022).

    Unlike ComfyUI (whose ``ddim`` is Euler run on the ``ddim_uniform`` spacing) this follows
    diffusers' DDIMScheduler on whatever sigmas it is given, eta included; the spacing is
    chosen separately.  One difference: diffusers draws (and ignores) a noise tensor on a final
    step to sigma = 0 when eta > 0; this draws none there.
    """
    sigmas = check_sigmas(x, sigmas)
    noise = gaussian_noise(x) if noise is None else noise
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma * ones)
        eps = (x - x0) / sigma
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x0 + sigma_down * eps
        if sigma_next > 0 and sigma_up > 0:
            x = x + sigma_up * noise(sigma, sigma_next)
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_ddpm(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """Ancestral sampling from the DDPM posterior q(x_prev | x_t, x0) (Ho et al. 2020, eqs. 6-7)
    with the model's x0, variance "fixed_small" (beta_tilde), between consecutive sigmas.

    In VE form the posterior of x' (at sigma') given x (at sigma) and x0 is
    N(x0 + r (x - x0), sigma'^2 (1 - r) I) with r = sigma'^2 / sigma^2, which is eq. 7's
    mean and beta_tilde divided by sqrt(alpha_bar').  (The same step as Euler ancestral with
    eta = 1, written as the paper writes it.)  No noise is drawn when sigma' = 0.
    """
    sigmas = check_sigmas(x, sigmas)
    noise = gaussian_noise(x) if noise is None else noise
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma * ones)
        r = (sigma_next / sigma) ** 2
        x = x0 + r * (x - x0)
        if sigma_next > 0:
            x = x + sigma_next * (1 - r).clamp(min=0).sqrt() * noise(sigma, sigma_next)
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_lcm(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Alg. 1; Luo et al. 2023, LCM Alg. 3):
    take the x0 estimate, then re-noise it to the next sigma with fresh noise,
    x' = x0 + sigma' z.  The last step (sigma' = 0) returns x0 and draws no noise.

    Exact when the denoiser is a consistency function (it maps x at sigma to the end of its
    probability-flow ODE path); LCM's boundary scalings c_skip / c_out belong to that model's
    denoiser, not to this sampler.  With a posterior-mean denoiser the samples are too narrow.
    """
    sigmas = check_sigmas(x, sigmas)
    noise = gaussian_noise(x) if noise is None else noise
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma * ones)
        x = x0
        if sigma_next > 0:
            x = x0 + sigma_next * noise(sigma, sigma_next)
        report(callback, i, sigmas, x, x0)
    return x


SAMPLERS = {"ddim": sample_ddim, "ddpm": sample_ddpm, "lcm": sample_lcm}
