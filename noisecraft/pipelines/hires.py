"""Hires fix (AUTOMATIC1111's): generate at the base size, enlarge, then an img2img pass at the
larger size so the model adds detail at the new resolution.

Enlarging: ``latent`` interpolates the diffusion latent bilinearly (A1111's "Latent" upscaler);
``image`` decodes, resizes with Lanczos and re-encodes.  The second pass uses ``hires_steps``
(default: ``steps``) and ``hires_strength`` with the img2img convention.  Its noise comes from
generators seeded afresh with seed + i, as in a ComfyUI graph of two KSamplers with the same
seed, so that graph reproduces the engine's hires fix exactly.  (AUTOMATIC1111 continues the
first pass's generator instead; images therefore differ from A1111's in the second pass.)
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F

from noisecraft.conditioning import Conditioning
from noisecraft.images import image_to_tensor, resize_to, tensor_to_images
from noisecraft.pipelines.common import (
    Run,
    decode_latents,
    encode_images,
    generators_for,
    guided_denoiser,
    vae_factor,
)
from noisecraft.pipelines.img2img import img2img
from noisecraft.pipelines.inpaint import txt2img_concat
from noisecraft.request import GenerationRequest, InputError, check_size


def hires_size(width: int, height: int, scale: float) -> tuple[int, int]:
    """The enlarged size; refused (with the nearest valid sizes) unless a multiple of 8."""
    w, h = round(width * scale), round(height * scale)
    try:
        return check_size(w, "hires width"), check_size(h, "hires height")
    except InputError as e:
        raise InputError(f"hires_scale {scale} on {width}x{height} gives {w}x{h}: {e}") from None


def upscale(run: Run, latents: torch.Tensor, width: int, height: int, mode: str) -> torch.Tensor:
    f = vae_factor(run.bundle)
    if mode == "latent":
        return F.interpolate(latents, size=(height // f, width // f), mode="bilinear",
                             align_corners=False)
    images = [resize_to(im, width, height) for im in tensor_to_images(decode_latents(
        run.bundle, latents))]
    pixels = torch.cat([image_to_tensor(im) for im in images])
    return encode_images(run.bundle, pixels, run.device)


def hires_fix(
    run: Run, req: GenerationRequest, cond: Conditioning, latents: torch.Tensor,
    width: int, height: int,
) -> torch.Tensor:
    """Latents [B, C, height/8, width/8] from base latents; ``cond`` encoded at the new size."""
    big = upscale(run, latents, width, height, req.hires_upscale)
    run = replace(run, generators=generators_for([g.initial_seed() for g in run.generators]))
    concat = txt2img_concat(run, width, height)
    denoiser = guided_denoiser(run.bundle, cond, req.cfg_scale, req.guidance_rescale, concat,
                               skip=req.skip_uncond)
    return img2img(
        run, denoiser, big, steps=req.hires_steps or req.steps, strength=req.hires_strength,
        sampler=req.sampler, scheduler=req.scheduler, eta=req.eta, stage="hires",
        steps_offset=req.steps_offset,
    )
