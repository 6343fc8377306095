"""Image upscaler models (ESRGAN and relatives), run tile by tile with overlap so a 4x upscale
of a large image fits in memory.

Loading goes through ``spandrel`` (the architecture library ComfyUI uses), imported only when a
file is loaded: :func:`load_upscale_model`.  Running is :func:`upscale_tiled`, which works for
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

from noisecraft.request import InputError


def load_upscale_model(path: str | os.PathLike, *, device=None) -> torch.nn.Module:
    """An upscaler from ``path`` (``.pth`` read with ``weights_only`` / ``.safetensors``) as a
    module ``images [B, 3, h, w] in [0, 1] -> [B, 3, s*h, s*w]`` with ``.scale``; the
    architecture is detected by spandrel."""
    try:
        from spandrel import ImageModelDescriptor, ModelLoader
    except ImportError:
        raise InputError(
            "upscaler models need the 'spandrel' package (pip install spandrel; it requires "
            "torchvision), which is not installed"
        ) from None
    path = Path(path)
    if not path.is_file():
        raise InputError(f"upscale model {path} does not exist")
    descriptor = ModelLoader(device=device).load_from_file(str(path))
    if not isinstance(descriptor, ImageModelDescriptor):
        raise InputError(f"{path} is not an image-to-image upscaler "
                         f"({type(descriptor).__name__})")
    model = descriptor.model.eval().requires_grad_(False)
    model.scale = descriptor.scale
    return model


def _ramp(n: int, overlap: int, start: bool, end: bool) -> torch.Tensor:
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


def _starts(size: int, tile: int, overlap: int) -> list[int]:
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
    ys, xs = _starts(h, tile, overlap), _starts(w, tile, overlap)
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
            wy = _ramp(th * scale, overlap * scale, y > 0, y + th < h)
            wx = _ramp(tw * scale, overlap * scale, x > 0, x + tw < w)
            mask = (wy[:, None] * wx[None, :])[None, None]
            region = (..., slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale))
            out[region] += part.cpu() * mask
            weight[region] += mask
    return out / weight
