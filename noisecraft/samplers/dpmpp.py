"""DPM-Solver++ samplers (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of
Diffusion Probabilistic Models", arXiv:2211.01095), as k-diffusion and ComfyUI run them.

All work in the half-log-SNR ``lambda = -log(sigma)`` (VE form, x = x0 + sigma eps) and
integrate the data prediction ``x0 = D(x, sigma)`` exactly against the exponential
integrator: a first-order step from sigma to sigma' is
``x' = (sigma'/sigma) x - expm1(-h) D`` with ``h = lambda' - lambda`` (equivalent to DDIM).
The variants differ in how they estimate D over the step:

* ``dpmpp_2s_ancestral``: single-step 2nd order (2S) with an extra evaluation at the
  log-midpoint, plus ancestral noise (eta).
* ``dpmpp_sde``: the 2S step with noise injected at both stages (r = 1/2, eta, s_noise).
* ``dpmpp_2m``: multistep 2nd order, reusing the previous D (Lu et al. Alg. 2).
* ``dpmpp_2m_sde`` / ``dpmpp_2m_sde_heun``: the SDE form of 2M (Lu et al. eq. 16), with
  midpoint or Heun-style correction of the D difference.
* ``dpmpp_3m_sde``: multistep 3rd order SDE solver (k-diffusion's extension).

Step coefficients are computed in float64 (Python floats) whatever the dtype of x.
x: [B, ...] at sigmas[0]; sigmas: descending [steps + 1]; each returns x at sigmas[-1].
"""

from __future__ import annotations

import math

import torch

from noisecraft.diffusion import BoundDenoiser
from noisecraft.samplers.common import (
    NoiseSource,
    StepCallback,
    check_sigmas,
    gaussian_noise,
    report,
)
from noisecraft.samplers.noise import brownian_tree_noise

SOLVER_TYPES = ("midpoint", "heun")


def _lam(sigma: float) -> float:
    """Half-log-SNR lambda = -log(sigma) of the VE process (inf at sigma = 0)."""
    return math.inf if sigma == 0 else -math.log(sigma)


