"""Tensor helpers shared by the image, mask and latent nodes (ComfyUI's layouts).

IMAGE is [B, H, W, C] float in [0, 1]; MASK is [B, H, W] (or [H, W]); a LATENT is a dict
``{"samples": [B, C, h, w], ...}`` that may carry ``noise_mask`` and ``batch_index``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

TORCH_METHODS = ("nearest-exact", "bilinear", "area", "bicubic")
LATENT_UPSCALE_METHODS = TORCH_METHODS  # ComfyUI also offers "bislerp" (not implemented yet)
IMAGE_UPSCALE_METHODS = (*TORCH_METHODS, "lanczos")
CROP_METHODS = ("disabled", "center")


def center_crop_to_aspect(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Crop [B, C, H, W] symmetrically to the aspect ratio width:height."""
    old_h, old_w = x.shape[-2:]
    old_aspect, new_aspect = old_w / old_h, width / height
    dx = dy = 0
    if old_aspect > new_aspect:
        dx = round((old_w - old_w * (new_aspect / old_aspect)) / 2)
    elif old_aspect < new_aspect:
        dy = round((old_h - old_h * (old_aspect / new_aspect)) / 2)
    return x[..., dy:old_h - dy, dx:old_w - dx]


def _lanczos(x: torch.Tensor, width: int, height: int) -> torch.Tensor:
    out = []
    for item in x:  # [C, H, W] in [0, 1], through 8-bit PIL images as ComfyUI does
        a = (item.movedim(0, -1).clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
        im = Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a)
        b = np.asarray(im.resize((width, height), Image.LANCZOS), dtype=np.float32) / 255.0
        t = torch.from_numpy(b)
        out.append((t.unsqueeze(-1) if t.ndim == 2 else t).movedim(-1, 0))
    return torch.stack(out).to(x.dtype)


def resize(x: torch.Tensor, width: int, height: int, method: str, crop: str = "disabled"):
    """[B, C, H, W] -> [B, C, height, width] (ComfyUI's ``common_upscale``)."""
    if width < 1 or height < 1:
        raise ValueError(f"target size must be at least 1x1, got {width}x{height}")
    if crop == "center":
        x = center_crop_to_aspect(x, width, height)
    elif crop != "disabled":
        raise ValueError(f"unknown crop {crop!r}; choose one of: {', '.join(CROP_METHODS)}")
    if method == "lanczos":
        return _lanczos(x, width, height)
    if method not in TORCH_METHODS:
        raise ValueError(f"unknown upscale method {method!r}; choose one of: "
                         f"{', '.join(IMAGE_UPSCALE_METHODS)}")
    return F.interpolate(x, size=(height, width), mode=method)


def image_to_pil(image: torch.Tensor) -> Image.Image:
    """One IMAGE item [H, W, C] in [0, 1] -> 8-bit PIL image (rounded down, as ComfyUI)."""
    a = np.clip(255.0 * image.detach().float().cpu().numpy(), 0, 255).astype(np.uint8)
    return Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a)


def as_batch_mask(mask: torch.Tensor) -> torch.Tensor:
    """MASK [H, W] or [B, H, W] (or [B, 1, H, W]) -> [B, H, W]."""
    return mask.reshape((-1, mask.shape[-2], mask.shape[-1]))


def repeat_to_batch(t: torch.Tensor, batch: int) -> torch.Tensor:
    """Tile a batch [b, ...] (masks, latents, images) to at least ``batch`` items, then cut it
    to ``batch`` (ComfyUI's ``repeat_to_batch_size``)."""
    if t.shape[0] < batch:
        reps = -(-batch // t.shape[0])
        t = t.repeat(reps, *([1] * (t.ndim - 1)))
    return t[:batch]


def match_latent(target_shape: torch.Size, x: torch.Tensor) -> torch.Tensor:
    """``x`` [b, C, h, w] resized (bilinear, centre crop) to ``target_shape``'s h and w and
    tiled or cut to its batch (ComfyUI's ``reshape_latent_to``)."""
    if x.shape[1:] != target_shape[1:]:
        x = resize(x, target_shape[-1], target_shape[-2], "bilinear", "center")
    return repeat_to_batch(x, target_shape[0])


def alpha_fix(destination: torch.Tensor, source: torch.Tensor):
    """Make two IMAGEs' channel counts agree as ComfyUI's ``image_alpha_fix`` does: an RGBA
    source over an RGB destination loses its alpha; an RGB source over an RGBA destination
    gains an opaque alpha channel.  Returns (destination, source)."""
    if destination.shape[-1] < source.shape[-1]:
        source = source[..., :destination.shape[-1]]
    elif destination.shape[-1] > source.shape[-1]:
        source = F.pad(source, (0, 1), value=1.0)
    return destination, source


def composite(destination: torch.Tensor, source: torch.Tensor, x: int, y: int,
              mask: torch.Tensor | None = None, multiplier: int = 8,
              resize_source: bool = False) -> torch.Tensor:
    """Paste ``source`` [b, C, h, w] onto ``destination`` [B, C, H, W] (modified in place and
    returned) with its top-left corner at pixel (x, y), i.e. at (x // multiplier, y //
    multiplier) in tensor pixels (8 for latents, 1 for images).  ``mask`` (any size, resized
    bilinearly to the source) weights the source: out = mask * source + (1 - mask) * dest.
    The source is tiled to the destination's batch; whatever falls outside is dropped
    (ComfyUI's ``nodes_mask.composite``)."""
    if resize_source:
        source = F.interpolate(source, size=destination.shape[-2:], mode="bilinear")
    source = repeat_to_batch(source.to(destination.device), destination.shape[0])
    height, width = destination.shape[-2:]
    left = min(max(x, 0), width * multiplier) // multiplier
    top = min(max(y, 0), height * multiplier) // multiplier
    visible_h = min(source.shape[-2], height - top)
    visible_w = min(source.shape[-1], width - left)
    if mask is None:
        weight = torch.ones_like(source[:, :1])
    else:
        m = mask.to(destination.device, dtype=source.dtype)
        weight = F.interpolate(m.reshape(-1, 1, m.shape[-2], m.shape[-1]),
                               size=source.shape[-2:], mode="bilinear")
        weight = repeat_to_batch(weight, source.shape[0])
    weight = weight[..., :visible_h, :visible_w]
    region = (..., slice(top, top + visible_h), slice(left, left + visible_w))
    destination[region] = (weight * source[..., :visible_h, :visible_w]
                           + (1 - weight) * destination[region])
    return destination
