"""AUTOMATIC1111's inpainting options, as image operations around one engine call.

* ``inpainting_mask_invert``: repaint the black area instead of the white one;
* ``inpainting_fill`` (what the masked area starts from): 0 ``fill`` (the mean colour of the
  unmasked pixels), 1 ``original``, 2 ``latent noise`` and 3 ``latent nothing`` - noisecraft
  approximates the last two in pixel space (seeded uniform noise; mid grey, which the VAE
  maps near a zero latent);
* ``inpaint_full_res`` (A1111's "only masked"): inpaint a crop around the mask (enlarged by
  ``inpaint_full_res_padding`` pixels and to the output's aspect ratio) at the requested size,
  then paste the result back into the full image through the mask.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

FILLS = {0: "fill", 1: "original", 2: "latent noise", 3: "latent nothing"}


def apply_fill(image: Image.Image, mask: Image.Image, fill: int, seed: int) -> Image.Image:
    """``image`` with its masked area (mask > 127) pre-filled as ``fill`` asks."""
    if fill == 1:
        return image
    rgb = np.asarray(image.convert("RGB")).astype(np.float32)
    m = np.asarray(mask.convert("L").resize(image.size)) > 127
    if fill == 0:
        keep = rgb[~m]
        rgb[m] = keep.mean(axis=0) if len(keep) else 127.5
    elif fill == 2:
        rng = np.random.default_rng(seed)
        rgb[m] = rng.uniform(0, 255, size=(int(m.sum()), 3))
    elif fill == 3:
        rgb[m] = 127.5
    else:
        raise ValueError(f"inpainting_fill must be one of {sorted(FILLS)}, got {fill}")
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8), "RGB")


def invert(mask: Image.Image) -> Image.Image:
    return ImageOps.invert(mask.convert("L"))


def crop_box(mask: Image.Image, padding: int, width: int, height: int) -> tuple[int, ...] | None:
    """The region around the mask's white pixels, padded and widened to ``width/height``'s
    aspect ratio, clipped to the image; None for an empty mask."""
    box = mask.convert("L").point(lambda v: 255 if v > 127 else 0).getbbox()
    if box is None:
        return None
    W, H = mask.size
    x0, y0, x1, y1 = box[0] - padding, box[1] - padding, box[2] + padding, box[3] + padding
    w, h = x1 - x0, y1 - y0
    ratio = width / height
    if w / h < ratio:  # too narrow: widen
        grow = int(round(h * ratio)) - w
        x0, x1 = x0 - grow // 2, x1 + grow - grow // 2
    else:
        grow = int(round(w / ratio)) - h
        y0, y1 = y0 - grow // 2, y1 + grow - grow // 2
    # shift inside the image where possible, then clip
    if x0 < 0:
        x1, x0 = x1 - x0, 0
    if y0 < 0:
        y1, y0 = y1 - y0, 0
    if x1 > W:
        x0, x1 = max(0, x0 - (x1 - W)), W
    if y1 > H:
        y0, y1 = max(0, y0 - (y1 - H)), H
    return (x0, y0, x1, y1)


def paste_back(original: Image.Image, generated: Image.Image, mask: Image.Image,
               box: tuple[int, ...]) -> Image.Image:
    """``generated`` (the crop's inpainting) resized into ``box`` of ``original``, through
    the mask (so only the masked area changes)."""
    x0, y0, x1, y1 = box
    patch = generated.convert("RGB").resize((x1 - x0, y1 - y0), Image.LANCZOS)
    out = original.convert("RGB").copy()
    region_mask = mask.convert("L").resize(original.size).crop(box)
    out.paste(patch, (x0, y0), region_mask)
    return out


def prepare(request, options: dict):
    """(request to run, function mapping each output image to the final image) for a
    :class:`~noisecraft.request.GenerationRequest` with ``init_image`` and ``mask`` files and
    A1111's options ``{"fill", "invert", "full_res", "padding"}``."""
    from dataclasses import replace

    from noisecraft.images import load_image, load_mask

    original = load_image(request.init_image)
    mask = load_mask(request.mask).resize(original.size)
    if options.get("invert"):
        mask = invert(mask)
    seed = request.seed if request.seed is not None else 0
    start = apply_fill(original, mask, int(options.get("fill", 1)), seed)
    width = request.width or original.width
    height = request.height or original.height
    box = crop_box(mask, int(options.get("padding", 0)), width, height) \
        if options.get("full_res") else None
    if box is None:
        return replace(request, init_image=start, mask=mask), lambda image: image
    size = (width, height)
    run = replace(request, init_image=start.crop(box).resize(size, Image.LANCZOS),
                  mask=mask.crop(box).resize(size, Image.LANCZOS), width=width, height=height)
    return run, lambda image: paste_back(original, image, mask, box)
