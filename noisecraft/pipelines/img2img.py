"""Image to image (SDEdit, Meng et al. 2022): noise the image's latent to an intermediate sigma
and sample from there.

Strength convention (diffusers'): with ``steps`` N and ``strength`` s the run visits the last
``int(N * s)`` steps of the full N-step sigma list, starting at index ``N - int(N * s)``; the
start state is ``latent + sigmas[start] * noise``.  (AUTOMATIC1111 runs ``int(N * s) + 1``
steps by default.)  ``strength = 1`` starts at the top sigma, where the image barely shows.

The latent is the VAE posterior's mode and ``noise`` the seed's first draw.  diffusers'
img2img pipeline samples the posterior with its generator first, so its noise is the second
draw; given the mode, it gives the same image (tests/parity/test_img2img_inpaint_parity.py).
"""

from __future__ import annotations

import torch

from noisecraft.pipelines.common import (
    Run,
    model_sigmas,
    run_sampler,
    seeded_noise,
    strength_start,
)


def noised_start(
    run: Run, latent: torch.Tensor, sigma: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x = latent + sigma * noise, noise) with the run's seeded noise, latent [B, C, h, w]."""
    noise = seeded_noise(run.generators, tuple(latent.shape[1:])).to(latent.device)
    return latent + noise * sigma, noise


def img2img(
    run: Run,
    denoiser,
    latent: torch.Tensor,
    *,
    steps: int,
    strength: float,
    sampler: str,
    scheduler: str,
    eta: float | None = None,
    stage: str = "sample",
    steps_offset: int | None = None,
) -> torch.Tensor:
    """Re-noise diffusion latents [B, C, h, w] by ``strength`` and denoise them back
    (``steps_offset``: of the ``leading`` spacing, see ``common.leading_offset``)."""
    sigmas = model_sigmas(run.bundle, scheduler, steps, steps_offset)
    start = strength_start(steps, strength)
    x, _ = noised_start(run, latent, float(sigmas[start]))
    return run_sampler(run, denoiser, x, sigmas, sampler, start_step=start, stage=stage, eta=eta)
