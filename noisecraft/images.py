"""Input images and masks: loading, validating, normalising; mask grow and blur; tensors.

Modes an input image may have, and what becomes of it (always 8-bit RGB in the end):

* ``RGB``: kept; ``L`` / ``1`` (greyscale, bilevel): replicated to three channels;
* ``P`` (palette): expanded, through RGBA when the palette has transparency;
* ``RGBA`` / ``LA`` / ``PA``: composited over white (AUTOMATIC1111's default background);
* ``I;16*`` / ``I`` (16-bit greyscale PNGs): scaled by 1/257 to 8 bits;
* ``CMYK`` / ``YCbCr`` / ``LAB`` / ``HSV``: converted by Pillow;
* anything else (e.g. 32-bit float ``F``): refused with :class:`~noisecraft.request.InputError`.

A mask is read the same way and reduced to its luminance (``L``): white (255) = repaint,
black (0) = keep; intermediate values blend.  A transparent mask pixel counts as black (keep).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError

from noisecraft.request import ImageInput, InputError

_CONVERTIBLE = ("CMYK", "YCbCr", "LAB", "HSV")


def _open(src: ImageInput, what: str) -> Image.Image:
    if isinstance(src, Image.Image):
        return src
    path = Path(os.fspath(src))
    if not path.is_file():
        raise InputError(f"{what} {path} does not exist or is not a file")
    try:
        with Image.open(path) as im:
            im.load()
            return ImageOps.exif_transpose(im) or im
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise InputError(f"cannot read {what} {path}: {e}") from None


def _sixteen_bit_to_l(im: Image.Image) -> Image.Image:
    a = np.asarray(im, dtype=np.float64)
    top = 65535.0 if a.max(initial=0) > 255 or im.mode.startswith("I;16") else 255.0
    return Image.fromarray(np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def _flatten(im: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    rgba = im.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def to_rgb(im: Image.Image, what: str = "image", background=(255, 255, 255)) -> Image.Image:
    """Any supported mode -> 8-bit RGB (see the module docstring); refuses the rest."""
    mode = im.mode
    if mode == "RGB":
        return im.copy()
    if mode in ("L", "1"):
        return im.convert("RGB")
    if mode == "P":
        has_alpha = "transparency" in im.info or im.palette.mode == "RGBA"
        return _flatten(im, background) if has_alpha else im.convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _flatten(im, background)
    if mode.startswith("I;16") or mode == "I":
        return _sixteen_bit_to_l(im).convert("RGB")
    if mode in _CONVERTIBLE:
        return im.convert("RGB")
    raise InputError(
        f"{what} has unsupported mode {mode!r}; supported: RGB, RGBA, L, LA, 1, P, I;16, I, "
        f"{', '.join(_CONVERTIBLE)}"
    )


def load_image(src: ImageInput, what: str = "init image") -> Image.Image:
    """A path or PIL image -> validated 8-bit RGB PIL image."""
    im = _open(src, what)
    if im.width < 1 or im.height < 1:
        raise InputError(f"{what} is empty ({im.width}x{im.height})")
    return to_rgb(im, what)


def load_mask(src: ImageInput) -> Image.Image:
    """A path or PIL image -> mask in mode ``L`` (255 = repaint); transparency counts as keep."""
    im = _open(src, "mask")
    if im.mode in ("1", "L"):
        return im.convert("L")
    return to_rgb(im, "mask", background=(0, 0, 0)).convert("L")


def check_same_size(image: Image.Image, mask: Image.Image) -> None:
    if image.size != mask.size:
        raise InputError(
            f"mask is {mask.width}x{mask.height} but the init image is "
            f"{image.width}x{image.height}; they must be the same size"
        )


def grow_and_blur(mask: Image.Image, grow: int = 0, blur: int = 0) -> Image.Image:
    """Dilate (``grow`` > 0) or erode (< 0) by ``|grow|`` pixels, then Gaussian-blur with
    radius ``blur`` pixels (A1111's "mask blur"; it feathers the seam both ways)."""
    if grow > 0:
        mask = mask.filter(ImageFilter.MaxFilter(2 * grow + 1))
    elif grow < 0:
        mask = mask.filter(ImageFilter.MinFilter(2 * -grow + 1))
    if blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(blur))
    return mask


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> [1, 3, H, W] float32 in [-1, 1]."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(a)).unsqueeze(0) / 127.5 - 1.0


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """``L`` mask -> [1, 1, H, W] float32 in [0, 1] (1 = repaint)."""
    return torch.from_numpy(np.asarray(mask.convert("L"), dtype=np.float32) / 255.0)[None, None]


def tensor_to_images(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] -> RGB PIL images (rounded to the nearest 8-bit level)."""
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(np.ascontiguousarray(i.permute(1, 2, 0).numpy()), "RGB") for i in a]


def resize_to(image: Image.Image, width: int, height: int, resample=Image.LANCZOS) -> Image.Image:
    """Resize to exactly width x height (AUTOMATIC1111's "just resize"); no-op when equal."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), resample)


def extend_canvas(
    image: Image.Image, left: int, top: int, right: int, bottom: int, fill: str = "edge"
) -> tuple[Image.Image, Image.Image]:
    """Outpainting canvas: the image padded by the given pixels, and its mask (255 on the new
    area).  ``fill``: ``edge`` repeats the border pixels outwards, ``mean`` uses the mean colour.
    """
    a = np.asarray(image.convert("RGB"))
    pad = ((top, bottom), (left, right), (0, 0))
    if fill == "edge":
        out = np.pad(a, pad, mode="edge")
    elif fill == "mean":
        out = np.pad(a, pad, mode="constant")
        mean = a.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
        keep = np.zeros(out.shape[:2], dtype=bool)
        keep[top:top + a.shape[0], left:left + a.shape[1]] = True
        out[~keep] = mean
    else:
        raise InputError(f"unknown outpaint fill {fill!r}; choose edge or mean")
    mask = np.full(out.shape[:2], 255, dtype=np.uint8)
    mask[top:top + a.shape[0], left:left + a.shape[1]] = 0
    return Image.fromarray(out, "RGB"), Image.fromarray(mask, "L")
