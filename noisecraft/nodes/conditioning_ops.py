"""Conditioning nodes that edit CONDITIONING lists without a model: average and concatenate
prompts, restrict entries to an area (in fractions), a mask, or part of the run.

Names, inputs, defaults, ranges and categories are ComfyUI's (``nodes.py``).  The options they
set are honoured by the sampler (:mod:`noisecraft.nodes.regions`, used by
:mod:`noisecraft.nodes.guiders`), as in ComfyUI.
"""

from __future__ import annotations

import torch

from noisecraft.graph.schema import (
    COMBO,
    CONDITIONING,
    FLOAT,
    MASK,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.nodes.model_values import entries_with

_STRENGTH = {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}


def _first(conditioning_from: list, node: str) -> list:
    if not conditioning_from:
        raise ValueError(f"{node}: conditioning_from is empty; connect a prompt's CONDITIONING")
    return conditioning_from[0]


class ConditioningAverage(Node):
    schema = NodeSchema(
        name="ConditioningAverage", category="conditioning",
        inputs=[Input("conditioning_to", CONDITIONING), Input("conditioning_from", CONDITIONING),
                Input("conditioning_to_strength", FLOAT, default=1.0, min=0.0, max=1.0,
                      step=0.01)],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, conditioning_to, conditioning_from, conditioning_to_strength):
        """Each entry of ``conditioning_to``: s * its context + (1 - s) * the first
        ``conditioning_from`` context (cut, or padded with zero tokens, to its length); the
        pooled outputs are mixed the same way (or taken from ``conditioning_from`` if the entry
        has none).  Only the first entry of ``conditioning_from`` is used, as in ComfyUI."""
        s = conditioning_to_strength
        context_from, opts_from = _first(conditioning_from, "ConditioningAverage")
        pooled_from = opts_from.get("pooled_output")
        out = []
        for context, opts in conditioning_to:
            other = context_from[:, :context.shape[1]]
            if other.shape[1] < context.shape[1]:
                pad = other.new_zeros((other.shape[0], context.shape[1] - other.shape[1],
                                       context.shape[2]))
                other = torch.cat([other, pad], dim=1)
            new_opts = dict(opts)
            pooled_to = opts.get("pooled_output", pooled_from)
            if pooled_from is not None and pooled_to is not None:
                new_opts["pooled_output"] = pooled_to * s + pooled_from * (1.0 - s)
            elif pooled_from is not None:
                new_opts["pooled_output"] = pooled_from
            out.append([context * s + other * (1.0 - s), new_opts])
        return (out,)


class ConditioningConcat(Node):
    schema = NodeSchema(
        name="ConditioningConcat", display_name="Conditioning (Concat)",
        category="conditioning",
        inputs=[Input("conditioning_to", CONDITIONING), Input("conditioning_from", CONDITIONING)],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, conditioning_to, conditioning_from):
        """Each entry's tokens followed by the first ``conditioning_from`` entry's tokens (the
        U-Net attends to both; options stay those of ``conditioning_to``)."""
        context_from = _first(conditioning_from, "ConditioningConcat")[0]
        return ([[torch.cat((c, context_from), dim=1), dict(o)] for c, o in conditioning_to],)


class ConditioningSetAreaPercentage(Node):
    schema = NodeSchema(
        name="ConditioningSetAreaPercentage",
        display_name="Conditioning (Set Area with Percentage)", category="conditioning",
        inputs=[Input("conditioning", CONDITIONING),
                Input("width", FLOAT, default=1.0, min=0, max=1.0, step=0.01),
                Input("height", FLOAT, default=1.0, min=0, max=1.0, step=0.01),
                Input("x", FLOAT, default=0, min=0, max=1.0, step=0.01),
                Input("y", FLOAT, default=0, min=0, max=1.0, step=0.01),
                Input("strength", FLOAT, **_STRENGTH)],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, conditioning, width, height, x, y, strength):
        """The area in fractions of the latent, resolved when sampling."""
        return (entries_with(conditioning, area=("percentage", height, width, y, x),
                             strength=strength, set_area_to_bounds=False),)


class ConditioningSetAreaStrength(Node):
    schema = NodeSchema(
        name="ConditioningSetAreaStrength", category="conditioning",
        inputs=[Input("conditioning", CONDITIONING), Input("strength", FLOAT, **_STRENGTH)],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, conditioning, strength):
        return (entries_with(conditioning, strength=strength),)


class ConditioningSetMask(Node):
    schema = NodeSchema(
        name="ConditioningSetMask", display_name="Conditioning (Set Mask)",
        category="conditioning",
        inputs=[Input("conditioning", CONDITIONING), Input("mask", MASK),
                Input("strength", FLOAT, **_STRENGTH),
                Input("set_cond_area", COMBO, choices=["default", "mask bounds"])],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, conditioning, mask, strength, set_cond_area):
        """The prompt acts where the mask is, weighted by it times ``strength``; with "mask
        bounds" the prompt is run on the mask's bounding box only."""
        if mask.ndim < 3:
            mask = mask.unsqueeze(0)
        return (entries_with(conditioning, mask=mask, mask_strength=strength,
                             set_area_to_bounds=set_cond_area != "default"),)


class ConditioningSetTimestepRange(Node):
    schema = NodeSchema(
        name="ConditioningSetTimestepRange", category="advanced/conditioning",
        inputs=[Input("conditioning", CONDITIONING),
                Input("start", FLOAT, default=0.0, min=0.0, max=1.0, step=0.001),
                Input("end", FLOAT, default=1.0, min=0.0, max=1.0, step=0.001)],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, conditioning, start, end):
        """The prompt acts from ``start`` to ``end`` (fractions of the model's timesteps,
        0 = the noisiest)."""
        return (entries_with(conditioning, start_percent=start, end_percent=end),)


CONDITIONING_OP_NODES = [ConditioningAverage, ConditioningConcat, ConditioningSetAreaPercentage,
                         ConditioningSetAreaStrength, ConditioningSetMask,
                         ConditioningSetTimestepRange]
