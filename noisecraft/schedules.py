"""Noise schedules as pure functions over float64 tensors.

Two layers, kept apart on purpose:

* the **training schedule** of a model: ``betas`` -> ``alphas_cumprod`` -> the table of the
  model's ``sigmas`` (one per training timestep, ascending).  ``sigma_t = sqrt((1 - a_t) / a_t)``
  turns the variance-preserving process ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps`` into the
  variance-exploding one ``x = x0 + sigma eps`` used by the samplers (Karras et al. 2022, EDM).
* the **spacing** of a sampling run: which ``steps + 1`` sigmas (descending, usually ending at 0)
  a sampler visits.  The names are ComfyUI's (``normal``, ``karras``, ``exponential``,
  ``sgm_uniform``, ``simple``, ``ddim_uniform``, ``beta``) so workflows carry over, plus
  diffusers' timestep spacings (``leading``, ``trailing``, ``linspace``) so a diffusers scheduler
  configuration can be reproduced exactly.

Everything is computed in float64 (guided-diffusion does the same) and cast by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

F64 = torch.float64

BETA_SCHEDULES = ("linear", "scaled_linear", "cosine")


def _choice_error(kind: str, name: str, allowed) -> ValueError:
    return ValueError(f"unknown {kind} {name!r}; choose one of: {', '.join(allowed)}")


def betas_for(
    schedule: str = "scaled_linear",
    n: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
) -> torch.Tensor:
    """Betas [n] of a training schedule.

    * ``linear``: Ho et al. 2020 (DDPM uses beta_start=1e-4, beta_end=0.02).
    * ``scaled_linear``: Stable Diffusion's, linear in sqrt(beta) (0.00085 -> 0.012).
    * ``cosine``: Nichol & Dhariwal 2021, eq. 17, with s=0.008 and betas clipped at 0.999.
    """
    if n < 2:
        raise ValueError(f"a schedule needs at least 2 timesteps, got n={n}")
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=F64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=F64) ** 2
    if schedule == "cosine":
        t = torch.arange(n + 1, dtype=F64) / n
        alpha_bar = torch.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
        return (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    raise _choice_error("beta schedule", schedule, BETA_SCHEDULES)


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """alpha_bar_t = prod_{s<=t} (1 - beta_s)."""
    return torch.cumprod(1 - betas.to(F64), dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alpha_bar) so the last timestep has zero SNR (Lin et al. 2023, Alg. 1).

    The first value is kept; the last becomes exactly 0 (pure noise, sigma = inf).
    """
    s = alphas_cumprod.to(F64).sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    s = (s - s_last) * s0 / (s0 - s_last)
    return s**2


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t), ascending with t."""
    a = alphas_cumprod.to(F64)
    return ((1 - a) / a).sqrt()


def alphas_cumprod_from_sigmas(sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`sigmas_from_alphas_cumprod`: alpha_bar = 1 / (1 + sigma^2)."""
    return 1 / (1 + sigmas.to(F64) ** 2)


# alpha_bar given to the last timestep of a zero-terminal-SNR schedule so its sigma stays finite.
# diffusers uses 2**-24; ComfyUI 4.8973451890853435e-08.  We follow diffusers (parity tests).
ZERO_SNR_ALPHA_BAR = 2.0**-24


