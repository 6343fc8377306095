"""One request through the right pipeline: resolve sizes and inputs, encode the prompt, run
txt2img / img2img / inpaint / outpaint (+ hires fix), decode, paste back.

This is the only place that picks a task; each task is a short loop in its own module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from noisecraft.conditioning import encode_conditioning
from noisecraft.embeddings import PromptEmbeddings
from noisecraft.images import (
    check_same_size,
    extend_canvas,
    grow_and_blur,
    image_to_tensor,
    load_image,
    load_mask,
    mask_to_tensor,
    resize_to,
)
from noisecraft.pipelines.common import (
    Run,
    check_sampler,
    decode_latents,
    encode_images,
    guided_denoiser,
)
from noisecraft.pipelines.hires import hires_fix, hires_size
from noisecraft.pipelines.img2img import img2img
from noisecraft.pipelines.inpaint import inpaint, paste_back, txt2img_concat
from noisecraft.pipelines.txt2img import txt2img
from noisecraft.request import GenerationRequest, InputError, check_size


@dataclass(frozen=True)
class PipelineOutput:
    """Final latents, decoded images [B, 3, H, W] in [-1, 1], and the first-pass size."""

    latents: torch.Tensor
    images: torch.Tensor
    width: int
    height: int


def _conditioning(run: Run, req: GenerationRequest, width: int, height: int):
    embeddings = PromptEmbeddings.from_dir(req.embeddings_dir) if req.embeddings_dir else None
    return encode_conditioning(
        run.bundle, req.prompt, req.negative_prompt, width=width, height=height,
        clip_skip=req.clip_skip, embeddings=embeddings,
    )


def _input_size(req: GenerationRequest, image_size: tuple[int, int]) -> tuple[int, int]:
    """width/height if given (the image is resized to them), else the image's own size."""
    width = req.width if req.width is not None else image_size[0]
    height = req.height if req.height is not None else image_size[1]
    try:
        return check_size(width, "width"), check_size(height, "height")
    except InputError as e:
        if req.width is None or req.height is None:
            raise InputError(
                f"the init image is {image_size[0]}x{image_size[1]}: {e}; pass width and height "
                "to resize it"
            ) from None
        raise


def run_request(run: Run, req: GenerationRequest) -> PipelineOutput:
    check_sampler(req.sampler)
    if req.task == "txt2img":
        return _txt2img(run, req)
    image = load_image(req.init_image)
    mask = None
    if req.mask is not None:
        mask = load_mask(req.mask)
        check_same_size(image, mask)
    width, height = _input_size(req, image.size)
    image = resize_to(image, width, height)
    if req.task == "img2img":
        cond = _conditioning(run, req, width, height)
        latent = _encode(run, image_to_tensor(image))
        concat = txt2img_concat(run, width, height)
        denoiser = guided_denoiser(run.bundle, cond, req.cfg_scale, req.guidance_rescale, concat,
                                   skip=req.skip_uncond)
        latents = img2img(run, denoiser, latent, steps=req.steps, strength=req.strength,
                          sampler=req.sampler, scheduler=req.scheduler, eta=req.eta,
                          steps_offset=req.steps_offset)
        return PipelineOutput(latents, decode_latents(run.bundle, latents), width, height)
    strength = req.strength
    if req.task == "outpaint":
        image, mask = extend_canvas(image, *req.outpaint, fill=req.outpaint_fill)
        strength = 1.0  # the new area has nothing to keep
    else:
        mask = resize_to(mask, width, height)
    mask = mask_to_tensor(grow_and_blur(mask, req.mask_grow, req.mask_blur))
    pixels = image_to_tensor(image)
    cond = _conditioning(run, req, image.width, image.height)
    latents = inpaint(run, req, cond, pixels, mask, strength)
    images = paste_back(pixels, decode_latents(run.bundle, latents), mask)
    return PipelineOutput(latents, images, width, height)


def _encode(run: Run, pixels: torch.Tensor) -> torch.Tensor:
    return encode_images(run.bundle, pixels, run.device).expand(run.batch, -1, -1, -1)


def _txt2img(run: Run, req: GenerationRequest) -> PipelineOutput:
    native = run.bundle.family.native_size
    width = req.width if req.width is not None else native
    height = req.height if req.height is not None else native
    latents = txt2img(run, req, _conditioning(run, req, width, height), width, height)
    if req.hires_scale > 1:
        w2, h2 = hires_size(width, height, req.hires_scale)
        latents = hires_fix(run, req, _conditioning(run, req, w2, h2), latents, w2, h2)
    return PipelineOutput(latents, decode_latents(run.bundle, latents), width, height)
