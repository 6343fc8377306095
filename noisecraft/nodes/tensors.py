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


def repeat_masks(masks: torch.Tensor, batch: int) -> torch.Tensor:
    """Tile a mask batch [b, ...] to at least ``batch`` items, cut to ``batch``."""
    if masks.shape[0] < batch:
        reps = -(-batch // masks.shape[0])
        masks = masks.repeat(reps, *([1] * (masks.ndim - 1)))
    return masks[:batch]