@dataclass(frozen=True, eq=False)
class DiscreteSchedule:
    """The sigma table of a model trained on discrete timesteps 0..T-1.

    ``sigmas`` is ascending (sigmas[t] for timestep t), float64.  Conversions between
    continuous timesteps and sigmas interpolate log-sigma linearly (k-diffusion, ComfyUI).
    """

    sigmas: torch.Tensor

    @classmethod
    def from_betas(
        cls,
        schedule: str = "scaled_linear",
        n: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
    ) -> DiscreteSchedule:
        ac = alphas_cumprod_from_betas(betas_for(schedule, n, beta_start, beta_end))
        if zero_terminal_snr:
            ac = rescale_zero_terminal_snr(ac)
            ac[-1] = ZERO_SNR_ALPHA_BAR
        return cls(sigmas_from_alphas_cumprod(ac))

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return alphas_cumprod_from_sigmas(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Continuous timestep for each sigma (piecewise-linear in log sigma)."""
        sigma = torch.as_tensor(sigma)
        log_sigmas = self.sigmas.log().to(sigma.device)
        log_sigma = sigma.to(F64).clamp(min=1e-30).log()
        dists = log_sigma.reshape(-1, 1) - log_sigmas.reshape(1, -1)
        low = (dists >= 0).cumsum(dim=1).argmax(dim=1).clamp(max=len(log_sigmas) - 2)
        high = low + 1
        lo, hi = log_sigmas[low], log_sigmas[high]
        w = ((lo - log_sigma.reshape(-1)) / (lo - hi)).clamp(0, 1)
        t = (1 - w) * low + w * high
        return t.reshape(sigma.shape).to(sigma.dtype if sigma.is_floating_point() else F64)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """Sigma at continuous timestep t (log-linear interpolation of the table)."""
        t = torch.as_tensor(t, dtype=F64).clamp(0, len(self.sigmas) - 1)
        low, high = t.floor().long(), t.ceil().long()
        w = t - low
        log_sigmas = self.sigmas.log().to(t.device)
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


# ---------------------------------------------------------------------------------------------
# Spacings: which sigmas a sampling run visits.  Each returns a descending float64 tensor of
# steps + 1 values; the last is 0 unless the schedule itself reaches sigma ~ 0.
# ---------------------------------------------------------------------------------------------


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s, s.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: sigmas evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n, dtype=F64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Sigmas evenly spaced in log sigma."""
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=F64)
    return _append_zero(log_sigmas.exp())


def polyexponential_sigmas(
    n: int, sigma_min: float, sigma_max: float, rho: float = 1.0
) -> torch.Tensor:
    """Log sigma polynomial in the step index: log sigma = log sigma_min + r^rho (log sigma_max -
    log sigma_min), r from 1 to 0 (k-diffusion's ``get_sigmas_polyexponential``; rho = 1 is
    :func:`exponential_sigmas`)."""
    ramp = torch.linspace(1, 0, n, dtype=F64) ** rho
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return _append_zero((ramp * (hi - lo) + lo).exp())


def vp_sigmas(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3):
    """Noise levels of the continuous variance-preserving SDE (Song et al. 2021, "Score-Based
    Generative Modeling through SDEs") in sigma form, sigma(t) = sqrt(exp(beta_d t^2 / 2 +
    beta_min t) - 1), t from 1 down to eps_s (k-diffusion's ``get_sigmas_vp``)."""
    t = torch.linspace(1, eps_s, n, dtype=F64)
    return _append_zero(torch.special.expm1(beta_d * t**2 / 2 + beta_min * t).sqrt())


LAPLACE_EPS = 1e-5  # keeps log(1 - 2|r - 1/2|) finite at both ends (k-diffusion's epsilon)


def laplace_sigmas(
    n: int, sigma_min: float, sigma_max: float, mu: float = 0.0, beta: float = 0.5
) -> torch.Tensor:
    """Log sigma at the quantiles of a Laplace(mu, beta) distribution (Hang et al. 2024,
    "Improved Noise Schedule for Diffusion Training"; k-diffusion/ComfyUI's
    ``get_sigmas_laplace``): for r = 0 .. 1 in n even steps,
    ``log sigma = mu - beta * sign(1/2 - r) * log(1 - 2 |1/2 - r| + 1e-5)``, clamped to
    [sigma_min, sigma_max].  The steps crowd around sigma = exp(mu).

    Unlike the other spacings there is **no final 0**: n sigmas, the last one sigma_min (or
    exp(mu - 11.5 beta) if larger), exactly as ComfyUI's LaplaceScheduler returns them, so a
    sampler given these ends at that noise level.
    """
    r = torch.linspace(0, 1, n, dtype=F64)
    lmb = mu - beta * torch.sign(0.5 - r) * torch.log(1 - 2 * (0.5 - r).abs() + LAPLACE_EPS)
    return lmb.exp().clamp(min=sigma_min, max=sigma_max)


