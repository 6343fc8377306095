"""Samplers of the probability-flow ODE / reverse SDE in k-diffusion's form (Karras et al. 2022).

All integrate dx/dsigma = (x - x0(x, sigma)) / sigma from sigmas[0] to sigmas[-1]; the
ancestral ones split each step into a deterministic move to sigma_down and fresh noise of
std sigma_up (:func:`~noisecraft.samplers.common.ancestral_step`).  Names are ComfyUI's.
x: [B, ...] at sigmas[0]; sigmas: [steps + 1] descending; each returns x at sigmas[-1].
"""

from __future__ import annotations

import numpy as np
import torch

from noisecraft.diffusion import BoundDenoiser, to_d
from noisecraft.samplers.common import (
    NoiseSource,
    StepCallback,
    ancestral_step,
    check_sigmas,
    gaussian_noise,
    report,
)


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


@torch.no_grad()
def sample_euler_ancestral(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral Euler (k-diffusion ``sample_euler_ancestral``): an Euler step to sigma_down,
    then N(0, (s_noise sigma_up)^2) noise.  eta = 1 is the DDPM posterior step of Ho et al.
    2020 in VE form; eta = 0 is plain Euler.  No noise is drawn when sigma_next = 0."""
    sigmas = check_sigmas(x, sigmas)
    noise = gaussian_noise(x) if noise is None else noise
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma * ones)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x + to_d(x, sigma * ones, x0) * (sigma_down - sigma)
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_heun(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """Heun's method, 2nd order (Karras et al. 2022, Alg. 1/2 without churn): an Euler predictor,
    then the trapezoid average of the slopes at both ends.  A step to sigma = 0 is plain Euler
    (the slope there is undefined).  Two denoiser calls per step (one for the last)."""
    sigmas = check_sigmas(x, sigmas)
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma * ones)
        d = to_d(x, sigma * ones, x0)
        dt = sigma_next - sigma
        if sigma_next == 0:
            x = x + d * dt
        else:
            x_pred = x + d * dt
            d_next = to_d(x_pred, sigma_next * ones, denoiser(x_pred, sigma_next * ones))
            x = x + (d + d_next) / 2 * dt
        report(callback, i, sigmas, x, x0)
    return x


def _dpm2_step(denoiser, x, d, sigma, sigma_to, ones):
    """Midpoint step from sigma to sigma_to, the midpoint taken in log sigma (DPM-2)."""
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = ((sigma.log() + sigma_to.log()) / 2).exp()
    x_mid = x + d * (sigma_mid - sigma)
    d_mid = to_d(x_mid, sigma_mid * ones, denoiser(x_mid, sigma_mid * ones))
    return x + d_mid * (sigma_to - sigma)


@torch.no_grad()
def sample_dpm_2(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """DPM-2 as in k-diffusion ``sample_dpm_2``: the explicit midpoint method with the midpoint
    at the geometric mean sqrt(sigma sigma_next) (inspired by Lu et al. 2022, DPM-Solver-2).
    2nd order; a step to sigma = 0 is plain Euler."""
    sigmas = check_sigmas(x, sigmas)
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, sigmas[i] * ones)
        d = to_d(x, sigmas[i] * ones, x0)
        x = _dpm2_step(denoiser, x, d, sigmas[i], sigmas[i + 1], ones)
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral DPM-2 (k-diffusion ``sample_dpm_2_ancestral``): a DPM-2 step to sigma_down,
    then N(0, (s_noise sigma_up)^2) noise; no noise when sigma_down = 0."""
    sigmas = check_sigmas(x, sigmas)
    noise = gaussian_noise(x) if noise is None else noise
    ones = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x0 = denoiser(x, sigma * ones)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = _dpm2_step(denoiser, x, to_d(x, sigma * ones, x0), sigma, sigma_down, ones)
        if sigma_down > 0 and sigma_up > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        report(callback, i, sigmas, x, x0)
    return x


def lms_coefficients(sigmas: np.ndarray, i: int, order: int) -> list[float]:
    """Adams-Bashforth weights for step i on non-uniform sigmas: the integral over
    [sigmas[i], sigmas[i+1]] of each Lagrange basis polynomial through sigmas[i], ...,
    sigmas[i-order+1] (k-diffusion ``linear_multistep_coeff``).  The polynomials are
    integrated exactly (numpy), where k-diffusion uses scipy quadrature; result j weights
    the derivative at sigmas[i - j]."""
    nodes = [float(sigmas[i - k]) for k in range(order)]
    coeffs = []
    for j in range(order):
        others = [nodes[k] for k in range(order) if k != j]
        basis = np.polynomial.Polynomial([1.0])
        for o in others:
            basis = basis * np.polynomial.Polynomial([-o, 1.0]) / (nodes[j] - o)
        antideriv = basis.integ()
        coeffs.append(float(antideriv(float(sigmas[i + 1])) - antideriv(float(sigmas[i]))))
    return coeffs


@torch.no_grad()
def sample_lms(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    order: int = 4,
) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) in sigma, as k-diffusion ``sample_lms`` / diffusers'
    LMSDiscreteScheduler: step i combines the last min(i + 1, order) derivatives with
    :func:`lms_coefficients`.  One denoiser call per step; order 4 by default."""
    if not isinstance(order, int) or order < 1:
        raise ValueError(f"lms order must be a whole number >= 1, got {order!r}")
    sigmas = check_sigmas(x, sigmas)
    sigmas_np = sigmas.detach().to("cpu", torch.float64).numpy()
    ones = x.new_ones(x.shape[0])
    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        x0 = denoiser(x, sigmas[i] * ones)
        ds = [*ds, to_d(x, sigmas[i] * ones, x0)][-order:]
        coeffs = lms_coefficients(sigmas_np, i, len(ds))
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds), strict=True))
        report(callback, i, sigmas, x, x0)
    return x


SAMPLERS = {
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpm_2": sample_dpm_2,
    "dpm_2_ancestral": sample_dpm_2_ancestral,
    "lms": sample_lms,
}
