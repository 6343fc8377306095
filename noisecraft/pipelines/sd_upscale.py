"""SD upscale (AUTOMATIC1111's "SD upscale" script, ComfyUI's Ultimate-SD-Upscale idea): enlarge
an image (with an upscaler model or Lanczos), then re-detail it by img2img tile by tile, the
tiles overlapping and blended, so the output can be far larger than one diffusion pass fits.

Each tile is one ordinary request through :meth:`noisecraft.engine.Engine.generate` (init image
= the tile, same prompt, settings and seed for every tile, as A1111 does), so samplers,
guidance, LoRA, ControlNet and embeddings behave as in img2img.  Only one tile is in latent
space at a time; the canvas is float32 pixels [H, W, 3] plus a weight map [H, W].

Blending: tile weights ramp linearly across the overlap (``noisecraft.upscale.blend_ramp``:
0 over its outer quarter, where a tile's border effects live, then up to 1), so neighbouring
tiles cross-fade and no tile edge is a hard step.
"""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from noisecraft.images import load_image
from noisecraft.pipelines.common import ProgressCallback
from noisecraft.request import SIZE_MULTIPLE, CancelToken, GenerationRequest, InputError
from noisecraft.upscale import blend_ramp, load_upscale_model, tile_starts, upscale_with_model

LANCZOS = "lanczos"


def upscale_image(image: Image.Image, scale: float, upscaler: str | os.PathLike = LANCZOS,
                  *, device=None) -> Image.Image:
    """``image`` enlarged ``scale`` times (each side rounded to a multiple of 8): with the
    upscaler model file ``upscaler`` (tiled; resized with Lanczos to the exact size when its
    own scale differs, as A1111 does) or plain ``"lanczos"``."""
    if scale <= 0:
        raise InputError(f"scale must be > 0, got {scale}")
    size = tuple(max(SIZE_MULTIPLE, round(v * scale / SIZE_MULTIPLE) * SIZE_MULTIPLE)
                 for v in image.size)
    if os.fspath(upscaler) != LANCZOS:
        model = load_upscale_model(upscaler, device=device)
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255)
        out = upscale_with_model(model, pixels.permute(2, 0, 1)[None])[0].permute(1, 2, 0)
        image = Image.fromarray((out.numpy() * 255).round().astype(np.uint8), "RGB")
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def _check(tile: int, overlap: int) -> None:
    for name, v in (("tile", tile), ("overlap", overlap)):
        if v % SIZE_MULTIPLE or v < 0:
            raise InputError(f"{name} must be a multiple of {SIZE_MULTIPLE} >= 0 pixels, got {v}")
    if tile <= overlap:
        raise InputError(f"tile ({tile}) must be larger than overlap ({overlap})")


def sd_upscale(
    engine,
    request: GenerationRequest,
    *,
    scale: float = 2.0,
    upscaler: str | os.PathLike = LANCZOS,
    tile: int = 512,
    overlap: int = 64,
    callback: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> Image.Image:
    """Upscale ``request.init_image`` by ``scale`` (``upscaler``: model file or ``"lanczos"``),
    then img2img each ``tile`` px tile (overlapping by ``overlap`` px; both multiples of 8)
    with ``request``'s prompt, strength, steps, sampler and seed, and blend the tiles.

    ``request.width`` / ``height`` are ignored (the size is the upscaled image's) and
    ``batch_size`` must be 1.  Returns the RGB image; ``info["seed"]`` is the seed used."""
    if request.init_image is None:
        raise InputError("SD upscale needs an init_image to enlarge")
    if request.batch_size != 1 or request.task != "img2img":
        raise InputError("SD upscale takes batch_size 1 and a plain img2img request (no mask, "
                         "outpaint or hires fix)")
    _check(tile, overlap)
    big = upscale_image(load_image(request.init_image), scale, upscaler, device=engine.device)
    w, h = big.size
    canvas = np.zeros((h, w, 3), np.float32)
    weight = np.zeros((h, w, 1), np.float32)
    seed = request.seed
    for y in tile_starts(h, tile, overlap):
        for x in tile_starts(w, tile, overlap):
            th, tw = min(tile, h - y), min(tile, w - x)
            part = big.crop((x, y, x + tw, y + th))
            tile_request = replace(request, init_image=part, width=tw, height=th, seed=seed,
                                   hires_scale=1.0)
            result = engine.generate(tile_request, callback=callback, cancel=cancel)
            seed = result.seed  # a random seed is drawn once and kept for every tile
            out = np.asarray(result.images[0].image.convert("RGB"), np.float32)
            wy = blend_ramp(th, overlap, y > 0, y + th < h)
            wx = blend_ramp(tw, overlap, x > 0, x + tw < w)
            mask = (wy[:, None] * wx[None, :]).numpy()[..., None]
            canvas[y:y + th, x:x + tw] += out * mask
            weight[y:y + th, x:x + tw] += mask
    pixels = np.clip(np.rint(canvas / weight), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    image.info["seed"] = seed
    return image