def sd_turbo_sigmas(schedule: DiscreteSchedule, steps: int, denoise: float = 1.0):
    """SD-Turbo's few-step schedule (ComfyUI's SDTurboScheduler): of the timesteps 999, 899,
    ..., 99, skip the first 10 - int(10 denoise) and take ``steps``, then 0."""
    start = 10 - int(10 * denoise)
    timesteps = (torch.arange(1, 11) * 100 - 1).flip(0)[start:start + steps]
    return _append_zero(schedule.sigmas[timesteps].to(F64))


def normal_sigmas(schedule: DiscreteSchedule, n: int, sgm: bool = False) -> torch.Tensor:
    """Timesteps evenly spaced from T-1 to 0 (ComfyUI ``normal``; ``sgm`` drops the endpoint)."""
    start = float(schedule.sigma_to_t(torch.tensor(schedule.sigma_max, dtype=F64)))
    end = float(schedule.sigma_to_t(torch.tensor(schedule.sigma_min, dtype=F64)))
    if sgm:
        ts = torch.linspace(start, end, n + 1, dtype=F64)[:-1]
        return _append_zero(schedule.t_to_sigma(ts))
    if math.isclose(float(schedule.t_to_sigma(torch.tensor(end))), 0.0, abs_tol=1e-5):
        return schedule.t_to_sigma(torch.linspace(start, end, n + 1, dtype=F64))
    return _append_zero(schedule.t_to_sigma(torch.linspace(start, end, n, dtype=F64)))


def simple_sigmas(schedule: DiscreteSchedule, n: int) -> torch.Tensor:
    """Every (T/n)-th sigma of the table, from the top (ComfyUI ``simple``)."""
    stride = len(schedule.sigmas) / n
    idx = [-(1 + int(i * stride)) for i in range(n)]
    return _append_zero(schedule.sigmas[idx])


