"""Image upscaler models (ESRGAN and relatives), run tile by tile with overlap so a 4x upscale
of a large image fits in memory.

Loading is :func:`load_upscale_model`: noisecraft's own ESRGAN / Real-ESRGAN architectures
(:mod:`noisecraft.models.upscalers`, which says why spandrel, the library ComfyUI uses, is not
used: it requires torchvision, which cannot be installed beside this CPU torch build).
Running is :func:`upscale_tiled`, which works for
any ``model(images [B, C, h, w]) -> [B, C, s*h, s*w]``: tiles of ``tile`` input pixels overlap
by ``overlap`` pixels and are blended with linear ramps across the overlap (ComfyUI's
``tiled_scale`` idea), so seams do not show; the outer quarter of each overlap gets weight 0,
so a network whose receptive radius is below ``overlap / 4`` input pixels gives the untiled
result up to rounding.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from noisecraft.checkpoints.files import CheckpointError, open_state_dict
from noisecraft.models.upscalers import UnknownUpscaler, upscaler_from_state_dict
from noisecraft.request import InputError


def _upscaler_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of an upscaler file, read without running code: through
    ``open_state_dict``; Real-ESRGAN's ``.pth`` files nest them under ``params_ema`` (or
    ``params``), which that reader does not unwrap, so such files are re-read here, also with
    ``weights_only``."""
    try:
        with open_state_dict(path) as f:
            return dict(f.items())
    except CheckpointError as e:
        if "contains no tensors" not in str(e):
            raise InputError(f"upscale model {e}") from None
    obj = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("params_ema", "params"):
        if isinstance(obj.get(key), dict):
            return {k: v for k, v in obj[key].items() if isinstance(v, torch.Tensor)}
    raise InputError(f"upscale model {path}: no tensors (also not under params_ema / params)")


def load_upscale_model(path: str | os.PathLike, *, device=None) -> torch.nn.Module:
    """An upscaler from ``path`` (``.pth`` read with ``weights_only`` / ``.safetensors``) as a
    module ``images [B, C, h, w] in [0, 1] -> [B, C, s*h, s*w]`` with ``.scale``; the
    architecture is detected from the keys and shapes
    (:func:`noisecraft.models.upscalers.upscaler_from_state_dict`)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"upscale model {path} does not exist")
    sd = _upscaler_tensors(path)
    try:
        model = upscaler_from_state_dict(sd)
    except UnknownUpscaler as e:
        keys = ", ".join(sorted(sd)[:6])
        raise InputError(f"upscale model {path}: {e} (its first keys: {keys})") from None
    return model.to(device) if device is not None else model


def scaled_size(width: int, height: int, scale: float, multiple: int = 8) -> tuple[int, int]:
    """``(width, height)`` times ``scale``, each side rounded to the nearest multiple of
    ``multiple`` (Python's ``round``: a half goes to the even multiple) and at least one
    multiple: the output size of SD upscale and of Ultimate SD Upscale (whose
    ``round_length`` rounds the same way)."""
    return tuple(max(multiple, round(v * scale / multiple) * multiple)
                 for v in (width, height))


def blend_ramp(n: int, overlap: int, start: bool, end: bool) -> torch.Tensor:
    """Weights along one tile side: where a neighbour tile overlaps, 0 over the outer quarter of
    the overlap (where the tile's own zero padding distorts it), then rising linearly to 1;
    1 elsewhere and at the image border."""
    w = torch.ones(n)
    if overlap > 0:
        k, guard = min(overlap, n), overlap // 4
        i = torch.arange(k, dtype=torch.float32)
        r = ((i - guard + 1) / (overlap - 2 * guard + 1)).clamp(0, 1)
        if start:
            w[:k] = torch.minimum(w[:k], r)
        if end:
            w[-k:] = torch.minimum(w[-k:], r.flip(0))
    return w


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins along a side of ``size``: every ``tile - overlap``, the last flush with the
    end (one tile when ``size <= tile``)."""
    if size <= tile:
        return [0]
    step = tile - overlap
    starts = list(range(0, size - tile, step)) + [size - tile]
    return sorted(set(starts))


@torch.no_grad()
def upscale_tiled(model, images: torch.Tensor, scale: int, *, tile: int = 512,
                  overlap: int = 32) -> torch.Tensor:
    """``model`` over ``images`` [B, C, H, W] in tiles of ``tile`` px overlapping by
    ``overlap`` px, blended; returns [B, C', scale*H, scale*W] (float32, CPU-side canvas)."""
    if tile <= overlap or overlap < 0:
        raise InputError(f"tile ({tile}) must be larger than overlap ({overlap}) >= 0")
    b, _, h, w = images.shape
    out = weight = None
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    for y in ys:
        for x in xs:
            th, tw = min(tile, h - y), min(tile, w - x)
            part = model(images[..., y:y + th, x:x + tw]).float()
            if part.shape[-2:] != (th * scale, tw * scale):
                raise InputError(f"the upscaler gave {tuple(part.shape[-2:])} for a {th}x{tw} "
                                 f"tile; expected x{scale}")
            if out is None:
                out = torch.zeros(b, part.shape[1], h * scale, w * scale)
                weight = torch.zeros(1, 1, h * scale, w * scale)
            wy = blend_ramp(th * scale, overlap * scale, y > 0, y + th < h)
            wx = blend_ramp(tw * scale, overlap * scale, x > 0, x + tw < w)
            mask = (wy[:, None] * wx[None, :])[None, None]
            region = (..., slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale))
            out[region] += part.cpu() * mask
            weight[region] += mask
    return out / weight


def upscale_with_model(model, images: torch.Tensor, *, tile: int = 512, overlap: int = 32,
                       min_tile: int = 128) -> torch.Tensor:
    """ComfyUI's ImageUpscaleWithModel: ``images`` [B, C, H, W] in [0, 1] through ``model``
    (with ``.scale``) in ``tile`` px tiles overlapping by ``overlap`` px, on the model's
    device; when the device runs out of memory the tile is halved (down to ``min_tile``), as
    ComfyUI does.  Returns [B, C, s*H, s*W] float32 on the CPU, clamped to [0, 1]."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32

    def run(x: torch.Tensor) -> torch.Tensor:
        return model(x.to(device, dtype))

    while True:
        try:
            out = upscale_tiled(run, images.float(), int(model.scale), tile=tile,
                                overlap=overlap)
            return out.clamp(0, 1)
        except torch.OutOfMemoryError:
            if tile // 2 < min_tile:
                raise
            tile //= 2
