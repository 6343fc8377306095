"""The forward process, prediction types, and the one denoiser contract.

Notation (Karras et al. 2022, "EDM"): a clean sample ``x0`` noised to level ``sigma`` is
``x = x0 + sigma * eps``.  A model trained on the variance-preserving process of Ho et al.
2020 sees ``x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps = x / sqrt(1 + sigma^2)``
with ``sigma^2 = (1 - alpha_bar_t) / alpha_bar_t``: the two are the same process, rescaled.

Every network becomes a :class:`Denoiser` - ``denoise(x, sigma, cond) -> x0 estimate`` - whatever
it predicts (``eps``, ``v`` or ``x0``).  Samplers only ever see that contract.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from noisecraft.schedules import DiscreteSchedule

PREDICTION_TYPES = ("eps", "v", "x0")


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Reshape a per-sample tensor [B] to broadcast against an [B, ...] tensor of ``ndim`` dims."""
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def as_sigma_batch(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` as a tensor [B] on x's device; refuses negative or mis-shaped values."""
    sigma = torch.as_tensor(sigma, device=x.device)
    if not sigma.is_floating_point():
        sigma = sigma.to(torch.float32)
    if sigma.ndim == 0:
        sigma = sigma.expand(x.shape[0])
    if sigma.ndim != 1 or sigma.shape[0] != x.shape[0]:
        raise ValueError(
            f"sigma must be a scalar or have one value per sample ({x.shape[0]}), "
            f"got shape {tuple(sigma.shape)}"
        )
    if (sigma < 0).any():
        raise ValueError(f"sigma must be >= 0, got {sigma.tolist()}")
    return sigma


# ---------------------------------------------------------------------------------------------
# The forward process q(x_t | x_0)
# ---------------------------------------------------------------------------------------------


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """q(x | x0) at noise level sigma, in the variance-exploding form: ``x0 + sigma * noise``.

    x0, noise: [B, ...] (pixels or latents); sigma: scalar or [B].
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    sigma = as_sigma_batch(sigma, x0)
    return x0 + append_dims(sigma, x0.ndim).to(x0.dtype) * noise


def q_sample(
    x0: torch.Tensor, noise: torch.Tensor, t: int | torch.Tensor, alphas_cumprod: torch.Tensor
) -> torch.Tensor:
    """q(x_t | x0) = N(sqrt(a_t) x0, (1 - a_t) I) at integer timestep(s) t (Ho et al. 2020, eq. 4).

    x0, noise: [B, ...]; t: scalar or [B] timesteps in [0, T); alphas_cumprod: [T].
    """
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} differ in shape")
    t = torch.as_tensor(t, device=alphas_cumprod.device).long()
    T = len(alphas_cumprod)
    if ((t < 0) | (t >= T)).any():
        raise ValueError(f"timesteps must lie in [0, {T - 1}], got {t.tolist()}")
    a = alphas_cumprod[t].to(x0.device)
    if a.ndim == 0:
        a = a.expand(x0.shape[0])
    a = append_dims(a, x0.ndim)
    return (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(x0.dtype)


def snr(sigma: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) = 1 / sigma^2."""
    return sigma.pow(-2)


# ---------------------------------------------------------------------------------------------
# Prediction types: from a network output to an x0 estimate, and the training targets.
# ---------------------------------------------------------------------------------------------


def x0_from_output(
    prediction: str, output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """x0 estimate from the raw network output at (VE) input x and noise level sigma [B].

    * eps: x0 = x - sigma * eps
    * v (Salimans & Ho 2022, sigma_data = 1): x0 = x / (sigma^2 + 1) - sigma v / sqrt(sigma^2 + 1)
    * x0: the output itself
    """
    s = append_dims(sigma, x.ndim).to(x.dtype)
    if prediction == "eps":
        return x - s * output
    if prediction == "v":
        return x / (s**2 + 1) - output * s / (s**2 + 1).sqrt()
    if prediction == "x0":
        return output
    raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTION_TYPES}")


def training_target(
    prediction: str, x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """What a network of this prediction type should output for x = x0 + sigma * noise.

    For v: v = sqrt(a) eps - sqrt(1 - a) x0 in VP terms,
    i.e. (noise - sigma x0) / sqrt(1 + sigma^2).
    """
    s = append_dims(sigma, x0.ndim).to(x0.dtype)
    if prediction == "eps":
        return noise
    if prediction == "v":
        return (noise - s * x0) / (1 + s**2).sqrt()
    if prediction == "x0":
        return x0
    raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTION_TYPES}")


def min_snr_weight(sigma: torch.Tensor, prediction: str, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023) for an MSE on the given prediction type."""
    s = snr(sigma).clamp(max=1e12)
    clipped = s.clamp(max=gamma)
    if prediction == "eps":
        return clipped / s
    if prediction == "v":
        return clipped / (s + 1)
    if prediction == "x0":
        return clipped
    raise ValueError(f"unknown prediction type {prediction!r}; choose one of {PREDICTION_TYPES}")


# ---------------------------------------------------------------------------------------------
# The denoiser contract
# ---------------------------------------------------------------------------------------------

Cond = Mapping[str, Any]
"""Conditioning passed through to the network as keyword arguments (e.g. ``context``, ``y``)."""


class BoundDenoiser(Protocol):
    """What samplers call: ``denoiser(x, sigma) -> x0`` with x [B, ...] and sigma [B]."""

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor: ...


@dataclass(eq=False)
class Denoiser:
    """Wrap a network ``model(x_t, t, **cond) -> output`` as ``denoise(x, sigma, cond) -> x0``.

    The network sees the variance-preserving input ``x / sqrt(1 + sigma^2)`` and the continuous
    timestep of sigma in its training schedule; ``prediction`` says what it outputs.

    x: [B, C, H, W] (or any [B, ...]); sigma: scalar or [B]; returns x0 estimate like x.
    """

    model: Callable[..., torch.Tensor]
    schedule: DiscreteSchedule
    prediction: str = "eps"
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.prediction not in PREDICTION_TYPES:
            raise ValueError(
                f"unknown prediction type {self.prediction!r}; choose one of {PREDICTION_TYPES}"
            )

    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.schedule.sigma_to_t(sigma)

    def __call__(self, x: torch.Tensor, sigma, cond: Cond | None = None) -> torch.Tensor:
        sigma = as_sigma_batch(sigma, x)
        c_in = append_dims(1 / (sigma.to(torch.float64) ** 2 + 1).sqrt(), x.ndim).to(x.dtype)
        t = self.timestep(sigma.to(torch.float64)).to(x.dtype)
        out = self.model(x * c_in, t, **{**self.extra, **(cond or {})})
        return x0_from_output(self.prediction, out, x, sigma.to(x.dtype))

    def bind(self, cond: Cond | None = None) -> BoundDenoiser:
        """The sampler-facing form ``(x, sigma) -> x0`` with the conditioning fixed."""
        return lambda x, sigma: self(x, sigma, cond)


def to_d(x: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE derivative dx/dsigma = (x - x0) / sigma (Karras et al., eq. 4)."""
    return (x - x0) / append_dims(sigma, x.ndim)