def _ancestral(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_to^2 (k-diffusion)."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - up**2) ** 0.5, up


def _first_order(x, sigma: float, sigma_to: float, x0):
    """The exact exponential-integrator step with D held constant (DPM-Solver++ 1, = DDIM)."""
    if sigma_to == 0:
        return x0
    return (sigma_to / sigma) * x - math.expm1(-(_lam(sigma_to) - _lam(sigma))) * x0


def _check_options(eta: float, s_noise: float) -> None:
    if eta < 0 or s_noise < 0:
        raise ValueError(f"eta and s_noise must be >= 0, got eta={eta}, s_noise={s_noise}")


def _sde_noise(x, sigmas, noise: NoiseSource | None, seed) -> NoiseSource:
    """The given noise, else a Brownian tree over the run (seeded if ``seed`` is given)."""
    if noise is not None:
        return noise
    positive = sigmas[sigmas > 0]
    if len(positive) and float(positive.min()) < float(sigmas.max()):
        return brownian_tree_noise(x, sigmas, seed)
    return gaussian_noise(x)  # a single step to 0 draws no noise at all


def _f32_point(sigma: float, sigma_next: float, r: float) -> torch.Tensor:
    """sigma at lambda + r h computed in float32 as ComfyUI and diffusers do: the noise query
    point.  A Brownian tree rounds query times to 1e-6, so a point computed in float64 would
    often land on a different tree node than theirs and change the noise."""
    lam, lam_next = (torch.tensor(v, dtype=torch.float32).log().neg() for v in (sigma, sigma_next))
    return (lam + r * (lam_next - lam)).neg().exp()


def _sigma_batch(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return x.new_full((x.shape[0],), sigma)


@torch.no_grad()
def sample_dpmpp_2s_ancestral(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral (Lu et al. 2022, Alg. 1 with r = 1/2; k-diffusion).

    Each step solves the ODE down to sigma_down with a 2nd-order single step (one extra
    evaluation at the log-midpoint), then adds fresh noise of std sigma_up * s_noise.
    The step to sigma_down = 0 is an Euler step.  2 evaluations per step (1 for the last).
    Default noise: independent Gaussian draws (as ComfyUI).
    """
    _check_options(eta, s_noise)
    sigmas = check_sigmas(x, sigmas)
    noise = noise if noise is not None else gaussian_noise(x)
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0 = denoiser(x, _sigma_batch(x, s[i]))
        down, up = _ancestral(s[i], s[i + 1], eta)
        if down == 0:
            x = x0
        else:
            lam, lam_down = _lam(s[i]), _lam(down)
            sigma_mid = math.exp(-(lam + 0.5 * (lam_down - lam)))
            x_mid = _first_order(x, s[i], sigma_mid, x0)
            x0_mid = denoiser(x_mid, _sigma_batch(x, sigma_mid))
            x = _first_order(x, s[i], down, x0_mid)
        if s[i + 1] > 0 and up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * up)
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_sde(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    seed: int | list[int] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2S) SDE variant (k-diffusion ``sample_dpmpp_sde``; Lu et al. 2022).

    Stage 1 takes an ancestral DPM-Solver++(1) step to lambda + r h and evaluates there;
    stage 2 steps from sigma to sigma_next with D = (1 - 1/(2r)) D_0 + 1/(2r) D_r, each stage
    adding Brownian noise of std sigma_up(eta) * s_noise.  The step to 0 returns D.
    2 evaluations per step (1 for the last).  Default noise: a Brownian tree over the run,
    seeded by ``seed`` (same seed -> same image as ComfyUI and diffusers'
    DPMSolverSDEScheduler); pass ``noise`` to override.
    """
    _check_options(eta, s_noise)
    if not 0 < r <= 1:
        raise ValueError(f"r (the intermediate point, a fraction of the step) must lie in (0, 1], "
                         f"got {r}")
    sigmas = check_sigmas(x, sigmas)
    noise = _sde_noise(x, sigmas, noise, seed)
    s = sigmas.tolist()
    fac = 1 / (2 * r)
    for i in range(len(s) - 1):
        x0 = denoiser(x, _sigma_batch(x, s[i]))
        if s[i + 1] == 0:
            x = x0
        else:
            lam, lam_next = _lam(s[i]), _lam(s[i + 1])
            sigma_r = math.exp(-(lam + r * (lam_next - lam)))
            down, up = _ancestral(s[i], sigma_r, eta)
            x_r = _first_order(x, s[i], down, x0)
            if up > 0 and s_noise > 0:
                x_r = x_r + noise(sigmas[i], _f32_point(s[i], s[i + 1], r)) * (s_noise * up)
            x0_r = denoiser(x_r, _sigma_batch(x, sigma_r))
            down, up = _ancestral(s[i], s[i + 1], eta)
            x = _first_order(x, s[i], down, (1 - fac) * x0 + fac * x0_r)
            if up > 0 and s_noise > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * up)
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep 2nd order in lambda = -log sigma.

    D over the step is extrapolated from this and the previous evaluation,
    D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1} with r = h_{i-1} / h_i.  The first step and the
    step to sigma = 0 are first order (k-diffusion; diffusers does the same for
    ``final_sigmas_type="zero"``).  1 evaluation per step; deterministic (noise unused).
    """
    sigmas = check_sigmas(x, sigmas)
    s = sigmas.tolist()
    x0_prev = None
    for i in range(len(s) - 1):
        x0 = denoiser(x, _sigma_batch(x, s[i]))
        # First order at the start, to sigma = 0, and next to zero-length steps (h = 0).
        if x0_prev is None or s[i + 1] == 0 or s[i + 1] == s[i] or s[i] == s[i - 1]:
            x = _first_order(x, s[i], s[i + 1], x0)
        else:
            h = _lam(s[i + 1]) - _lam(s[i])
            r = (_lam(s[i]) - _lam(s[i - 1])) / h
            x0_d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = _first_order(x, s[i], s[i + 1], x0_d)
        x0_prev = x0
        report(callback, i, sigmas, x, x0)
    return x


def _sde_base(x, sigma: float, sigma_next: float, x0, eta: float) -> tuple[torch.Tensor, float]:
    """The SDE DPM-Solver++(1) step without its noise: returns (x', h * (1 + eta))."""
    h = _lam(sigma_next) - _lam(sigma)
    h_eta = h * (1 + eta)
    x = (sigma_next / sigma) * math.exp(-h * eta) * x - math.expm1(-h_eta) * x0
    return x, h_eta


def _sde_noise_std(sigma: float, sigma_next: float, eta: float) -> float:
    """Std of the noise an SDE multistep step adds: sigma' sqrt(1 - exp(-2 eta h))."""
    h = _lam(sigma_next) - _lam(sigma)
    return sigma_next * math.sqrt(-math.expm1(-2 * eta * h))


@torch.no_grad()
def sample_dpmpp_2m_sde(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    seed: int | list[int] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, eq. 16 and Alg. 2; k-diffusion/ComfyUI).

    The stochastic exponential integrator x' = (sigma'/sigma) e^{-eta h} x
    + (1 - e^{-(1+eta) h}) D + sigma' sqrt(1 - e^{-2 eta h}) s_noise z, with D corrected by
    the previous evaluation, dD = (D_i - D_{i-1}) / r with r = h_{i-1} / h_i and
    h_eta = (1 + eta) h: ``solver_type="midpoint"`` adds 0.5 (1 - e^{-h_eta}) dD, ``"heun"``
    adds phi_2 dD with phi_2 = (e^{-h_eta} - 1) / h_eta + 1.  eta = 0 is DPM-Solver++(2M).
    The step to 0 returns D.  1 evaluation per step.  Default noise: a Brownian tree seeded
    by ``seed`` (ComfyUI's choice; diffusers' ``sde-dpmsolver++`` draws independent noise
    instead - pass ``noise=gaussian_noise(x, generator)`` for that).
    """
    _check_options(eta, s_noise)
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    sigmas = check_sigmas(x, sigmas)
    noise = _sde_noise(x, sigmas, noise, seed)
    s = sigmas.tolist()
    x0_prev, h_prev = None, None
    for i in range(len(s) - 1):
        x0 = denoiser(x, _sigma_batch(x, s[i]))
        h = None
        if s[i + 1] == 0:
            x = x0
        else:
            h = _lam(s[i + 1]) - _lam(s[i])
            x, h_eta = _sde_base(x, s[i], s[i + 1], x0, eta)
            if x0_prev is not None and h and h_prev:  # none next to a zero-length step
                d = (x0 - x0_prev) * (h / h_prev)  # (D_i - D_{i-1}) / r
                if solver_type == "heun":
                    x = x + (-math.expm1(-h_eta) / (-h_eta) + 1) * d
                else:
                    x = x + (0.5 * -math.expm1(-h_eta)) * d
            std = _sde_noise_std(s[i], s[i + 1], eta) * s_noise
            if std > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * std
        x0_prev, h_prev = x0, h
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, *, callback=None, noise=None, **options):
    """DPM-Solver++(2M) SDE with the Heun-type correction (ComfyUI ``dpmpp_2m_sde_heun``)."""
    options.setdefault("solver_type", "heun")
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, callback=callback, noise=noise, **options)


@torch.no_grad()
def sample_dpmpp_3m_sde(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
    seed: int | list[int] | None = None,
) -> torch.Tensor:
    """DPM-Solver++(3M) SDE (k-diffusion ``sample_dpmpp_3m_sde``, extending Lu et al. 2022).

    The SDE exponential integrator with D expanded to second order in lambda from the last
    three evaluations: x' += phi_2 d1 - phi_3 d2, where d1, d2 are the first and second
    divided differences of D, phi_2 = (e^{-h_eta} - 1) / h_eta + 1 and
    phi_3 = phi_2 / h_eta - 1/2 (h_eta = (1 + eta) h), falling back to the 2M correction on
    the second step and to first order on the first.  The step to 0 returns D.
    1 evaluation per step.  Default noise: a Brownian tree seeded by ``seed``, as ComfyUI.
    """
    _check_options(eta, s_noise)
    sigmas = check_sigmas(x, sigmas)
    noise = _sde_noise(x, sigmas, noise, seed)
    s = sigmas.tolist()
    x0_1 = x0_2 = None
    h = h_1 = h_2 = None
    for i in range(len(s) - 1):
        x0 = denoiser(x, _sigma_batch(x, s[i]))
        if s[i + 1] == 0:
            x = x0
        else:
            h = _lam(s[i + 1]) - _lam(s[i])
            x, h_eta = _sde_base(x, s[i], s[i + 1], x0, eta)
            phi_2 = math.expm1(-h_eta) / h_eta + 1 if h_eta else 0.0
            # Order falls to 1 on the first step and next to zero-length steps (h = 0).
            if h and h_1 and h_2:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (x0 - x0_1) / r0
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h and h_1:
                x = x + phi_2 * ((x0 - x0_1) / (h_1 / h))
            std = _sde_noise_std(s[i], s[i + 1], eta) * s_noise
            if std > 0:
                x = x + noise(sigmas[i], sigmas[i + 1]) * std
        x0_1, x0_2 = x0, x0_1
        h_1, h_2 = h, h_1
        report(callback, i, sigmas, x, x0)
    return x


SAMPLERS = {
    "dpmpp_2s_ancestral": sample_dpmpp_2s_ancestral,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "dpmpp_2m_sde_heun": sample_dpmpp_2m_sde_heun,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
}
