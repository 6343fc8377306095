"""``generate_image()`` and ``sd_upscale_image()``: the Python entry points.  They build a
request and call the engine (``sd_upscale_image`` through the SD-upscale pipeline, which calls
the engine once per tile).

    >>> from noisecraft import generate_image, sd_upscale_image
    >>> image = generate_image("a red circle", model="sd15.safetensors", seed=42)  # doctest: +SKIP
    >>> image.info["seed"], image.info["parameters"]                               # doctest: +SKIP
    >>> big = sd_upscale_image(image, "a red circle", model="sd15.safetensors")   # doctest: +SKIP

Each call without ``engine=`` builds a fresh :class:`~noisecraft.engine.Engine` and loads the
model again; pass one ``Engine`` to keep models loaded (and the compute backend's packed or
compiled modules made) across calls.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from noisecraft.engine import Engine
from noisecraft.metadata import PARAMETERS_KEY, SETTINGS_KEY, format_parameters
from noisecraft.pipelines.common import ProgressCallback
from noisecraft.pipelines.sd_upscale import LANCZOS, sd_upscale
from noisecraft.request import (
    CancelToken,
    GeneratedImage,
    GenerationRequest,
    ImageInput,
    InputError,
)


def _annotated(g: GeneratedImage) -> Image.Image:
    g.image.info["seed"] = g.seed
    g.image.info[PARAMETERS_KEY] = format_parameters(g.settings)
    g.image.info[SETTINGS_KEY] = json.dumps(g.settings, sort_keys=True)
    return g.image


def _engine(engine: Engine | None, device, dtype, backend: str | None) -> Engine:
    """``engine``, or a new one on ``device`` / ``dtype`` / ``backend``."""
    if engine is None:
        return Engine(device=device, dtype=dtype, backend=backend)
    if backend is not None and backend != engine.backend.name:
        raise InputError(f"backend={backend!r} applies to a new engine; the engine passed runs "
                         f"{engine.backend.name!r} (choose it with Engine(backend=...))")
    return engine


def _control_entry(engine: Engine, entry: Any) -> Any:
    """Register an in-memory ControlNet given in ``entry`` on ``engine``; name it instead."""
    from noisecraft.models.controlnet import ControlNet

    def named(model: Any) -> Any:
        if isinstance(model, ControlNet):
            return engine.register_controlnet(f"<ControlNet {id(model):x}>", model)
        return model

    if isinstance(entry, tuple | list) and entry:
        return (named(entry[0]), *entry[1:])
    if isinstance(entry, dict) and "model" in entry:
        return {**entry, "model": named(entry["model"])}
    return entry


def generate_image(
    prompt: str,
    *,
    negative_prompt: str = "",
    model: str | None = None,
    steps: int = 20,
    cfg_scale: float = 7.0,
    seed: int | None = None,
    sampler: str = "euler",
    scheduler: str = "normal",
    steps_offset: int | None = None,
    width: int | None = None,
    height: int | None = None,
    batch_size: int = 1,
    init_image: ImageInput | None = None,
    strength: float = 0.75,
    mask: ImageInput | None = None,
    mask_blur: int = 4,
    mask_grow: int = 0,
    outpaint: tuple[int, int, int, int] = (0, 0, 0, 0),
    outpaint_fill: str = "edge",
    hires_scale: float = 1.0,
    hires_upscale: str = "latent",
    hires_steps: int | None = None,
    hires_strength: float = 0.5,
    clip_skip: int | None = None,
    guidance_rescale: float = 0.0,
    uncond_min_sigma: float = 0.0,
    uncond_min_sigma_all_steps: bool = False,
    eta: float | None = None,
    controlnets: Sequence[Any] = (),
    embeddings_dir: str | os.PathLike | None = None,
    loras: Sequence[Any] = (),
    loras_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    callback: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    engine: Engine | None = None,
) -> Image.Image | list[Image.Image]:
    """Generate an image; a list of ``batch_size`` images when ``batch_size > 1``.

    Args:
        prompt, negative_prompt: text with AUTOMATIC1111 weighting syntax (``(word:1.3)``,
            ``[word]``, ``BREAK``); longer than 75 tokens is chunked.  ``<lora:NAME>``,
            ``<lora:NAME:WEIGHT>`` and ``<lora:NAME:TE_WEIGHT:UNET_WEIGHT>`` tags apply the
            LoRA ``NAME`` from ``loras_dir`` (and are removed before the text is encoded).
        model: checkpoint path or a name registered on ``engine``; None = the built-in default
            model at its native size (raises ``DefaultModelMissing`` until its weights exist).
        steps, cfg_scale, sampler, scheduler: sampler (``noisecraft samplers`` lists them) and
            spacing names are ComfyUI's, plus diffusers' timestep spacings ``leading``,
            ``trailing`` and ``linspace``.
        steps_offset: diffusers' ``steps_offset`` of the ``leading`` spacing (refused with
            other spacings); None = the model family's (1 for SD 1.x/2.x/SDXL, as their
            diffusers configs).  ``scheduler="leading"`` with the default is SD 1.5's own
            diffusers schedule (PNDM/DDIM config: leading spacing, steps_offset 1).
        seed: image i uses ``seed + i``; None picks a random seed (``image.info["seed"]``).
        width, height: multiples of 8 (others are refused, naming the nearest valid sizes);
            default the model's native size, or the init image's size.
        init_image, strength: img2img; ``strength`` in (0, 1] (diffusers' step convention).
        mask, mask_blur, mask_grow: inpainting (white = repaint); blur/grow in pixels.
        outpaint, outpaint_fill: extend ``init_image`` by (left, top, right, bottom) pixels and
            inpaint the new area (``edge`` or ``mean`` initial fill).
        hires_scale, hires_upscale, hires_steps, hires_strength: hires fix for txt2img.
        clip_skip: 1 = last layer; None = the model family's default.
        guidance_rescale, eta: CFG rescale (Lin et al. 2023); eta for samplers that take it.
            A ``*_cfg_pp`` sampler uses CFG++ guidance (useful cfg_scale ~ 0.5-2).
        uncond_min_sigma, uncond_min_sigma_all_steps: AUTOMATIC1111's "Negative Guidance
            minimum sigma" (NGMS, option ``s_min_uncond``): while the step's sigma is below
            it, every other denoiser call (every call with ``uncond_min_sigma_all_steps``, A1111's
            ``s_min_uncond_all``) skips the negative-prompt pass and uses the prompt's
            prediction alone, about half the U-Net work of that call.  0 = off; refused with
            a CFG++ sampler.  See :class:`noisecraft.guidance.SkipUncond`.
        controlnets: ControlNets, each ``(model, image, strength)``, ``(model, image,
            strength, start_percent, end_percent)``, a dict of those names (plus
            ``preprocessor``: ``"none"`` or ``"canny"``) or a ``ControlNetUnit``; ``model`` is a
            file/folder path, a name registered on the engine, or a loaded ``ControlNet``
            (registered on the engine for the call); ``image`` a path or PIL image.
        embeddings_dir: a folder of textual-inversion embeddings (``.pt`` / ``.safetensors``)
            that prompts name as ``embedding:name`` (ComfyUI) or by the bare name (A1111).
        loras: LoRAs to merge into the model for this call, each a file path (or a name in
            ``loras_dir``), ``(path, weight)`` or ``(path, unet_weight,
            text_encoder_weight)``; kohya/A1111 and diffusers/PEFT files.  A file named
            several times (here or in tags) gets the sum of its weights.
        loras_dir: the folder prompt tags ``<lora:NAME:W>`` are looked up in (NAME: the
            file's path in it without suffix, or its bare stem).
        device, dtype, backend: for a new engine (``backend``: a name from
            ``noisecraft.backends.backend_names()``, default "onednn" on CPU, see
            :class:`~noisecraft.engine.Engine`); device and dtype are ignored when ``engine``
            is given, and a ``backend`` other than the engine's is refused.
        callback: called with a ``ProgressEvent`` after every step.
        cancel: a ``CancelToken``; cancelling raises ``Interrupted`` (no partial result).
        engine: an ``Engine`` to reuse (keeps models loaded).

    Returns:
        PIL image(s); ``image.info`` holds ``seed``, ``parameters`` (A1111 text) and
        ``noisecraft`` (JSON settings).
    """
    engine = _engine(engine, device, dtype, backend)
    request = GenerationRequest(
        prompt=prompt, negative_prompt=negative_prompt, model=model, steps=steps,
        cfg_scale=cfg_scale, guidance_rescale=guidance_rescale, uncond_min_sigma=uncond_min_sigma,
        uncond_min_sigma_all_steps=uncond_min_sigma_all_steps, seed=seed, sampler=sampler,
        scheduler=scheduler, steps_offset=steps_offset, width=width, height=height,
        batch_size=batch_size,
        clip_skip=clip_skip, init_image=init_image, strength=strength, mask=mask,
        mask_blur=mask_blur, mask_grow=mask_grow, outpaint=tuple(outpaint),
        outpaint_fill=outpaint_fill, hires_scale=hires_scale, hires_upscale=hires_upscale,
        hires_steps=hires_steps, hires_strength=hires_strength, eta=eta,
        controlnets=tuple(_control_entry(engine, c) for c in controlnets),
        embeddings_dir=embeddings_dir, loras=loras, loras_dir=loras_dir,
    )
    result = engine.generate(request, callback=callback, cancel=cancel)
    images = [_annotated(g) for g in result.images]
    return images[0] if batch_size == 1 else images


def sd_upscale_image(
    image: ImageInput,
    prompt: str = "",
    *,
    scale: float = 2.0,
    upscaler: str | os.PathLike = LANCZOS,
    tile: int | tuple[int, int] | None = None,
    overlap: int = 64,
    strength: float = 0.3,
    negative_prompt: str = "",
    model: str | None = None,
    steps: int = 20,
    cfg_scale: float = 7.0,
    seed: int | None = None,
    sampler: str = "euler",
    scheduler: str = "normal",
    steps_offset: int | None = None,
    clip_skip: int | None = None,
    guidance_rescale: float = 0.0,
    uncond_min_sigma: float = 0.0,
    uncond_min_sigma_all_steps: bool = False,
    eta: float | None = None,
    embeddings_dir: str | os.PathLike | None = None,
    loras: Sequence[Any] = (),
    loras_dir: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    backend: str | None = None,
    callback: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    engine: Engine | None = None,
) -> Image.Image:
    """Tiled diffusion upscaling (AUTOMATIC1111's "SD upscale" script): enlarge ``image``,
    then re-detail it by img2img tile by tile, the overlapping tiles cross-faded
    (:func:`noisecraft.pipelines.sd_upscale.sd_upscale`, which this calls).

    Args:
        image: a path or PIL image.
        prompt, negative_prompt: for every tile (so describe the style and quality, not the
            layout: each tile sees only its part of the image).
        scale: the enlargement factor (each side then rounded to a multiple of 8).
        upscaler: ``"lanczos"``, an upscaler model file (ESRGAN / Real-ESRGAN ``.pth`` or
            ``.safetensors``; resized to exactly ``scale`` with Lanczos when its own factor
            differs), or ``"none"`` (no enlargement, ``scale`` ignored, as A1111's "None").
        tile: tile size in pixels (``N`` or ``(width, height)``, multiples of 8); None = the
            model's native size (A1111 uses the img2img width and height).
        overlap: pixels neighbouring tiles share (a multiple of 8 below the tile size; A1111's
            default 64).
        strength: img2img denoising strength of each tile; 0.2-0.4 adds detail and keeps the
            picture, higher values repaint each tile.
        model, steps, cfg_scale, seed, sampler, scheduler, steps_offset, clip_skip,
        guidance_rescale, uncond_min_sigma, uncond_min_sigma_all_steps, eta, embeddings_dir,
        loras, loras_dir, device, dtype, backend,
        callback, cancel, engine: as :func:`generate_image`; tile k (0-based, row by row)
            uses ``seed + k`` (as A1111), and progress events carry the stage ``"tile K/N"``.

    Returns:
        The upscaled RGB image; ``image.info`` holds ``seed``, ``parameters`` (A1111 text with
        ``SD upscale overlap`` and ``SD upscale upscaler``; ``Size`` is the tile size, as
        A1111 writes it) and ``noisecraft`` (JSON settings, with ``sd_upscale``).
    """
    engine = _engine(engine, device, dtype, backend)
    request = GenerationRequest(
        prompt=prompt, negative_prompt=negative_prompt, model=model, steps=steps,
        cfg_scale=cfg_scale, guidance_rescale=guidance_rescale, uncond_min_sigma=uncond_min_sigma,
        uncond_min_sigma_all_steps=uncond_min_sigma_all_steps, seed=seed, sampler=sampler,
        scheduler=scheduler, steps_offset=steps_offset, clip_skip=clip_skip,
        init_image=image, strength=strength, eta=eta, embeddings_dir=embeddings_dir,
        loras=loras, loras_dir=loras_dir,
    )
    return _annotated(sd_upscale(engine, request, scale=scale, upscaler=upscaler, tile=tile,
                                 overlap=overlap, callback=callback, cancel=cancel))
