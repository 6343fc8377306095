"""SD upscale (AUTOMATIC1111's "SD upscale" script, ComfyUI's Ultimate-SD-Upscale idea): enlarge
an image (with an upscaler model or Lanczos), then re-detail it by img2img tile by tile, the
tiles overlapping and blended, so the output can be far larger than one diffusion pass fits.

Each tile is one ordinary request through :meth:`noisecraft.engine.Engine.generate` (init image
= the tile, same prompt and settings for every tile), so samplers, guidance, LoRA and
embeddings behave as in img2img.  Tile k (0-based, row by row) uses seed ``seed + k``, as
AUTOMATIC1111's script does with batch size 1 (it advances the seed by one per batch of tiles).
Only one tile is in latent space at a time; the canvas is
float32 pixels [H, W, 3] plus a weight map [H, W].  Progress events carry the stage
``"tile K/N"``.

Blending: tile weights ramp linearly across the overlap (``noisecraft.upscale.blend_ramp``:
0 over its outer quarter, where a tile's border effects live, then up to 1), so neighbouring
tiles cross-fade and no tile edge is a hard step.

The front doors: :func:`noisecraft.api.sd_upscale_image` (Python), ``noisecraft upscale``
(CLI) and the A1111 API's img2img with ``"script_name": "SD upscale"`` all call
:func:`sd_upscale`.
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import torch
from PIL import Image

from noisecraft.images import load_image
from noisecraft.pipelines.common import ProgressCallback
from noisecraft.request import (
    SIZE_MULTIPLE,
    CancelToken,
    GeneratedImage,
    GenerationRequest,
    InputError,
)
from noisecraft.upscale import (
    blend_ramp,
    load_upscale_model,
    scaled_size,
    tile_starts,
    upscale_with_model,
)

LANCZOS = "lanczos"
NONE = "none"  # A1111's "None" upscaler: no enlargement (``scale`` is ignored)
TileSize = int | tuple[int, int]


def upscale_image(image: Image.Image, scale: float, upscaler: str | os.PathLike = LANCZOS,
                  *, device=None) -> Image.Image:
    """``image`` enlarged ``scale`` times (each side rounded to a multiple of 8): with the
    upscaler model file ``upscaler`` (tiled; resized with Lanczos to the exact size when its
    own scale differs, as A1111 does), plain ``"lanczos"``, or ``"none"`` (not enlarged; only
    the sides rounded)."""
    check_scale(scale)
    if os.fspath(upscaler) == NONE:
        scale = 1.0
    size = scaled_size(*image.size, scale, SIZE_MULTIPLE)
    if os.fspath(upscaler) not in (LANCZOS, NONE):
        model = load_upscale_model(upscaler, device=device)
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), np.float32) / 255)
        out = upscale_with_model(model, pixels.permute(2, 0, 1)[None])[0].permute(1, 2, 0)
        image = Image.fromarray((out.numpy() * 255).round().astype(np.uint8), "RGB")
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def check_scale(scale: float) -> None:
    if not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
        raise InputError(f"scale must be a number > 0 (2 = twice the width and height), "
                         f"got {scale!r}")


def tile_pair(tile: TileSize) -> tuple[int, int]:
    """``tile`` as (width, height)."""
    if isinstance(tile, int):
        return tile, tile
    try:
        width, height = tile
    except (TypeError, ValueError):
        raise InputError(f"tile must be N or (width, height) pixels, got {tile!r}") from None
    return width, height


def check_tiles(tile: TileSize, overlap: int) -> None:
    """Refuse a tile size (square ``N`` or ``(width, height)``) or overlap that cannot work:
    both multiples of 8 pixels, each tile side larger than the overlap."""
    tw, th = tile_pair(tile)
    for name, v in (("tile", tw), ("tile", th), ("overlap", overlap)):
        if not isinstance(v, int) or isinstance(v, bool) or v % SIZE_MULTIPLE or v < 0:
            raise InputError(f"{name} must be a multiple of {SIZE_MULTIPLE} >= 0 pixels, got {v}")
    if min(tw, th) <= overlap:
        label = str(tw) if tw == th else f"{tw}x{th}"
        raise InputError(f"tile ({label}) must be larger than overlap ({overlap})")


def _staged(callback: ProgressCallback | None, stage: str) -> ProgressCallback | None:
    if callback is None:
        return None
    return lambda event: callback(replace(event, stage=stage))


def sd_upscale(
    engine,
    request: GenerationRequest,
    *,
    scale: float = 2.0,
    upscaler: str | os.PathLike = LANCZOS,
    tile: TileSize | None = None,
    overlap: int = 64,
    callback: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> GeneratedImage:
    """Upscale ``request.init_image`` by ``scale`` (``upscaler``: model file, ``"lanczos"`` or
    ``"none"``), then img2img each tile (``tile`` px square, or ``(width, height)``; None =
    the model's native size) overlapping by ``overlap`` px (all multiples of 8) with
    ``request``'s prompt, strength, steps and sampler, tile k with seed ``seed + k``, and blend
    the tiles.

    ``request.width`` / ``height`` are ignored (the size is the upscaled image's) and
    ``batch_size`` must be 1.  Returns the RGB image with its seed and settings: the first
    tile's (model hash, LoRA hashes, ...), with ``init_image`` the request's, ``width`` x
    ``height`` the tile size (A1111's ``Size`` of an SD upscale) and ``sd_upscale`` holding
    ``scale``, ``upscaler``, ``tile`` and ``overlap``."""
    if request.init_image is None:
        raise InputError("SD upscale needs an init_image to enlarge")
    if request.batch_size != 1 or request.task != "img2img":
        raise InputError("SD upscale takes batch_size 1 and a plain img2img request (no mask, "
                         "outpaint or hires fix)")
    if request.controlnets:
        raise InputError("SD upscale does not tile ControlNet images (each tile would see the "
                         "whole control image); drop controlnets")
    check_scale(scale)
    if tile is None:
        tile = engine.model(request.model).family.native_size
    check_tiles(tile, overlap)
    tile_w, tile_h = tile_pair(tile)
    big = upscale_image(load_image(request.init_image), scale, upscaler, device=engine.device)
    w, h = big.size
    canvas = np.zeros((h, w, 3), np.float32)
    weight = np.zeros((h, w, 1), np.float32)
    origins = [(x, y) for y in tile_starts(h, tile_h, overlap)
               for x in tile_starts(w, tile_w, overlap)]
    seed, settings = request.seed, None
    for k, (x, y) in enumerate(origins, 1):
        tile_seed = None if seed is None else seed + k - 1
        th, tw = min(tile_h, h - y), min(tile_w, w - x)
        part = big.crop((x, y, x + tw, y + th))
        tile_request = replace(request, init_image=part, width=tw, height=th, seed=tile_seed,
                               hires_scale=1.0)
        stage = f"tile {k}/{len(origins)}"
        result = engine.generate(tile_request, callback=_staged(callback, stage), cancel=cancel)
        if seed is None:  # a random seed is drawn once, by the first tile
            seed = result.seed
        if settings is None:
            settings = result.images[0].settings
        out = np.asarray(result.images[0].image.convert("RGB"), np.float32)
        wy = blend_ramp(th, overlap, y > 0, y + th < h)
        wx = blend_ramp(tw, overlap, x > 0, x + tw < w)
        mask = (wy[:, None] * wx[None, :]).numpy()[..., None]
        canvas[y:y + th, x:x + tw] += out * mask
        weight[y:y + th, x:x + tw] += mask
    pixels = np.clip(np.rint(canvas / weight), 0, 255).astype(np.uint8)
    settings = {**settings, "init_image": request.settings()["init_image"],
                "width": tile_w, "height": tile_h,
                "sd_upscale": {"scale": scale, "upscaler": os.fspath(upscaler),
                               "tile": [tile_w, tile_h], "overlap": overlap}}
    return GeneratedImage(Image.fromarray(pixels, "RGB"), seed, settings)
