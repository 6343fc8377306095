"""Read colour, shape, size, position and background from a shapes image, with no learned model.

Pipeline (:func:`check`), all in NumPy on the RGB pixels:

1. smooth with a 3x3 box filter (tames pixel noise);
2. background = per-channel median of the outer border ring;
3. foreground colour estimate = median of the pixels farthest from the background
   (distance above half of the 99.9th percentile);
4. every pixel is projected onto the background -> foreground colour line; the mask is
   ``t > 0.5`` (the midpoint, so blur moves no edge), reduced to its largest 4-connected
   component with its holes filled;
5. colour = nearest palette colour to the median of the mask's core pixels (``t > 0.75``);
6. position = grid cell of the bounding-box centre (cell borders halfway between grid points);
   size = bounding-box extent against the thresholds halfway (geometric mean) between sizes;
7. shape = the ideal shape, stretched to the bounding box, with the highest IoU against the mask.

:func:`score` runs this over images and prompts and reports per-attribute accuracy.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from noisecraft.training.shapes import (
    ATTRIBUTES,
    GRID_CENTERS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZE_FRACTION,
    SIZES,
    draw_shape_mask,
    parse_caption,
)

MIN_CONTRAST = 40.0
"""Foreground must differ from the background by this much (RGB distance, 0-255) to count."""
NOISE_TO_SMOOTH = 0.08
"""Above this pixel noise (fraction of the bg->fg contrast) the mask uses 3x3-smoothed pixels."""


@dataclass(frozen=True)
class ShapeReading:
    """What :func:`check` saw. Attribute fields are ``None`` when no foreground was found.

    ``extent`` is the bounding box's larger side over the image side; ``center`` its centre
    (x, y) in [0,1]; ``shape_scores`` the IoU of the mask with each ideal shape.
    """

    color: str | None
    shape: str | None
    size: str | None
    position: str | None
    background: str
    extent: float = 0.0
    center: tuple[float, float] = (0.5, 0.5)
    shape_scores: dict[str, float] = field(default_factory=dict)
    foreground_rgb: tuple[float, float, float] | None = None
    background_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)


def _as_array(image: Image.Image | np.ndarray) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float32)
    if isinstance(image, np.ndarray) and image.ndim == 3 and image.shape[2] == 3:
        if image.dtype == np.uint8:
            return image.astype(np.float32)
        raise TypeError(f"array image must be uint8 HxWx3, got dtype {image.dtype}")
    raise TypeError(
        f"image must be a PIL.Image or a uint8 HxWx3 numpy array, got {type(image).__name__}"
        f"{getattr(image, 'shape', '')}"
    )


def _box3(a: np.ndarray) -> np.ndarray:
    """3x3 mean filter with edge replication; a: [H, W, ...]."""
    p = np.pad(a, [(1, 1), (1, 1)] + [(0, 0)] * (a.ndim - 2), mode="edge")
    h, w = a.shape[:2]
    return sum(p[i : i + h, j : j + w] for i in range(3) for j in range(3)) / 9.0


def nearest_color(rgb: np.ndarray) -> str:
    """Name of the palette colour closest to ``rgb`` (Euclidean, 0-255)."""
    names = list(PALETTE)
    table = np.array([PALETTE[n] for n in names], dtype=np.float32)
    return names[int(np.argmin(((table - rgb) ** 2).sum(axis=1)))]


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean mask (breadth-first search)."""
    h, w = mask.shape
    padded = np.zeros((h + 2, w + 2), dtype=bool)
    padded[1:-1, 1:-1] = mask
    flat = padded.ravel()
    label = np.zeros(flat.shape, dtype=np.int32)
    steps = (1, -1, w + 2, -(w + 2))
    best, best_size, current = 0, 0, 0
    for start in np.flatnonzero(flat):
        if label[start]:
            continue
        current += 1
        label[start] = current
        queue, size = deque([start]), 0
        while queue:
            i = queue.popleft()
            size += 1
            for d in steps:
                j = i + d
                if flat[j] and not label[j]:
                    label[j] = current
                    queue.append(j)
        if size > best_size:
            best, best_size = current, size
    return (label.reshape(h + 2, w + 2) == best)[1:-1, 1:-1] & mask


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Mask plus every background pixel not 4-connected to the image border."""
    outside = np.zeros_like(mask)
    outside[0, :], outside[-1, :], outside[:, 0], outside[:, -1] = (
        ~mask[0, :], ~mask[-1, :], ~mask[:, 0], ~mask[:, -1],
    )  # fmt: skip
    free = ~mask
    while True:
        grown = outside.copy()
        grown[1:] |= outside[:-1]
        grown[:-1] |= outside[1:]
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown &= free
        if np.array_equal(grown, outside):
            return ~outside
        outside = grown


def _cell(v: float) -> int:
    """Grid index (0, 1, 2) of a coordinate in [0,1]; borders halfway between grid points."""
    return int(v > (GRID_CENTERS[0] + GRID_CENTERS[1]) / 2) + int(
        v > (GRID_CENTERS[1] + GRID_CENTERS[2]) / 2
    )


def _size_name(extent: float) -> str:
    fractions = [SIZE_FRACTION[s] for s in SIZES]
    for name, a, b in zip(SIZES, fractions, fractions[1:], strict=False):
        if extent < math.sqrt(a * b):
            return name
    return SIZES[-1]


def _shape_scores(mask: np.ndarray) -> dict[str, float]:
    """IoU of the mask (cropped to its bounding box) with each ideal shape stretched to it."""
    ys, xs = np.nonzero(mask)
    crop = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    h, w = crop.shape
    scores = {}
    for shape in SHAPES:
        ideal = draw_shape_mask(shape, w, h) > 0.5
        union = np.logical_or(ideal, crop).sum()
        scores[shape] = float(np.logical_and(ideal, crop).sum() / max(union, 1))
    return scores


def _foreground_mask(smooth: np.ndarray, bg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Returns (projection t of each pixel on the bg->fg line, fg colour estimate)."""
    dist = np.sqrt(((smooth - bg) ** 2).sum(axis=2))
    d_max = float(np.percentile(dist, 99.9))
    if d_max < MIN_CONTRAST:
        return np.zeros(dist.shape, dtype=np.float32), bg
    fg = np.median(smooth[dist > d_max / 2], axis=0)
    direction = fg - bg
    t = ((smooth - bg) @ direction) / float(direction @ direction)
    return t, fg


