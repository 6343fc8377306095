"""Text to image: seeded noise at the first sigma, then the sampler (Rombach et al. 2022)."""

from __future__ import annotations

import torch

from noisecraft.conditioning import Conditioning
from noisecraft.pipelines.common import (
    Run,
    guided_denoiser,
    latent_shape,
    model_sigmas,
    run_sampler,
    seeded_noise,
)
from noisecraft.pipelines.inpaint import txt2img_concat
from noisecraft.request import GenerationRequest


def txt2img(
    run: Run, req: GenerationRequest, cond: Conditioning, width: int, height: int
) -> torch.Tensor:
    """Diffusion latents [B, C, height/8, width/8] for the request's prompt.

    x starts at ``noise * sigmas[0]`` (A1111/ComfyUI; diffusers scales by its
    ``init_noise_sigma`` instead, see tests/parity/test_pipeline_parity.py).  An inpainting
    model gets an all-repaint mask and an empty masked image, as diffusers and ComfyUI do.
    """
    shape = latent_shape(run.bundle, width, height)
    sigmas = model_sigmas(run.bundle, req.scheduler, req.steps, req.steps_offset)
    x = seeded_noise(run.generators, shape).to(run.device) * float(sigmas[0])
    concat = txt2img_concat(run, width, height)
    denoiser = guided_denoiser(run.bundle, cond, req.cfg_scale, req.guidance_rescale, concat,
                               skip=req.skip_uncond)
    return run_sampler(run, denoiser, x, sigmas, req.sampler, eta=req.eta)
