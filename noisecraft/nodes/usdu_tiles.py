"""Ultimate SD Upscale's tiling, the model-free half: which parts of the upscaled image are
redrawn, in which order, at which size, and how a redrawn part is blended back.  Sampling is a
callback (the node's VAE encode -> KSampler -> VAE decode), so nothing here knows a model.

The behaviour is that of Coyote-A's A1111 script as ssitu's ComfyUI node (v1.7.1) runs it.
Every redraw is one *job*, A1111's ``process_images`` with an inpaint-at-full-resolution mask:

1. a mask (white = redraw) the size of the image; its bounding box grown by ``padding`` px on
   each side and clipped to the image is the crop (its right / bottom edge then moves in one
   pixel unless it lies on the image border, as A1111's ``get_crop_region`` does);
2. uniform tiles (``force_uniform_tiles``): the crop is widened to the aspect ratio of the
   job's processing size (grown right by half the missing width, then left by the rest, then
   right again; likewise downwards, upwards) and resized with Lanczos to that size; otherwise
   it is grown to multiples of 8 and sampled at that size;
3. the redrawn crop is resized back and blended into the image with the mask, Gaussian-blurred
   by ``blur`` (PIL's radius), as alpha: ``out = a * tile + (1 - a) * image``, only inside the
   crop.

The jobs (tiles ``tw`` x ``th``; ``rows = ceil(H / th)``, ``cols = ceil(W / tw)``; tile
(xi, yi) is the rectangle at (xi * tw, yi * th), cut off by the border):

* redraw ``Linear``: the tiles row by row; ``Chess``: the white squares of a checkerboard whose
  top-left square is white, row by row, then the black ones; ``None``: no redraw.  The mask is
  the tile rectangle plus its right and bottom edge pixels (PIL's inclusive ``rectangle``);
  padding ``tile_padding``, blur ``mask_blur``, processing size ``tile + tile_padding`` per side,
  rounded to a multiple of 8.  ``batch_size`` > 1 samples that many consecutive tiles (of one
  colour, for Chess) as one batch, all cut from the image as it was before the batch.
* seam fix ``Band Pass``: over every inner vertical, then every inner horizontal, tile edge a
  band ``seam_fix_width`` px wide across the whole image, its mask ramping linearly up to the
  edge and back down; padding ``seam_fix_padding``, no blur; processing size the band plus twice
  the padding by the image's height (or its width by that).
* ``Half Tile``: a tile-sized mask ramping up to and back down from each inner horizontal edge
  (centred on it), then each inner vertical edge; ``Half Tile + Intersections`` then also an
  inverted radial gradient, tile-sized, centred on every inner corner, with padding 0.
  Processing size: the tile; padding ``seam_fix_padding``; blur ``seam_fix_mask_blur``.

SD upscale's helpers (:func:`noisecraft.upscale.tile_starts`, :func:`~noisecraft.upscale.
blend_ramp`) do not fit here: this grid starts at multiples of the tile size with the last
tiles cut off by the border (not moved in flush with it), and tiles blend through a blurred
mask over whatever is already there (not weighted averages), so using them would change the
node's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from noisecraft.nodes.tensors import resize
from noisecraft.upscale import scaled_size

Size = tuple[int, int]  # (width, height)
Region = tuple[int, int, int, int]  # (x1, y1, x2, y2), x2 and y2 exclusive

REDRAW_MODES = ("Linear", "Chess", "None")
SEAM_FIX_MODES = ("None", "Band Pass", "Half Tile", "Half Tile + Intersections")
_BICUBIC = Image.Resampling.BICUBIC


@dataclass(frozen=True)
class TileSettings:
    """The node's tiling inputs."""

    mode: str  # REDRAW_MODES
    tile: Size
    padding: int
    mask_blur: int
    seam_fix_mode: str  # SEAM_FIX_MODES
    seam_fix_width: int
    seam_fix_padding: int
    seam_fix_mask_blur: int
    uniform: bool
    batch_size: int = 1

    def check(self) -> None:
        """Refuse settings the real node would choke on, saying what is allowed."""
        if self.mode not in REDRAW_MODES:
            raise ValueError(f"unknown mode_type {self.mode!r}; choose one of: "
                             f"{', '.join(REDRAW_MODES)}")
        if self.seam_fix_mode not in SEAM_FIX_MODES:
            raise ValueError(f"unknown seam_fix_mode {self.seam_fix_mode!r}; choose one of: "
                             f"{', '.join(SEAM_FIX_MODES)}")
        if min(self.tile) < 8:
            raise ValueError(f"tile_width and tile_height must be at least 8 px, got "
                             f"{self.tile[0]}x{self.tile[1]}")
        if self.seam_fix_mode == "Band Pass" and self.seam_fix_width < 1:
            raise ValueError("seam_fix_mode 'Band Pass' needs seam_fix_width > 0 (the width "
                             "of the bands redrawn over the tile edges)")
        if self.batch_size > 1 and not self.uniform:
            raise ValueError(f"batch_size {self.batch_size} needs force_uniform_tiles = true "
                             "(the tiles of a batch must all have one size); use batch_size 1")