def _border(a: np.ndarray, b: int) -> np.ndarray:
    """Pixels of the outer ring of width ``b``, as [N, 3]."""
    parts = [a[:b], a[-b:], a[:, :b], a[:, -b:]]
    return np.concatenate([p.reshape(-1, 3) for p in parts])


def check(image: Image.Image | np.ndarray) -> ShapeReading:
    """Read one shapes image (PIL image or uint8 HxWx3 array, any size >= 32)."""
    rgb = _as_array(image)
    h, w = rgb.shape[:2]
    smooth = _box3(rgb)
    b = max(1, min(h, w) // 64)
    bg = np.median(_border(smooth, b), axis=0)
    background = nearest_color(bg)
    t, fg = _foreground_mask(smooth, bg)
    direction = fg - bg
    if direction.any():
        # pixel noise along the bg->fg line, from the raw border (median absolute deviation)
        raw_border = _border(rgb, b)
        along = (raw_border - bg) @ direction / float(direction @ direction)
        noise = 1.4826 * float(np.median(np.abs(along - np.median(along))))
        if noise < NOISE_TO_SMOOTH:
            t = (rgb - bg) @ direction / float(direction @ direction)
    mask = t > 0.5
    if not mask.any():
        return ShapeReading(None, None, None, None, background, background_rgb=tuple(bg))
    mask = _fill_holes(_largest_component(mask))
    core = mask & (t > 0.75)
    color_rgb = np.median(rgb[core if core.any() else mask], axis=0)
    ys, xs = np.nonzero(mask)
    cx, cy = (xs.min() + xs.max() + 1) / 2 / w, (ys.min() + ys.max() + 1) / 2 / h
    extent = max((xs.max() - xs.min() + 1) / w, (ys.max() - ys.min() + 1) / h)
    scores = _shape_scores(mask)
    return ShapeReading(
        color=nearest_color(color_rgb),
        shape=max(scores, key=scores.get),
        size=_size_name(extent),
        position=POSITIONS[3 * _cell(cy) + _cell(cx)],
        background=background,
        extent=float(extent),
        center=(float(cx), float(cy)),
        shape_scores=scores,
        foreground_rgb=tuple(float(v) for v in color_rgb),
        background_rgb=tuple(float(v) for v in bg),
    )


def score(images: Sequence[Image.Image | np.ndarray], prompts: Sequence[str]) -> dict[str, float]:
    """Per-attribute accuracy of ``images`` against what ``prompts`` ask for.

    Returns ``{"color", "shape", "size", "position", "background": accuracy over the prompts
    that state that attribute, "all": fraction of images matching every stated attribute,
    "n": number of images}``. An attribute no prompt states has accuracy ``nan``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images but {len(prompts)} prompts; need one each")
    hits = dict.fromkeys(ATTRIBUTES, 0)
    asked = dict.fromkeys(ATTRIBUTES, 0)
    all_right = 0
    for image, prompt in zip(images, prompts, strict=True):
        want, got = parse_caption(prompt), check(image)
        ok = True
        for name in ATTRIBUTES:
            if getattr(want, name) is None:
                continue
            asked[name] += 1
            right = getattr(want, name) == getattr(got, name)
            hits[name] += right
            ok &= right
        all_right += ok
    result = {n: hits[n] / asked[n] if asked[n] else float("nan") for n in ATTRIBUTES}
    result["all"] = all_right / len(images) if images else float("nan")
    result["n"] = float(len(images))
    return result
