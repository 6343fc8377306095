"""Mask nodes that need no model: conversions between IMAGE and MASK, solid masks, crop,
feather, threshold and combining two masks.

MASK is [B, H, W] (or [H, W]) float, 1 = selected.  Names, inputs, defaults, ranges and
categories are ComfyUI's (``comfy_extras/nodes_mask.py``); results follow its current code
(batch-aware; FeatherMask's right/bottom ramps start at the last column/row).
"""

from __future__ import annotations

import torch

from noisecraft.graph.schema import (
    COMBO,
    FLOAT,
    IMAGE,
    INT,
    MASK,
    PIXEL_POSITION,
    PIXEL_SIZE,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.nodes.tensors import as_batch_mask

_POS, _SIZE = PIXEL_POSITION, PIXEL_SIZE
CHANNELS = ["red", "green", "blue", "alpha"]


class MaskToImage(Node):
    schema = NodeSchema(
        name="MaskToImage", display_name="Convert Mask to Image", category="mask",
        inputs=[Input("mask", MASK)], outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, mask):
        """Grey image [B, H, W, 3] with the mask in every channel."""
        return (as_batch_mask(mask)[..., None].expand(-1, -1, -1, 3),)


class ImageToMask(Node):
    schema = NodeSchema(
        name="ImageToMask", display_name="Convert Image to Mask", category="mask",
        inputs=[Input("image", IMAGE), Input("channel", COMBO, choices=CHANNELS)],
        outputs=[Output(MASK)],
    )

    @classmethod
    def execute(cls, image, channel):
        """One channel of every image: [B, H, W]."""
        index = CHANNELS.index(channel)
        if index >= image.shape[-1]:
            raise ValueError(f"ImageToMask: channel {channel!r} needs an image with "
                             f"{index + 1} channels; this one has {image.shape[-1]} "
                             f"(choose one of {CHANNELS[:image.shape[-1]]})")
        return (image[..., index],)


class ImageColorToMask(Node):
    schema = NodeSchema(
        name="ImageColorToMask", category="mask",
        inputs=[Input("image", IMAGE),
                Input("color", INT, default=0, min=0, max=0xFFFFFF, step=1,
                      extra={"display": "color"})],
        outputs=[Output(MASK)],
    )

    @classmethod
    def execute(cls, image, color):
        """1 where the pixel, rounded to 8 bits, is exactly ``color`` (0xRRGGBB), else 0."""
        q = (image.clamp(0, 1) * 255.0).round().to(torch.int64)
        packed = (q[..., 0] << 16) + (q[..., 1] << 8) + q[..., 2]
        return ((packed == color).float(),)


class SolidMask(Node):
    schema = NodeSchema(
        name="SolidMask", category="mask",
        inputs=[Input("value", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
                Input("width", INT, **_SIZE), Input("height", INT, **_SIZE)],
        outputs=[Output(MASK)],
    )

    @classmethod
    def execute(cls, value, width, height):
        return (torch.full((1, height, width), float(value), dtype=torch.float32),)


class CropMask(Node):
    schema = NodeSchema(
        name="CropMask", category="mask",
        inputs=[Input("mask", MASK), Input("x", INT, **_POS), Input("y", INT, **_POS),
                Input("width", INT, **_SIZE), Input("height", INT, **_SIZE)],
        outputs=[Output(MASK)],
    )

    @classmethod
    def execute(cls, mask, x, y, width, height):
        """The width x height block at (x, y), cut at the mask's edges."""
        return (as_batch_mask(mask)[:, y:y + height, x:x + width],)


COMPOSITE_OPS = ["multiply", "add", "subtract", "and", "or", "xor"]


def combine_masks(dest: torch.Tensor, src: torch.Tensor, operation: str) -> torch.Tensor:
    """One of :data:`COMPOSITE_OPS`; the logical ones round both masks to 0/1 first."""
    if operation == "multiply":
        return dest * src
    if operation == "add":
        return dest + src
    if operation == "subtract":
        return dest - src
    logical = {"and": torch.logical_and, "or": torch.logical_or, "xor": torch.logical_xor}
    if operation not in logical:
        raise ValueError(f"unknown MaskComposite operation {operation!r}; choose one of: "
                         f"{', '.join(COMPOSITE_OPS)}")
    return logical[operation](dest.round().bool(), src.round().bool()).float()


class MaskComposite(Node):
    schema = NodeSchema(
        name="MaskComposite", category="mask",
        inputs=[Input("destination", MASK), Input("source", MASK),
                Input("x", INT, **_POS), Input("y", INT, **_POS),
                Input("operation", COMBO, choices=COMPOSITE_OPS)],
        outputs=[Output(MASK)],
    )

    @classmethod
    def execute(cls, destination, source, x, y, operation):
        """``source`` placed with its corner at (x, y) and combined with the destination
        where they overlap (elsewhere the destination is kept); clamped to [0, 1]."""
        out = as_batch_mask(destination).clone()
        src = as_batch_mask(source).to(out)
        height, width = out.shape[-2:]
        bottom, right = min(y + src.shape[-2], height), min(x + src.shape[-1], width)
        if bottom > y and right > x:
            region = (slice(None), slice(y, bottom), slice(x, right))
            out[region] = combine_masks(out[region], src[:, :bottom - y, :right - x], operation)
        return (out.clamp(0.0, 1.0),)


class FeatherMask(Node):
    schema = NodeSchema(
        name="FeatherMask", category="mask",
        inputs=[Input("mask", MASK), Input("left", INT, **_POS), Input("top", INT, **_POS),
                Input("right", INT, **_POS), Input("bottom", INT, **_POS)],
        outputs=[Output(MASK)],
    )

    @classmethod
    def execute(cls, mask, left, top, right, bottom):
        """Linear fade-in from each side: the k-th column from the left (k = 0, 1, ...) is
        multiplied by (k + 1) / left, likewise from the right, top and bottom."""
        out = as_batch_mask(mask).clone()
        height, width = out.shape[-2:]
        for side, n, length in (("left", left, width), ("right", right, width),
                                ("top", top, height), ("bottom", bottom, height)):
            n = min(n, length)
            if n == 0:
                continue
            ramp = torch.ones(length, dtype=out.dtype)
            ramp[:n] = torch.arange(1, n + 1, dtype=out.dtype) / n
            if side in ("right", "bottom"):
                ramp = ramp.flip(0)
            out *= ramp if side in ("left", "right") else ramp[:, None]
        return (out,)


class ThresholdMask(Node):
    schema = NodeSchema(
        name="ThresholdMask", category="mask",
        inputs=[Input("mask", MASK),
                Input("value", FLOAT, default=0.5, min=0.0, max=1.0, step=0.01)],
        outputs=[Output(MASK)],
    )

    @classmethod
    def execute(cls, mask, value):
        """1 where the mask is above ``value``, else 0."""
        return ((mask > value).float(),)


MASK_OP_NODES = [MaskToImage, ImageToMask, ImageColorToMask, SolidMask, CropMask,
                 MaskComposite, FeatherMask, ThresholdMask]