@dataclass(frozen=True)
class Job:
    """One redraw: masks the size of the image (white = redraw), sampled as one batch at the
    processing ``size``; the crop is the mask's box grown by ``padding``; ``blur`` softens
    the mask before it blends the redrawn tile in."""

    masks: tuple[Image.Image, ...]
    size: Size
    padding: int
    blur: int


@dataclass(frozen=True)
class Tile:
    """What one mask becomes: the crop ``region``, the ``size`` it is sampled at, and the
    blend weights ``alpha`` [h, w] in [0, 1] over the region (the blurred mask)."""

    region: Region
    size: Size
    alpha: torch.Tensor


TileSampler = Callable[[torch.Tensor, Sequence[Tile]], torch.Tensor]
"""(crops [N, h, w, 3] in [0, 1] at the job's size, the Tiles they were cut for) -> the
redrawn crops, [N, h', w', 3].  N = images x tiles, image-major (image 0's tiles first)."""


def grid(image: Size, tile: Size) -> tuple[int, int]:
    """(rows, cols) of tiles covering the image."""
    return math.ceil(image[1] / tile[1]), math.ceil(image[0] / tile[0])


def redraw_order(mode: str, rows: int, cols: int) -> list[list[tuple[int, int]]]:
    """Tile indices (xi, yi) in the order they are redrawn, in groups a batch never spans:
    Linear one group row by row; Chess the white squares, then the black; None nothing."""
    order = [(xi, yi) for yi in range(rows) for xi in range(cols)]
    if mode == "Linear":
        return [order]
    if mode == "Chess":
        white = [(xi, yi) for xi, yi in order if (xi % 2 == 0) != (yi % 2 == 1)]
        return [white, [t for t in order if t not in white]]
    return []


def _canvas(image: Size) -> Image.Image:
    return Image.new("L", image, 0)


def _rectangle(image: Size, box: Region) -> Image.Image:
    mask = _canvas(image)
    ImageDraw.Draw(mask).rectangle(box, fill=255)  # inclusive of x2, y2
    return mask


def _pasted(image: Size, part: Image.Image, at: tuple[int, int]) -> Image.Image:
    mask = _canvas(image)
    mask.paste(part, at)
    return mask


def redraw_jobs(s: TileSettings, image: Size) -> Iterator[Job]:
    """The redraw step's jobs, built one at a time (each mask is image-sized)."""
    (tw, th), (rows, cols) = s.tile, grid(image, s.tile)
    size = scaled_size(tw + s.padding, th + s.padding, 1.0)  # rounded to multiples of 8
    for group in redraw_order(s.mode, rows, cols):
        for start in range(0, len(group), s.batch_size):
            masks = tuple(_rectangle(image, (xi * tw, yi * th, xi * tw + tw, yi * th + th))
                          for xi, yi in group[start:start + s.batch_size])
            yield Job(masks, size, s.padding, s.mask_blur)


