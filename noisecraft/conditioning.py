"""Prompt -> conditioning for the U-Net, per model family.

* SD1, SD2 and noisecraft's own CLIP models (``Family.text`` in ``sd1``, ``sd2``, ``clip``):
  ``{"context": [1, 77k, C]}``.
* SDXL base: ``{"context", "y"}`` with ``y = sdxl_vector(pooled, original_size=(h, w),
  crop=(0, 0), target_size=(h, w))`` (diffusers' and ComfyUI's defaults for plain generation).
* SDXL refiner: ``y = sdxl_refiner_vector(pooled, (h, w), (0, 0), score)`` with aesthetic score
  6.0 for the prompt and 2.5 for the negative prompt (diffusers' defaults).

The prompt and the negative prompt are encoded in one batch by the text encoder's
``encode_prompts`` (weighting syntax, 75-token chunks, BREAK, clip skip), which pads the shorter
one with empty-prompt chunks so that both contexts have the same length.  An empty negative
prompt is encoded as the empty string (AUTOMATIC1111; diffusers' SDXL zeroes it instead).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from noisecraft.embeddings import PromptEmbeddings
from noisecraft.models.family import ModelBundle
from noisecraft.models.unet import sdxl_refiner_vector, sdxl_vector

CONTEXT_ONLY = ("sd1", "sd2", "clip")
REFINER_SCORES = (6.0, 2.5)


class Conditioning(NamedTuple):
    """``cond`` and ``uncond`` dicts of [1, ...] tensors, passed to the U-Net as keywords."""

    cond: dict[str, torch.Tensor]
    uncond: dict[str, torch.Tensor]


@torch.no_grad()
def encode_conditioning(
    bundle: ModelBundle,
    prompt: str,
    negative_prompt: str = "",
    *,
    width: int,
    height: int,
    clip_skip: int | None = None,
    embeddings: PromptEmbeddings | None = None,
) -> Conditioning:
    """Encode ``prompt`` and ``negative_prompt`` for ``bundle``'s family at the output size.

    ``clip_skip`` None uses each encoder's default (SD1 1, SD2 2, SDXL 2: penultimate layer).
    ``embeddings``: textual-inversion embeddings the prompts may name.
    """
    arrangement = bundle.family.text
    embedding = bundle.text_encoder.encode_prompts(
        [prompt, negative_prompt], clip_skip=clip_skip, embeddings=embeddings
    )
    context = embedding.context.float()
    cond, uncond = {"context": context[:1]}, {"context": context[1:]}
    if arrangement in CONTEXT_ONLY:
        return Conditioning(cond, uncond)
    pooled = embedding.pooled
    if pooled is None:
        raise ValueError(f"the {arrangement!r} text encoder gave no pooled output for y")
    pooled = pooled.float()
    if arrangement == "sdxl":
        y = sdxl_vector(pooled, (height, width), (0, 0), (height, width))
    elif arrangement == "sdxl_refiner":
        scores = torch.tensor(REFINER_SCORES, device=pooled.device)
        y = sdxl_refiner_vector(pooled, (height, width), (0, 0), scores)
    else:
        raise ValueError(
            f"no conditioning rule for text arrangement {arrangement!r}; known: "
            f"{', '.join((*CONTEXT_ONLY, 'sdxl', 'sdxl_refiner'))}"
        )
    cond["y"], uncond["y"] = y[:1], y[1:]
    return Conditioning(cond, uncond)
