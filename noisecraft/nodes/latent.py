"""Latent nodes that need no model: empty latents, resizing, batch slicing, noise masks."""

from __future__ import annotations

import torch

from noisecraft.graph.schema import (
    COMBO,
    FLOAT,
    INT,
    LATENT,
    MASK,
    MAX_RESOLUTION,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.nodes.tensors import CROP_METHODS, LATENT_UPSCALE_METHODS, repeat_to_batch, resize

# SD1/SD2/SDXL latents: 4 channels at 1/8 the pixel size.  Subclass and change these for
# other latent formats (EmptyLatentImage reads them from the class).
LATENT_CHANNELS = 4
LATENT_DOWNSCALE = 8


class EmptyLatentImage(Node):
    channels = LATENT_CHANNELS
    downscale = LATENT_DOWNSCALE
    schema = NodeSchema(
        name="EmptyLatentImage", display_name="Empty Latent Image", category="latent",
        description="Create a new batch of empty latent images to be denoised via sampling.",
        inputs=[
            Input("width", INT, default=512, min=16, max=MAX_RESOLUTION, step=8,
                  tooltip="The width of the latent images in pixels."),
            Input("height", INT, default=512, min=16, max=MAX_RESOLUTION, step=8,
                  tooltip="The height of the latent images in pixels."),
            Input("batch_size", INT, default=1, min=1, max=4096,
                  tooltip="The number of latent images in the batch."),
        ],
        outputs=[Output(LATENT, tooltip="The empty latent image batch.")],
    )

    @classmethod
    def execute(cls, width, height, batch_size=1):
        shape = [batch_size, cls.channels, height // cls.downscale, width // cls.downscale]
        return ({"samples": torch.zeros(shape)},)


class LatentUpscale(Node):
    schema = NodeSchema(
        name="LatentUpscale", display_name="Upscale Latent", category="latent",
        inputs=[
            Input("samples", LATENT),
            Input("upscale_method", COMBO, choices=LATENT_UPSCALE_METHODS),
            Input("width", INT, default=512, min=0, max=MAX_RESOLUTION, step=8),
            Input("height", INT, default=512, min=0, max=MAX_RESOLUTION, step=8),
            Input("crop", COMBO, choices=CROP_METHODS),
        ],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples, upscale_method, width, height, crop):
        """Size in pixels; 0 keeps the aspect ratio from the other side (minimum 64)."""
        if width == 0 and height == 0:
            return (samples,)
        x = samples["samples"]
        if width == 0:
            height = max(64, height)
            width = max(64, round(x.shape[-1] * height / x.shape[-2]))
        elif height == 0:
            width = max(64, width)
            height = max(64, round(x.shape[-2] * width / x.shape[-1]))
        else:
            width, height = max(64, width), max(64, height)
        out = dict(samples)
        out["samples"] = resize(x, width // 8, height // 8, upscale_method, crop)
        return (out,)


class LatentUpscaleBy(Node):
    schema = NodeSchema(
        name="LatentUpscaleBy", display_name="Upscale Latent By", category="latent",
        inputs=[
            Input("samples", LATENT),
            Input("upscale_method", COMBO, choices=LATENT_UPSCALE_METHODS),
            Input("scale_by", FLOAT, default=1.5, min=0.01, max=8.0, step=0.01),
        ],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples, upscale_method, scale_by):
        x = samples["samples"]
        width, height = round(x.shape[-1] * scale_by), round(x.shape[-2] * scale_by)
        out = dict(samples)
        out["samples"] = resize(x, width, height, upscale_method, "disabled")
        return (out,)


class LatentFromBatch(Node):
    schema = NodeSchema(
        name="LatentFromBatch", display_name="Latent From Batch", category="latent/batch",
        inputs=[
            Input("samples", LATENT),
            Input("batch_index", INT, default=0, min=0, max=63),
            Input("length", INT, default=1, min=1, max=64),
        ],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples, batch_index, length):
        """Items [batch_index, batch_index + length), clamped to the batch; remembers which
        batch indices they were so seeded noise stays the same per item."""
        x = samples["samples"]
        start = min(x.shape[0] - 1, batch_index)
        length = min(x.shape[0] - start, length)
        out = dict(samples)
        out["samples"] = x[start:start + length].clone()
        if "noise_mask" in samples:
            masks = samples["noise_mask"]
            if masks.shape[0] == 1:
                out["noise_mask"] = masks.clone()
            else:
                out["noise_mask"] = repeat_to_batch(masks, x.shape[0])[start:start + length].clone()
        indices = samples.get("batch_index", list(range(x.shape[0])))
        out["batch_index"] = list(indices)[start:start + length]
        return (out,)


class RepeatLatentBatch(Node):
    schema = NodeSchema(
        name="RepeatLatentBatch", display_name="Repeat Latent Batch", category="latent/batch",
        inputs=[Input("samples", LATENT), Input("amount", INT, default=1, min=1, max=64)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples, amount):
        x = samples["samples"]
        out = dict(samples)
        out["samples"] = x.repeat((amount,) + (1,) * (x.ndim - 1))
        masks = samples.get("noise_mask")
        if masks is not None and masks.shape[0] > 1:
            masks = repeat_to_batch(masks, x.shape[0])
            out["noise_mask"] = masks.repeat((amount,) + (1,) * (masks.ndim - 1))
        if "batch_index" in samples:
            idx = list(samples["batch_index"])
            offset = max(idx) - min(idx) + 1
            out["batch_index"] = idx + [i + k * offset for k in range(1, amount) for i in idx]
        return (out,)


class SetLatentNoiseMask(Node):
    schema = NodeSchema(
        name="SetLatentNoiseMask", display_name="Set Latent Noise Mask",
        category="latent/inpaint",
        inputs=[Input("samples", LATENT), Input("mask", MASK)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples, mask):
        out = dict(samples)
        out["noise_mask"] = mask.reshape((-1, 1, mask.shape[-2], mask.shape[-1]))
        return (out,)


LATENT_NODES = [EmptyLatentImage, LatentUpscale, LatentUpscaleBy, LatentFromBatch,
                RepeatLatentBatch, SetLatentNoiseMask]
