"""The values that flow between model nodes: MODEL, CLIP, VAE, CONDITIONING, GUIDER.

* MODEL (:class:`ModelValue`), CLIP (:class:`ClipValue`) and VAE (:class:`VaeValue`) wrap parts
  of a loaded :class:`~noisecraft.models.family.ModelBundle` (from the engine's model cache).
* CONDITIONING is ComfyUI's structure: a list of ``[context [1, T, C], {options}]`` entries,
  options ``pooled_output`` (SDXL), ``width``/``height``/``crop_w``/``crop_h``/
  ``target_width``/``target_height`` (SDXL size conditioning; default: the latent's size, no
  crop), ``aesthetic_score`` (refiner; default 6 for positive, 2.5 for negative, as ComfyUI),
  ``area`` ``(h, w, y, x)`` in latent pixels or ``("percentage", h, w, y, x)``, ``strength``,
  ``mask`` / ``mask_strength`` / ``set_area_to_bounds``, ``start_percent`` / ``end_percent``
  (see :mod:`noisecraft.nodes.regions`), ``concat_latent_image`` / ``concat_mask``
  (inpainting models).
* GUIDER (:class:`Guider`): a model with its prompts and CFG scale.

**LoRA: copy-on-write.**  Applying a LoRA clones the module *tree* of the U-Net or text
encoder, sharing every weight tensor with the original, and merges the LoRA into the clone
(``noisecraft.checkpoints.lora.lora_bundle``, which the engine uses for requests' LoRAs too,
swaps in new Parameters for the touched layers only).  The original bundle is never
modified, so other branches of a graph, the engine's cache and other threads keep seeing
the plain model; a patched model is an ordinary module any backend can run, and costs the
memory of its touched layers.  (ComfyUI patches at sample time instead, which saves that
memory but makes a model's weights depend on which sampler is running.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from noisecraft.checkpoints.lora import lora_bundle
from noisecraft.embeddings import PromptEmbeddings
from noisecraft.engine import Engine
from noisecraft.models.family import Family, ModelBundle
from noisecraft.models.latent_formats import LatentFormat
from noisecraft.models.unet import sdxl_refiner_vector, sdxl_vector

IDENTITY_LATENT = LatentFormat(channels=4, scaling_factor=1.0)


def engine_of(context: Any) -> Engine:
    """The :class:`~noisecraft.engine.Engine` of a node's run (``resources["engine"]``)."""
    execution = getattr(context, "execution", context)
    if execution is None:
        raise LookupError("model nodes need an execution context with an engine; pass "
                          "ExecutionContext(resources={'engine': Engine()})")
    return execution.resource("engine")


@dataclass(frozen=True, eq=False)
class ModelValue:
    """MODEL: a bundle whose ``unet`` is what samples (LoRAs already merged in a clone).

    The bundle's ``family`` says what the U-Net predicts and its noise schedule
    (ModelSamplingDiscrete swaps in an overridden one); ``cfg_rescale`` is RescaleCFG's
    multiplier, which every guider built on this model applies (0: plain CFG).  Nodes that
    derive a MODEL from another use ``dataclasses.replace`` so these settings carry over, as
    ComfyUI's ``model.clone()`` keeps its patches.
    """

    bundle: ModelBundle
    loras: tuple[tuple[str, float], ...] = ()
    cfg_rescale: float = 0.0

    def schedule(self):
        return self.bundle.family.schedule()


@dataclass(frozen=True, eq=False)
class ClipValue:
    """CLIP: a bundle's text encoder(s) and the layer to read (``clip_skip`` None: the family's
    default; 1 = last layer, ComfyUI's ``stop_at_clip_layer = -clip_skip``), and the
    textual-inversion embeddings its prompts may name (those of the models folders'
    ``embeddings`` folder, as ComfyUI's CLIP carries its ``embedding_directory``).  Nodes that
    derive a CLIP from another use ``dataclasses.replace`` so these carry over."""

    bundle: ModelBundle
    clip_skip: int | None = None
    loras: tuple[tuple[str, float], ...] = ()
    embeddings: PromptEmbeddings | None = None


@dataclass(frozen=True, eq=False)
class VaeValue:
    """VAE: the autoencoder as a bundle whose latent format is the identity, so the engine's
    ``encode_images`` / ``decode_latents`` read and write raw VAE latents (ComfyUI's LATENT
    convention; the sampler scales them for the model)."""

    bundle: ModelBundle

    @classmethod
    def of(cls, vae: nn.Module, name: str, sha256: str | None = None) -> VaeValue:
        family = Family("vae", latent=IDENTITY_LATENT)
        return cls(ModelBundle(family, unet=None, vae=vae, text_encoder=None, name=name,
                               sha256=sha256))

    @property
    def downscale(self) -> int:
        return getattr(getattr(self.bundle.vae, "config", None), "downscale_factor", 8)


def with_loras(bundle: ModelBundle, loras: list[tuple[str, float]], part: str) -> ModelBundle:
    """A copy of ``bundle`` with LoRA files merged into a clone of ``part`` (``unet`` or
    ``text_encoder``); the other part and the original bundle are left as they are."""
    if part not in ("unet", "text_encoder"):
        raise ValueError(f"part must be 'unet' or 'text_encoder', got {part!r}")
    weights = [(p, w, 0.0) if part == "unet" else (p, 0.0, w) for p, w in loras]
    return lora_bundle(bundle, weights)


# ---- conditioning ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Guider:
    """GUIDER: the model, its prompts (CONDITIONING lists; ``negative`` None = no guidance)
    and the CFG scale."""

    model: ModelValue
    positive: list
    negative: list | None = None
    cfg: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)


def entry_cond(bundle: ModelBundle, entry: list, width: int, height: int,
               negative: bool = False) -> dict[str, torch.Tensor]:
    """One CONDITIONING entry -> the U-Net's keyword inputs for ``bundle``'s family at a
    ``width`` x ``height`` output: ``context`` and, for SDXL, the vector ``y``."""
    context, opts = entry[0], entry[1]
    cond = {"context": context.float()}
    arrangement = bundle.family.text
    if arrangement not in ("sdxl", "sdxl_refiner"):
        return cond
    pooled = opts.get("pooled_output")
    if pooled is None:
        raise ValueError(f"an SDXL model ({bundle.name}) needs a pooled text embedding; this "
                         "conditioning has none: encode it with this model's CLIP")
    original = (opts.get("height", height), opts.get("width", width))
    crop = (opts.get("crop_h", 0), opts.get("crop_w", 0))
    if arrangement == "sdxl":
        target = (opts.get("target_height", height), opts.get("target_width", width))
        cond["y"] = sdxl_vector(pooled.float(), original, crop, target)
    else:
        score = opts.get("aesthetic_score", 2.5 if negative else 6.0)
        cond["y"] = sdxl_refiner_vector(pooled.float(), original, crop, float(score))
    return cond


def is_plain(conditioning: list | None) -> bool:
    """One entry that covers the whole image at full strength for the whole run (the
    engine's usual case)."""
    if conditioning is None:
        return True
    if len(conditioning) != 1:
        return False
    opts = conditioning[0][1]
    return opts.get("area") is None and opts.get("mask") is None \
        and float(opts.get("strength", 1.0)) == 1.0 \
        and opts.get("start_percent", 0.0) <= 0.0 and opts.get("end_percent", 1.0) >= 1.0


def entries_with(conditioning: list, **options: Any) -> list:
    """A new CONDITIONING list with ``options`` set on every entry (tensors are shared)."""
    return [[c, {**o, **options}] for c, o in conditioning]