def _ramp_up_down(width: int, height: int) -> Image.Image:
    """width x height: 0 at the top rising to 255 at the middle, back to 0 at the bottom
    (two halves of PIL's linear gradient, bicubic-resized)."""
    gradient = Image.linear_gradient("L")
    out = Image.new("L", (width, height), 0)
    out.paste(gradient.resize((width, height // 2), _BICUBIC), (0, 0))
    out.paste(gradient.rotate(180).resize((width, height // 2), _BICUBIC), (0, height // 2))
    return out


def _ramp_left_right(width: int, height: int) -> Image.Image:
    gradient = Image.linear_gradient("L")
    out = Image.new("L", (width, height), 0)
    out.paste(gradient.rotate(90).resize((width // 2, height), _BICUBIC), (0, 0))
    out.paste(gradient.rotate(270).resize((width // 2, height), _BICUBIC), (width // 2, 0))
    return out


def _band_pass_jobs(s: TileSettings, image: Size) -> Iterator[Job]:
    (tw, th), (rows, cols), (w, h) = s.tile, grid(image, s.tile), image
    band, pad = s.seam_fix_width, s.seam_fix_padding
    ramp = _ramp_up_down(256, 256)
    vertical = ramp.rotate(90).resize((band, h), _BICUBIC)
    for xi in range(1, cols):
        mask = _pasted(image, vertical, (xi * tw - band // 2, 0))
        yield Job((mask,), (band + 2 * pad, h), pad, 0)
    horizontal = ramp.resize((w, band), _BICUBIC)
    for yi in range(1, rows):
        mask = _pasted(image, horizontal, (0, yi * th - band // 2))
        yield Job((mask,), (w, band + 2 * pad), pad, 0)


def _half_tile_jobs(s: TileSettings, image: Size) -> Iterator[Job]:
    (tw, th), (rows, cols) = s.tile, grid(image, s.tile)
    pad, blur = s.seam_fix_padding, s.seam_fix_mask_blur
    across_rows, across_cols = _ramp_up_down(tw, th), _ramp_left_right(tw, th)
    for yi in range(rows - 1):
        for xi in range(cols):
            mask = _pasted(image, across_rows, (xi * tw, yi * th + th // 2))
            yield Job((mask,), (tw, th), pad, blur)
    for yi in range(rows):
        for xi in range(cols - 1):
            mask = _pasted(image, across_cols, (xi * tw + tw // 2, yi * th))
            yield Job((mask,), (tw, th), pad, blur)
    if s.seam_fix_mode == "Half Tile + Intersections":
        corner = ImageOps.invert(Image.radial_gradient("L").resize((tw, th), _BICUBIC))
        for yi in range(rows - 1):
            for xi in range(cols - 1):
                mask = _pasted(image, corner, (xi * tw + tw // 2, yi * th + th // 2))
                yield Job((mask,), (tw, th), 0, blur)


def seam_fix_jobs(s: TileSettings, image: Size) -> Iterator[Job]:
    """The seam-fix step's jobs (none for seam_fix_mode "None")."""
    if s.seam_fix_mode == "Band Pass":
        yield from _band_pass_jobs(s, image)
    elif s.seam_fix_mode.startswith("Half Tile"):
        yield from _half_tile_jobs(s, image)


def crop_region(mask: Image.Image, padding: int) -> Region | None:
    """The mask's bounding box grown by ``padding``, clipped, its right / bottom edge moved in
    one pixel unless on the border (A1111's ``get_crop_region``); None if nothing is left."""
    box = mask.getbbox()
    if box is None:
        return None
    w, h = mask.size
    x1, y1 = max(box[0] - padding, 0), max(box[1] - padding, 0)
    x2, y2 = min(box[2] + padding, w), min(box[3] + padding, h)
    x2, y2 = x2 - (x2 < w), y2 - (y2 < h)
    return (x1, y1, x2, y2) if x2 > x1 and y2 > y1 else None


def _grow(lo: int, hi: int, target: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown to ``target`` within [0, limit): half to the right, the rest to the
    left, then whatever the left border refused to the right (A1111's ``expand_crop``)."""
    hi = min(hi + (target - (hi - lo)) // 2, limit)
    lo = max(lo - (target - (hi - lo)), 0)
    return lo, min(hi + (target - (hi - lo)), limit)


def fit_region(region: Region, image: Size, size: Size, uniform: bool) -> tuple[Region, Size]:
    """(the crop grown as it will be cut, the size it is sampled at)."""
    x1, y1, x2, y2 = region
    crop_w, crop_h = x2 - x1, y2 - y1
    if uniform:
        ratio = size[0] / size[1]
        if crop_w / crop_h > ratio:
            target = (crop_w, round(crop_w / ratio))
        else:
            target = (round(crop_h * ratio), crop_h)
        sample_size = size
    else:
        target = sample_size = (math.ceil(crop_w / 8) * 8, math.ceil(crop_h / 8) * 8)
    x1, x2 = _grow(x1, x2, target[0], image[0])
    y1, y2 = _grow(y1, y2, target[1], image[1])
    return (x1, y1, x2, y2), sample_size


def plan_tile(mask: Image.Image, job: Job, uniform: bool) -> Tile | None:
    """Where and at which size ``mask`` is redrawn, and its blend weights (None: empty)."""
    region = crop_region(mask, job.padding)
    if region is None:
        return None
    region, size = fit_region(region, mask.size, job.size, uniform)
    if job.blur > 0:
        mask = mask.filter(ImageFilter.GaussianBlur(job.blur))
    alpha = torch.from_numpy(np.asarray(mask.crop(region), dtype=np.float32) / 255.0)
    return Tile(region, size, alpha)


def resized(images: torch.Tensor, size: Size) -> torch.Tensor:
    """IMAGE [N, H, W, C] resized to ``size`` (w, h) with Lanczos (through 8-bit, as PIL
    does for the real node); unchanged when it has that size already."""
    if (images.shape[2], images.shape[1]) == tuple(size):
        return images
    return resize(images.movedim(-1, 1), size[0], size[1], "lanczos").movedim(1, -1)


def _cut(images: torch.Tensor, region: Region) -> torch.Tensor:
    x1, y1, x2, y2 = region
    return images[:, y1:y2, x1:x2]


def run_job(images: torch.Tensor, job: Job, sample: TileSampler, uniform: bool) -> torch.Tensor:
    """``images`` [B, H, W, C] with ``job``'s masks redrawn by ``sample`` and blended in."""
    tiles = [t for t in (plan_tile(m, job, uniform) for m in job.masks) if t is not None]
    if not tiles:
        return images
    pairs = [(b, tile) for b in range(images.shape[0]) for tile in tiles]  # image-major
    crops = [resized(_cut(images[b:b + 1], tile.region), tile.size) for b, tile in pairs]
    if len({c.shape for c in crops}) > 1:
        raise ValueError("tiles of different sizes cannot be sampled as one batch; use "
                         "force_uniform_tiles or batch_size 1")
    redrawn = sample(torch.cat(crops), tiles)
    out = images.clone()
    for k, (b, tile) in enumerate(pairs):
        x1, y1, x2, y2 = tile.region
        part = resized(redrawn[k:k + 1].to(out.dtype), (x2 - x1, y2 - y1))[0]
        a = tile.alpha[..., None].to(out.dtype)
        out[b, y1:y2, x1:x2] = a * part + (1 - a) * out[b, y1:y2, x1:x2]
    return out


def redraw_and_fix_seams(images: torch.Tensor, s: TileSettings,
                         sample: TileSampler) -> torch.Tensor:
    """The redraw step, then the seam-fix step, over the (already upscaled) ``images``
    [B, H, W, C]; each job sees the result of the ones before it."""
    s.check()
    size = (images.shape[2], images.shape[1])
    for job in chain(redraw_jobs(s, size), seam_fix_jobs(s, size)):
        images = run_job(images, job, sample, s.uniform)
    return images
