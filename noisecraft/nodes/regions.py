"""Where and when each CONDITIONING entry acts: ComfyUI's regional-prompting rules.

An entry's options may restrict it to

* an ``area`` ``(h, w, y, x)`` in latent pixels (ConditioningSetArea), or
  ``("percentage", h, w, y, x)`` in fractions of the latent (ConditioningSetAreaPercentage);
* a ``mask`` [b, H, W] of any size (resized bilinearly to the latent), scaled by
  ``mask_strength``; with ``set_area_to_bounds`` its area becomes the mask's bounding box
  (at least 8 x 8) (ConditioningSetMask);
* a ``strength`` (a weight in the average);
* a part of the run, ``start_percent`` .. ``end_percent`` of the model's timesteps
  (ConditioningSetTimestepRange): the entry acts while
  ``sigma(end_percent) <= sigma <= sigma(start_percent)``.

The sampler averages the x0 predictions of a side's active entries, each over its area and
weighted per latent pixel (:class:`Region`); an area without a mask fades in over up to 8
latent pixels along the sides that do not touch the latent's border.  Before that, each area on
one side of CFG gets a partner on the other side (see :func:`mirror_areas`).  These are
ComfyUI's ``resolve_areas_and_cond_masks_multidim``, ``calculate_start_end_timesteps``,
``create_cond_with_same_area_if_none`` and ``get_area_and_mult`` (comfy/samplers.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from noisecraft.nodes.control import CONTROL_KEY
from noisecraft.schedules import DiscreteSchedule

# Options that say where/when an entry acts (the rest describe the prompt itself).
REGION_KEYS = ("area", "strength", "mask", "mask_strength", "set_area_to_bounds",
               "start_percent", "end_percent", CONTROL_KEY)
EDGE_FADE = 8  # ComfyUI's "fuzz": latent pixels over which an unmasked area fades in


def percent_to_sigma(schedule: DiscreteSchedule, percent: float) -> float:
    """The sigma at ``percent`` of the way through the run (ComfyUI's ``percent_to_sigma``):
    0 -> infinity, 1 -> 0, else the sigma of timestep (1 - percent) (T - 1)."""
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return 0.0
    t = torch.tensor((1.0 - percent) * (schedule.num_timesteps - 1), dtype=torch.float64)
    return float(schedule.t_to_sigma(t))


def _mask_bounds(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(h, w, y, x) of the box around a mask's nonzero pixels (over the batch), at least 8 x 8;
    (8, 8, 0, 0) for an empty mask."""
    ys, xs = torch.nonzero(mask.abs().amax(dim=0), as_tuple=True)
    if ys.numel() == 0:
        return (8, 8, 0, 0)
    y0, x0 = int(ys.min()), int(xs.min())
    return (max(8, int(ys.max()) - y0 + 1), max(8, int(xs.max()) - x0 + 1), y0, x0)


def resolve_entry(entry: list, h: int, w: int) -> list:
    """``entry`` with a percentage area in latent pixels and its mask at the latent's size
    ([b, h, w]); ``set_area_to_bounds`` replaces the area by the mask's bounding box."""
    context, opts = entry[0], dict(entry[1])
    area = opts.get("area")
    if area is not None and area[0] == "percentage":
        _, ph, pw, py, px = area
        opts["area"] = (max(1, round(ph * h)), max(1, round(pw * w)), round(py * h),
                        round(px * w))
    mask = opts.get("mask")
    if mask is not None:
        m = mask.float().reshape(-1, mask.shape[-2], mask.shape[-1])
        if m.shape[-2:] != (h, w):
            m = F.interpolate(m[:, None], size=(h, w), mode="bilinear", align_corners=False)[:, 0]
        opts["mask"] = m
        if opts.get("set_area_to_bounds"):
            opts["area"] = _mask_bounds(m)
    return [context, opts]


def _inside(a: tuple, b: tuple) -> bool:
    """Whether area ``a`` (h, w, y, x) lies within area ``b``."""
    return a[2] >= b[2] and a[3] >= b[3] and a[2] + a[0] <= b[2] + b[0] \
        and a[3] + a[1] <= b[3] + b[1]


def _add_partner(side: list, entry: list) -> None:
    """If ``side`` has no entry with ``entry``'s area: append a copy of its smallest entry
    enclosing that area (one without area encloses all) that acts where and when ``entry``
    does (its area, mask, strength, timestep range and ControlNets)."""
    area = entry[1].get("area")
    if area is None:
        return
    smallest = None
    for other in side:
        other_area = other[1].get("area")
        if other_area is None:
            smallest = smallest or other
        elif _inside(area, other_area):
            smaller = (smallest is None or smallest[1].get("area") is None
                       or math.prod(smallest[1]["area"][:2]) > math.prod(other_area[:2]))
            smallest = other if smaller else smallest
    if smallest is None or tuple(smallest[1].get("area") or ()) == tuple(area):
        return
    opts = {k: v for k, v in smallest[1].items() if k not in REGION_KEYS}
    opts.update({k: v for k, v in entry[1].items() if k in REGION_KEYS})
    side.append([smallest[0], opts])


def mirror_areas(positive: list, negative: list) -> tuple[list, list]:
    """Both sides of CFG with partners added, so that every area on one side is also covered
    on the other by that side's own prompt (positive's areas first, then negative's)."""
    positive, negative = list(positive), list(negative)
    for entry in positive:
        _add_partner(negative, entry)
    for entry in list(negative):
        _add_partner(positive, entry)
    return positive, negative


@dataclass(frozen=True, eq=False)
class Region:
    """Where (``box`` top, left, h, w in latent pixels) and when an entry acts, and its
    per-pixel ``weight`` [b, 1, h, w] in the average."""

    box: tuple[int, int, int, int]
    weight: torch.Tensor
    sigma_start: float = math.inf
    sigma_end: float = 0.0

    def acts_at(self, sigma: float) -> bool:
        return self.sigma_end <= sigma <= self.sigma_start

    @property
    def slices(self) -> tuple:
        top, left, h, w = self.box
        return (..., slice(top, top + h), slice(left, left + w))


def _fade_edges(weight: torch.Tensor, box: tuple, h: int, w: int) -> torch.Tensor:
    """Multiply rows/columns near the box's inner sides by (t + 1) / r, r = min(8, size // 4)
    (sides on the latent's border are left alone)."""
    top, left, bh, bw = box
    for dim, offset, size, full in ((2, top, bh, h), (3, left, bw, w)):
        r = min(EDGE_FADE, size // 4)
        ramp = torch.ones(size)
        for t in range(r):
            if offset != 0:
                ramp[t] *= (1.0 / r) * (t + 1)
            if offset + size < full:
                ramp[size - 1 - t] *= (1.0 / r) * (t + 1)
        weight = weight * (ramp.view(1, 1, -1, 1) if dim == 2 else ramp.view(1, 1, 1, -1))
    return weight


def region_of(entry: list, h: int, w: int, schedule: DiscreteSchedule) -> Region | None:
    """The :class:`Region` of a resolved entry (see :func:`resolve_entry`) on an h x w
    latent; None when its area lies outside the latent."""
    opts = entry[1]
    area = opts.get("area")
    ah, aw, y, x = area if area is not None else (h, w, 0, 0)
    box = (y, x, min(h - y, ah), min(w - x, aw))
    if box[2] <= 0 or box[3] <= 0:
        return None
    mask = opts.get("mask")
    if mask is not None:
        weight = mask[:, None, y:y + box[2], x:x + box[3]] * float(opts.get("mask_strength", 1.0))
    else:
        weight = torch.ones(1, 1, box[2], box[3])
    weight = weight * float(opts.get("strength", 1.0))
    if mask is None and area is not None:
        weight = _fade_edges(weight, box, h, w)
    return Region(box, weight, percent_to_sigma(schedule, opts.get("start_percent", 0.0)),
                  percent_to_sigma(schedule, opts.get("end_percent", 1.0)))