def ddim_uniform_sigmas(schedule: DiscreteSchedule, n: int) -> torch.Tensor:
    """Timesteps 1, 1+c, 1+2c, ... with c = T // n, reversed (ComfyUI ``ddim_uniform``)."""
    table = schedule.sigmas
    reaches_zero = math.isclose(float(table[1]), 0.0, abs_tol=1e-5)
    stride = max(len(table) // (n + 1 if reaches_zero else n), 1)
    picked = table[1::stride]
    if not reaches_zero:
        picked = torch.cat([table.new_zeros(1), picked])
    return picked.flip(0)


def beta_sigmas(schedule: DiscreteSchedule, n: int, alpha: float = 0.6, beta: float = 0.6):
    """Timesteps at the quantiles of a Beta(alpha, beta) distribution (Lee et al. 2024).

    Uses scipy's Beta inverse CDF (no closed form exists); repeated timesteps are dropped,
    as ComfyUI does, so a short run can have fewer than n steps.
    """
    from scipy.stats import beta as beta_dist  # scipy owns a tested inverse incomplete beta

    total = len(schedule.sigmas) - 1
    qs = 1 - torch.linspace(0, 1, n + 1, dtype=F64)[:-1]
    ts = [round(float(beta_dist.ppf(float(q), alpha, beta)) * total) for q in qs]
    picked, last = [], None
    for t in ts:
        if t != last:
            picked.append(int(t))
        last = t
    return _append_zero(schedule.sigmas[picked])


def diffusers_timesteps(
    spacing: str, n: int, num_train_timesteps: int = 1000, steps_offset: int = 0
) -> torch.Tensor:
    """Discrete timesteps (descending) of diffusers' ``timestep_spacing`` options.

    ``steps_offset`` shifts the ``leading`` timesteps up, as diffusers' scheduler option of that
    name does (SD 1.x/2.x/SDXL's configs use 1: 20 steps visit 951, 901, ..., 1 rather than
    950, ..., 0); diffusers ignores it for the other spacings, and so does this.
    """
    T = num_train_timesteps
    if spacing == "linspace":
        return torch.linspace(0, T - 1, n, dtype=F64).flip(0)
    if spacing == "leading":
        ratio = T // n
        ts = (torch.arange(n, dtype=F64) * ratio).round().flip(0) + steps_offset
        if ts[0] > T - 1:
            raise ValueError(
                f"leading spacing with {n} steps and steps_offset={steps_offset} starts at "
                f"timestep {int(ts[0])}, past the schedule's last timestep {T - 1}; use fewer "
                f"steps or a smaller steps_offset"
            )
        return ts
    if spacing == "trailing":
        ratio = T / n
        return (torch.arange(T, 0, -ratio, dtype=F64)).round() - 1
    raise _choice_error("diffusers timestep spacing", spacing, ("leading", "trailing", "linspace"))


def _diffusers_spacing(name: str) -> Callable[..., torch.Tensor]:
    def spacing(schedule: DiscreteSchedule, n: int, steps_offset: int = 0) -> torch.Tensor:
        ts = diffusers_timesteps(name, n, schedule.num_timesteps, steps_offset)
        idx = torch.arange(schedule.num_timesteps, dtype=F64)
        # Linear (not log-linear) interpolation, as diffusers' np.interp does.
        sig = np.interp(ts.numpy(), idx.numpy(), schedule.sigmas.numpy())
        return _append_zero(torch.from_numpy(sig).to(F64))

    spacing.__name__ = f"{name}_sigmas"
    spacing.__doc__ = f"diffusers ``timestep_spacing={name!r}``, sigmas interpolated linearly."
    return spacing


SPACINGS: dict[str, Callable[..., torch.Tensor]] = {
    "normal": normal_sigmas,
    "karras": lambda s, n, rho=7.0: karras_sigmas(n, s.sigma_min, s.sigma_max, rho),
    "exponential": lambda s, n: exponential_sigmas(n, s.sigma_min, s.sigma_max),
    "sgm_uniform": lambda s, n: normal_sigmas(s, n, sgm=True),
    "simple": simple_sigmas,
    "ddim_uniform": ddim_uniform_sigmas,
    "beta": beta_sigmas,
    "leading": _diffusers_spacing("leading"),
    "trailing": _diffusers_spacing("trailing"),
    "linspace": _diffusers_spacing("linspace"),
}
COMFY_SPACINGS = (
    "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform", "beta"
)


def spacing_sigmas(spacing: str, schedule: DiscreteSchedule, steps: int, **options) -> torch.Tensor:
    """The descending sigmas [steps + 1] that a sampling run of ``steps`` steps visits."""
    if spacing not in SPACINGS:
        raise _choice_error("spacing (scheduler)", spacing, SPACINGS)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a whole number >= 1, got {steps!r}")
    return SPACINGS[spacing](schedule, steps, **options)


def build_sigmas(
    steps: int,
    schedule: str = "scaled_linear",
    spacing: str = "normal",
    *,
    num_train_timesteps: int = 1000,
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    zero_terminal_snr: bool = False,
    **spacing_options,
) -> torch.Tensor:
    """Sigmas for a sampling run, by schedule and spacing name (the library's entry point).

    >>> build_sigmas(20, "scaled_linear", "karras").shape
    torch.Size([21])
    """
    table = DiscreteSchedule.from_betas(
        schedule, num_train_timesteps, beta_start, beta_end, zero_terminal_snr
    )
    return spacing_sigmas(spacing, table, steps, **spacing_options)
