"""Latent nodes that combine and transform latents: composite (plain, feathered, masked),
blend, flip, rotate, crop, arithmetic, batching.  No model needed.

Names, inputs, defaults, ranges and categories are ComfyUI's (``nodes.py`` and
``comfy_extras/nodes_latent.py`` / ``nodes_mask.py``); positions are in pixels and become
latent pixels by ``// 8``, as there.  Every node returns a new LATENT dict; the one it was
given is never modified.
"""

from __future__ import annotations

import torch

from noisecraft.graph.schema import (
    BOOLEAN,
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
from noisecraft.nodes.tensors import composite, match_latent, resize

_POS = {"default": 0, "min": 0, "max": MAX_RESOLUTION, "step": 8}


def _feather_weights(size: tuple[int, int, int, int], feather: int, edges) -> torch.Tensor:
    """LatentComposite's weights for the pasted block: row/column t (counted from each edge in
    ``edges`` = (top, bottom, left, right) flags) is multiplied by (t + 1) / feather."""
    w = torch.ones(size)
    top, bottom, left, right = edges
    h, wd = size[2], size[3]
    for t in range(feather):
        rate = (1.0 / feather) * (t + 1)
        if top:
            w[:, :, t:t + 1, :] *= rate
        if bottom:
            w[:, :, h - 1 - t:h - t, :] *= rate
        if left:
            w[:, :, :, t:t + 1] *= rate
        if right:
            w[:, :, :, wd - 1 - t:wd - t] *= rate
    return w


class LatentComposite(Node):
    schema = NodeSchema(
        name="LatentComposite", display_name="Latent Composite", category="latent",
        inputs=[Input("samples_to", LATENT), Input("samples_from", LATENT),
                Input("x", INT, **_POS), Input("y", INT, **_POS), Input("feather", INT, **_POS)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples_to, samples_from, x, y, feather=0):
        """Paste ``samples_from`` at (x // 8, y // 8), cut at the destination's edges.  With
        ``feather`` (pixels; // 8 latent pixels), the pasted block fades in linearly over that
        many latent pixels along each side that does not touch the destination's border."""
        dest = samples_to["samples"]
        src = samples_from["samples"]
        if src.shape[0] not in (1, dest.shape[0]):
            raise ValueError(f"LatentComposite: samples_from has {src.shape[0]} latents, "
                             f"samples_to {dest.shape[0]}; give one latent or the same count")
        height, width = dest.shape[-2:]
        x, y, feather = min(x // 8, width), min(y // 8, height), feather // 8
        src = src[:, :, :height - y, :width - x]
        out = dest.clone()
        region = (slice(None), slice(None), slice(y, y + src.shape[2]), slice(x, x + src.shape[3]))
        if feather == 0:
            out[region] = src
        else:
            edges = (y != 0, y + src.shape[2] < height, x != 0, x + src.shape[3] < width)
            w = _feather_weights(tuple(src.shape), feather, edges).to(src)
            out[region] = src * w + out[region] * (1 - w)
        return ({**samples_to, "samples": out},)


class LatentCompositeMasked(Node):
    schema = NodeSchema(
        name="LatentCompositeMasked", category="latent",
        inputs=[Input("destination", LATENT), Input("source", LATENT),
                Input("x", INT, **_POS), Input("y", INT, **_POS),
                Input("resize_source", BOOLEAN, default=False),
                Input("mask", MASK, optional=True)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, destination, source, x, y, resize_source, mask=None):
        """``source`` pasted at (x // 8, y // 8) weighted by ``mask`` (resized to the source)."""
        out = composite(destination["samples"].clone(), source["samples"], x, y, mask, 8,
                        resize_source)
        return ({**destination, "samples": out},)


class LatentBlend(Node):
    schema = NodeSchema(
        name="LatentBlend", display_name="Latent Blend", category="_for_testing",
        inputs=[Input("samples1", LATENT), Input("samples2", LATENT),
                Input("blend_factor", FLOAT, default=0.5, min=0, max=1, step=0.01)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples1, samples2, blend_factor):
        """samples1 * blend_factor + samples2 * (1 - blend_factor); samples2 is resized
        (bicubic, centre crop) to samples1's size first if they differ."""
        a, b = samples1["samples"], samples2["samples"]
        if a.shape != b.shape:
            b = resize(b, a.shape[-1], a.shape[-2], "bicubic", "center")
        return ({**samples1, "samples": a * blend_factor + b * (1 - blend_factor)},)


class LatentFlip(Node):
    schema = NodeSchema(
        name="LatentFlip", display_name="Flip Latent", category="latent/transform",
        inputs=[Input("samples", LATENT),
                Input("flip_method", COMBO, choices=["x-axis: vertically",
                                                     "y-axis: horizontally"])],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples, flip_method):
        dim = 2 if flip_method.startswith("x") else 3
        return ({**samples, "samples": torch.flip(samples["samples"], dims=[dim])},)


ROTATIONS = ["none", "90 degrees", "180 degrees", "270 degrees"]


def quarter_turns(rotation: str) -> int:
    """Clockwise quarter turns of a ComfyUI rotation choice ("none", "90 degrees", ...)."""
    return next((k for k, name in enumerate(ROTATIONS) if rotation == name), 0)


class LatentRotate(Node):
    schema = NodeSchema(
        name="LatentRotate", display_name="Rotate Latent", category="latent/transform",
        inputs=[Input("samples", LATENT), Input("rotation", COMBO, choices=ROTATIONS)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples, rotation):
        """Clockwise by 0/90/180/270 degrees."""
        out = torch.rot90(samples["samples"], k=quarter_turns(rotation), dims=[3, 2])
        return ({**samples, "samples": out},)


class LatentCrop(Node):
    schema = NodeSchema(
        name="LatentCrop", display_name="Crop Latent", category="latent/transform",
        inputs=[Input("samples", LATENT),
                Input("width", INT, default=512, min=64, max=MAX_RESOLUTION, step=8),
                Input("height", INT, default=512, min=64, max=MAX_RESOLUTION, step=8),
                Input("x", INT, **_POS), Input("y", INT, **_POS)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples, width, height, x, y):
        """The (width // 8) x (height // 8) block at (x // 8, y // 8); the corner is moved in so
        that at least 8 latent pixels (64 image pixels) remain on each axis, as ComfyUI."""
        s = samples["samples"]
        x = min(x // 8, s.shape[3] - 8)
        y = min(y // 8, s.shape[2] - 8)
        x, y = max(x, 0), max(y, 0)
        out = s[:, :, y:y + height // 8, x:x + width // 8]
        return ({**samples, "samples": out},)


class LatentAdd(Node):
    schema = NodeSchema(
        name="LatentAdd", category="latent/advanced",
        inputs=[Input("samples1", LATENT), Input("samples2", LATENT)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples1, samples2):
        """samples1 + samples2 (samples2 resized, bilinear with centre crop, and tiled to
        samples1's shape first)."""
        a = samples1["samples"]
        return ({**samples1, "samples": a + match_latent(a.shape, samples2["samples"])},)


class LatentSubtract(Node):
    schema = NodeSchema(
        name="LatentSubtract", category="latent/advanced",
        inputs=[Input("samples1", LATENT), Input("samples2", LATENT)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples1, samples2):
        """samples1 - samples2 (samples2 matched to samples1's shape as in LatentAdd)."""
        a = samples1["samples"]
        return ({**samples1, "samples": a - match_latent(a.shape, samples2["samples"])},)


class LatentMultiply(Node):
    schema = NodeSchema(
        name="LatentMultiply", category="latent/advanced",
        inputs=[Input("samples", LATENT),
                Input("multiplier", FLOAT, default=1.0, min=-10.0, max=10.0, step=0.01)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples, multiplier):
        return ({**samples, "samples": samples["samples"] * multiplier},)


class LatentInterpolate(Node):
    schema = NodeSchema(
        name="LatentInterpolate", category="latent/advanced",
        inputs=[Input("samples1", LATENT), Input("samples2", LATENT),
                Input("ratio", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples1, samples2, ratio):
        """Per latent pixel: the channel vectors' directions are mixed linearly (``ratio`` of
        samples1) and renormalised, their lengths mixed linearly too.  (ComfyUI divides by
        norms without keeping the channel axis, which agrees with this for batch 1 only.)"""
        a = samples1["samples"]
        b = match_latent(a.shape, samples2["samples"])

        def norm(v):
            return torch.linalg.vector_norm(v, dim=1, keepdim=True)

        na, nb = norm(a), norm(b)
        t = torch.nan_to_num(a / na) * ratio + torch.nan_to_num(b / nb) * (1.0 - ratio)
        direction = torch.nan_to_num(t / norm(t))
        return ({**samples1, "samples": direction * (na * ratio + nb * (1.0 - ratio))},)


class LatentBatch(Node):
    schema = NodeSchema(
        name="LatentBatch", category="latent/batch",
        inputs=[Input("samples1", LATENT), Input("samples2", LATENT)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples1, samples2):
        """One batch: samples1's latents then samples2's (resized, bilinear with centre crop,
        to samples1's size if they differ); ``batch_index`` concatenated likewise, so each
        item keeps its seed.  Other keys (e.g. noise_mask) come from samples1, as ComfyUI."""
        a, b = samples1["samples"], samples2["samples"]
        if a.shape[1:] != b.shape[1:]:
            b = resize(b, a.shape[-1], a.shape[-2], "bilinear", "center")
        indices = (list(samples1.get("batch_index", range(a.shape[0])))
                   + list(samples2.get("batch_index", range(b.shape[0]))))
        return ({**samples1, "samples": torch.cat((a, b), dim=0), "batch_index": indices},)


class LatentBatchSeedBehavior(Node):
    schema = NodeSchema(
        name="LatentBatchSeedBehavior", category="latent/advanced",
        inputs=[Input("samples", LATENT),
                Input("seed_behavior", COMBO, choices=["random", "fixed"], default="fixed")],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, samples, seed_behavior):
        """``fixed``: every item gets the first item's batch index, hence the same noise;
        ``random``: the batch indices are dropped (item i uses seed + i again)."""
        out = dict(samples)
        if seed_behavior == "random":
            out.pop("batch_index", None)
        else:
            first = list(samples.get("batch_index", [0]))[0]
            out["batch_index"] = [first] * samples["samples"].shape[0]
        return (out,)


LATENT_OP_NODES = [LatentComposite, LatentCompositeMasked, LatentBlend, LatentFlip,
                   LatentRotate, LatentCrop, LatentAdd, LatentSubtract, LatentMultiply,
                   LatentInterpolate, LatentBatch, LatentBatchSeedBehavior]
