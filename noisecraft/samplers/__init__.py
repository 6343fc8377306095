"""Samplers: small stateless functions ``sample_X(denoiser, x, sigmas, *, callback, noise)``.

Names follow ComfyUI's KSampler so workflows carry over.  ``sample()`` is the entry point:
it looks a sampler up by name and can start or stop part-way through the sigma list
(img2img, refiner hand-off).
"""

from __future__ import annotations

import torch

from noisecraft.diffusion import BoundDenoiser
from noisecraft.samplers.basic import SAMPLERS as _BASIC
from noisecraft.samplers.cfg_pp import SAMPLERS as _CFG_PP
from noisecraft.samplers.common import NoiseSource, Step, StepCallback, gaussian_noise
from noisecraft.samplers.discrete import SAMPLERS as _DISCRETE
from noisecraft.samplers.dpmpp import SAMPLERS as _DPMPP
from noisecraft.samplers.noise import default_noise
from noisecraft.samplers.unipc import SAMPLERS as _UNIPC

SAMPLERS = {**_BASIC, **_DISCRETE, **_DPMPP, **_UNIPC, **_CFG_PP}

__all__ = ["SAMPLERS", "Step", "gaussian_noise", "sample", "sampler_names"]


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def get_sampler(name: str):
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(
            f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}"
        ) from None


def sample(
    sampler: str,
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    start_step: int = 0,
    end_step: int | None = None,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    generator: torch.Generator | None = None,
    **options,
) -> torch.Tensor:
    """Run the named sampler over ``sigmas[start_step : end_step + 1]``.

    x must already be at noise level ``sigmas[start_step]``.  Stochastic samplers draw from
    ``noise`` if given, else from ``generator`` (CPU), else from an unseeded generator.
    ``options`` go to the sampler (e.g. ``eta``, ``s_noise``).
    """
    fn = get_sampler(sampler)
    n = len(sigmas) - 1
    end = n if end_step is None else end_step
    if not 0 <= start_step < end <= n:
        raise ValueError(
            f"need 0 <= start_step < end_step <= {n} (steps), got start_step={start_step}, "
            f"end_step={end_step}"
        )
    if noise is None:
        noise = default_noise(sampler, x, sigmas[start_step : end + 1], generator)
    return fn(denoiser, x, sigmas[start_step : end + 1], callback=callback, noise=noise, **options)
