"""Inpainting: repaint the masked part of an image, keep the rest.

Two ways, chosen by the model:

* **Inpainting models** (9-channel U-Net, ``bundle.inpaint``): the U-Net input is
  ``[x, mask, masked_image_latent]`` along channels (diffusers' and ComfyUI's order), with the
  mask binarised at 0.5, downsampled to latent size (nearest), and the masked image
  ``image * (mask < 0.5)`` encoded by the VAE.
* **Ordinary models**: masked latent blending at every model call
  (:func:`~noisecraft.pipelines.common.masked_denoiser`), with the grown and blurred mask
  averaged down to latent size; after the last step the unmasked latent is the original's.

Either way, the decoded image is pasted back over the original through the (grown, blurred)
pixel mask, as AUTOMATIC1111 does: where that mask is 0 the output pixels equal the input
pixels exactly.  The run starts as img2img does (``strength``, diffusers' convention), at
strength 1 too: diffusers' inpaint pipeline starts from pure noise there, dropping the image
latent, and otherwise matches (tests/parity/test_img2img_inpaint_parity.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from noisecraft.conditioning import Conditioning
from noisecraft.pipelines.common import (
    Run,
    downsample_mask,
    encode_images,
    guided_denoiser,
    masked_denoiser,
    model_sigmas,
    run_sampler,
    strength_start,
    vae_factor,
)
from noisecraft.request import GenerationRequest


def inpaint_concat(run: Run, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The extra U-Net channels of an inpainting model: [B, 1 + C, h, w] = binary mask at latent
    size and the latent of the image with the masked part blanked (0 = grey in [-1, 1])."""
    binary = (mask >= 0.5).float()
    masked = encode_images(run.bundle, image * (1 - binary), run.device)
    small = F.interpolate(binary, size=masked.shape[-2:], mode="nearest").to(masked.device)
    return torch.cat([small, masked], dim=1).expand(run.batch, -1, -1, -1)


def txt2img_concat(run: Run, width: int, height: int) -> torch.Tensor | None:
    """For an inpainting model used without a mask (txt2img, hires pass): everything is to be
    repainted and the masked image is empty, as diffusers and ComfyUI do.  None otherwise."""
    if not run.bundle.inpaint:
        return None
    return inpaint_concat(run, torch.zeros(1, 3, height, width), torch.ones(1, 1, height, width))


def inpaint(
    run: Run,
    req: GenerationRequest,
    cond: Conditioning,
    image: torch.Tensor,
    mask: torch.Tensor,
    strength: float,
) -> torch.Tensor:
    """Latents [B, C, h, w] of ``image`` [1, 3, H, W] repainted where ``mask`` [1, 1, H, W]
    (values in [0, 1], 1 = repaint) says."""
    from noisecraft.pipelines.img2img import noised_start

    bundle = run.bundle
    latent = encode_images(bundle, image, run.device).expand(run.batch, -1, -1, -1)
    sigmas = model_sigmas(bundle, req.scheduler, req.steps, req.steps_offset)
    start = strength_start(req.steps, strength)
    x, noise = noised_start(run, latent, float(sigmas[start]))
    if bundle.inpaint:
        concat = inpaint_concat(run, image, mask)
        denoiser = guided_denoiser(bundle, cond, req.cfg_scale, req.guidance_rescale, concat,
                                   skip=req.skip_uncond)
        return run_sampler(run, denoiser, x, sigmas, req.sampler, start_step=start, eta=req.eta)
    small = downsample_mask(mask, vae_factor(bundle)).to(run.device)
    guided = guided_denoiser(bundle, cond, req.cfg_scale, req.guidance_rescale,
                             skip=req.skip_uncond)
    denoiser = masked_denoiser(guided, latent, small, noise)
    x = run_sampler(run, denoiser, x, sigmas, req.sampler, start_step=start, eta=req.eta)
    return x * small + latent * (1 - small)


def paste_back(original: torch.Tensor, generated: torch.Tensor, mask: torch.Tensor):
    """Pixels [B, 3, H, W]: ``generated`` where mask is 1, ``original`` where it is 0."""
    mask = mask.to(generated.device)
    return generated * mask + original.to(generated.device) * (1 - mask)
