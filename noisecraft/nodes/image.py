"""Image and mask nodes that need no model: scale, pad for outpainting, invert, grow."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from noisecraft.graph.schema import (
    BOOLEAN,
    COMBO,
    FLOAT,
    IMAGE,
    INT,
    MASK,
    MAX_RESOLUTION,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.nodes.tensors import CROP_METHODS, IMAGE_UPSCALE_METHODS, as_batch_mask, resize


class ImageScale(Node):
    schema = NodeSchema(
        name="ImageScale", display_name="Upscale Image", category="image/upscaling",
        inputs=[
            Input("image", IMAGE),
            Input("upscale_method", COMBO, choices=IMAGE_UPSCALE_METHODS),
            Input("width", INT, default=512, min=0, max=MAX_RESOLUTION, step=1),
            Input("height", INT, default=512, min=0, max=MAX_RESOLUTION, step=1),
            Input("crop", COMBO, choices=CROP_METHODS),
        ],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, upscale_method, width, height, crop):
        """0 for one side keeps the aspect ratio; 0 for both returns the image unchanged."""
        if width == 0 and height == 0:
            return (image,)
        x = image.movedim(-1, 1)
        if width == 0:
            width = max(1, round(x.shape[3] * height / x.shape[2]))
        elif height == 0:
            height = max(1, round(x.shape[2] * width / x.shape[3]))
        return (resize(x, width, height, upscale_method, crop).movedim(1, -1),)


class ImageScaleBy(Node):
    schema = NodeSchema(
        name="ImageScaleBy", display_name="Upscale Image By", category="image/upscaling",
        inputs=[
            Input("image", IMAGE),
            Input("upscale_method", COMBO, choices=IMAGE_UPSCALE_METHODS),
            Input("scale_by", FLOAT, default=1.0, min=0.01, max=8.0, step=0.01),
        ],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, upscale_method, scale_by):
        x = image.movedim(-1, 1)
        width, height = round(x.shape[3] * scale_by), round(x.shape[2] * scale_by)
        return (resize(x, width, height, upscale_method, "disabled").movedim(1, -1),)


class ImageInvert(Node):
    schema = NodeSchema(
        name="ImageInvert", display_name="Invert Image", category="image",
        inputs=[Input("image", IMAGE)], outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image):
        return (1.0 - image,)


def _outpaint_mask(h: int, w: int, left, top, right, bottom, feathering: int) -> torch.Tensor:
    """Mask over the original area: (f - d)^2 / f^2 within ``feathering`` pixels of a padded
    side (d = distance to that side), 0 elsewhere; ComfyUI's formula, vectorised."""
    inner = torch.zeros((h, w))
    if feathering > 0 and feathering * 2 < h and feathering * 2 < w:
        i = torch.arange(h, dtype=torch.float32).unsqueeze(1).expand(h, w)
        j = torch.arange(w, dtype=torch.float32).unsqueeze(0).expand(h, w)
        big_h, big_w = torch.full_like(i, float(h)), torch.full_like(j, float(w))
        d = torch.stack([
            i if top else big_h, (h - i) if bottom else big_h,
            j if left else big_w, (w - j) if right else big_w,
        ]).amin(dim=0)
        v = (feathering - d) / feathering
        inner = torch.where(d < feathering, v * v, inner)
    mask = torch.ones((h + top + bottom, w + left + right))
    mask[top:top + h, left:left + w] = inner
    return mask


class ImagePadForOutpaint(Node):
    schema = NodeSchema(
        name="ImagePadForOutpaint", display_name="Pad Image for Outpainting", category="image",
        inputs=[
            Input("image", IMAGE),
            Input("left", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            Input("top", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            Input("right", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            Input("bottom", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            Input("feathering", INT, default=40, min=0, max=MAX_RESOLUTION, step=1),
        ],
        outputs=[Output(IMAGE), Output(MASK)],
    )

    @classmethod
    def execute(cls, image, left, top, right, bottom, feathering):
        """New area filled with grey 0.5; mask 1 there, feathered into the original."""
        b, h, w, c = image.shape
        out = torch.full((b, h + top + bottom, w + left + right, c), 0.5, dtype=torch.float32)
        out[:, top:top + h, left:left + w, :] = image
        return (out, _outpaint_mask(h, w, left, top, right, bottom, feathering))


class InvertMask(Node):
    schema = NodeSchema(
        name="InvertMask", category="mask", inputs=[Input("mask", MASK)], outputs=[Output(MASK)],
    )

    @classmethod
    def execute(cls, mask):
        return (1.0 - mask,)


def _morph_step(m: torch.Tensor, grow: bool, tapered: bool) -> torch.Tensor:
    """One 3x3 grey dilation (grow) or erosion of [B, H, W]; tapered corners use the '+'
    footprint.  Edges replicate, matching scipy.ndimage's default 'reflect' mode here."""
    padded = F.pad(m.unsqueeze(1), (1, 1, 1, 1), mode="replicate").squeeze(1)
    h, w = m.shape[-2:]
    offsets = [(1, 1), (0, 1), (2, 1), (1, 0), (1, 2)]
    if not tapered:
        offsets += [(0, 0), (0, 2), (2, 0), (2, 2)]
    views = torch.stack([padded[:, dy:dy + h, dx:dx + w] for dy, dx in offsets])
    return views.amax(dim=0) if grow else views.amin(dim=0)


class GrowMask(Node):
    schema = NodeSchema(
        name="GrowMask", display_name="GrowMask", category="mask",
        inputs=[
            Input("mask", MASK),
            Input("expand", INT, default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION, step=1),
            Input("tapered_corners", BOOLEAN, default=True),
        ],
        outputs=[Output(MASK)],
    )

    @classmethod
    def execute(cls, mask, expand, tapered_corners):
        """Grow (expand > 0) or shrink (< 0) by |expand| pixels, one 3x3 step at a time."""
        out = as_batch_mask(mask).float()
        for _ in range(abs(expand)):
            out = _morph_step(out, expand > 0, tapered_corners)
        return (out,)


IMAGE_NODES = [ImageScale, ImageScaleBy, ImageInvert, ImagePadForOutpaint, InvertMask, GrowMask]
