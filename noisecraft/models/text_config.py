"""Configuration of CLIP text encoders: presets for SD1 / SD2 / SDXL, tiny test sizes, and
reading the architecture off a state dict."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch

from noisecraft.models.tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, VOCAB_SIZE

ACTIVATIONS = ("quick_gelu", "gelu")
LAYOUTS = ("hf", "openclip")


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text tower (architecture) and how Stable Diffusion uses it (usage).

    Architecture: ``width`` (hidden size), ``layers``, ``heads``, ``mlp_width``, ``activation``
    ("quick_gelu" for OpenAI CLIP, "gelu" for OpenCLIP), ``vocab_size``, ``max_positions``,
    ``projection_dim`` (pooled projection; None = no projection, no pooled output).
    Usage: ``layout`` of the checkpoint keys ("hf": ``transformer.text_model.*``, "openclip":
    ``model.transformer.resblocks.*``), ``pad_id`` (49407 OpenAI, 0 OpenCLIP),
    ``default_clip_skip`` (1 = last layer) and ``norm_skipped`` (final LayerNorm after an
    earlier layer).
    """

    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_width: int = 3072
    activation: str = "quick_gelu"
    vocab_size: int = VOCAB_SIZE
    max_positions: int = MAX_LENGTH
    projection_dim: int | None = None
    layout: str = "hf"
    pad_id: int = EOS_ID
    default_clip_skip: int = 1
    norm_skipped: bool = True
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r}; allowed: {', '.join(ACTIVATIONS)}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout={self.layout!r}; allowed: {', '.join(LAYOUTS)}")
        for name in ("width", "layers", "heads", "mlp_width", "vocab_size", "max_positions"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be a positive integer")
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")
        if self.vocab_size <= EOS_ID:
            raise ValueError(
                f"vocab_size={self.vocab_size} cannot hold CLIP's end token {EOS_ID}; "
                f"use {VOCAB_SIZE} (the CLIP tokenizer's vocabulary)"
            )
        if self.max_positions < 3:
            raise ValueError(f"max_positions={self.max_positions}; need >= 3 (BOS, token, EOS)")
        if not 1 <= self.default_clip_skip <= self.layers:
            raise ValueError(
                f"default_clip_skip={self.default_clip_skip}; allowed: 1 .. layers={self.layers}"
            )
        if not 0 <= self.pad_id < self.vocab_size:
            raise ValueError(f"pad_id={self.pad_id}; allowed: 0 .. {self.vocab_size - 1}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def hf_config(self):
        """The equivalent ``transformers.CLIPTextConfig`` (SDPA attention)."""
        from transformers import CLIPTextConfig

        return CLIPTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.width,
            intermediate_size=self.mlp_width,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            max_position_embeddings=self.max_positions,
            hidden_act=self.activation,
            layer_norm_eps=self.layer_norm_eps,
            projection_dim=self.projection_dim or self.width,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=self.pad_id,
            attn_implementation="sdpa",
        )


# OpenAI CLIP ViT-L/14 text tower, as SD1 uses it (last layer; clip_skip=2 is normed).
CLIP_L = TextEncoderConfig()
# OpenCLIP ViT-H/14 text tower (SD2): penultimate layer, then the final LayerNorm.
OPENCLIP_H = TextEncoderConfig(
    width=1024, layers=24, heads=16, mlp_width=4096, activation="gelu", projection_dim=1024,
    layout="openclip", pad_id=0, default_clip_skip=2, norm_skipped=True,
)
# SDXL's two encoders: penultimate layers, not normed; bigG's pooled output is projected.
CLIP_L_SDXL = replace(CLIP_L, default_clip_skip=2, norm_skipped=False)
OPENCLIP_BIGG = TextEncoderConfig(
    width=1280, layers=32, heads=20, mlp_width=5120, activation="gelu", projection_dim=1280,
    layout="openclip", pad_id=0, default_clip_skip=2, norm_skipped=False,
)
# noisecraft's own small models: a CLIP-architecture encoder they train themselves.
NOISECRAFT_SMALL = TextEncoderConfig(
    width=256, layers=4, heads=4, mlp_width=1024, activation="gelu"
)


def tiny(config: TextEncoderConfig) -> TextEncoderConfig:
    """The same usage at test size: width 32, 3 layers, 2 heads, real vocabulary and 77
    positions (3 layers so that the penultimate layer is not the first)."""
    return replace(
        config, width=32, layers=3, heads=2, mlp_width=64,
        projection_dim=None if config.projection_dim is None else 24,
    )


ARRANGEMENTS: Mapping[str, tuple[TextEncoderConfig, ...]] = MappingProxyType({
    "sd1": (CLIP_L,),
    "sd2": (OPENCLIP_H,),
    "sdxl": (CLIP_L_SDXL, OPENCLIP_BIGG),
    "sdxl_refiner": (OPENCLIP_BIGG,),
    "clip": (NOISECRAFT_SMALL,),
})


def text_configs(arrangement: str) -> tuple[TextEncoderConfig, ...]:
    """Encoder configs of a text arrangement (``noisecraft.models.family.Family.text``)."""
    try:
        return ARRANGEMENTS[arrangement]
    except KeyError:
        raise ValueError(
            f"unknown text arrangement {arrangement!r}; allowed: {', '.join(ARRANGEMENTS)}"
        ) from None


_OC_LAYER = re.compile(r"transformer\.resblocks\.(\d+)\.")
_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.")


def text_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], *, like: TextEncoderConfig | None = None
) -> TextEncoderConfig:
    """Read the architecture of one encoder from its state dict; take the rest from ``like``.

    ``sd`` may be in any layout this package knows (module keys ``transformer.text_model.*`` or
    ``model.*``, or a diffusers ``text_encoder/`` dict ``text_model.*``). Found: layout, width,
    layers, mlp width, vocabulary, positions, projection; heads keep ``like``'s head size (64 for
    all real CLIPs). Activation and usage come from ``like`` (default: CLIP-L's for HF names,
    ViT-H's for OpenCLIP names). When the encoder is a truncated copy of ``like`` that still has
    the layer ``like`` uses, the default clip skip is moved to keep using that layer (diffusers'
    23-layer SD2 encoder -> clip skip 1).
    """
    keys = list(sd)
    openclip = any(_OC_LAYER.search(k) for k in keys) or any(
        k.endswith("token_embedding.weight") and "text_model" not in k for k in keys
    )
    if openclip:
        get = _getter(sd, "token_embedding.weight")
        token, pos = get("token_embedding.weight"), get("positional_embedding")
        fc1 = get("transformer.resblocks.0.mlp.c_fc.weight")
        proj = get("text_projection", required=False)
        projection = None if proj is None else proj.shape[1]
        layer_re, base = _OC_LAYER, OPENCLIP_H
    else:
        get = _getter(sd, "text_model.embeddings.token_embedding.weight")
        token = get("text_model.embeddings.token_embedding.weight")
        pos = get("text_model.embeddings.position_embedding.weight")
        fc1 = get("text_model.encoder.layers.0.mlp.fc1.weight")
        proj = get("text_projection.weight", required=False)
        projection = None if proj is None else proj.shape[0]
        layer_re, base = _HF_LAYER, CLIP_L
    like = like or base
    layers = 1 + max((int(m.group(1)) for k in keys if (m := layer_re.search(k))), default=-1)
    if layers == 0:
        raise KeyError("no transformer layers found in the text-encoder state dict")
    width = token.shape[1]
    if width % like.head_dim:
        raise ValueError(f"width {width} is not a multiple of the head size {like.head_dim}")
    target_layer = like.layers - like.default_clip_skip  # 0-based index of the layer used
    if target_layer < layers < like.layers:  # a truncated copy, e.g. diffusers' SD2 encoder
        skip = layers - target_layer
    else:
        skip = min(like.default_clip_skip, layers)
    return replace(
        like, width=width, layers=layers, heads=width // like.head_dim, mlp_width=fc1.shape[0],
        vocab_size=token.shape[0], max_positions=pos.shape[0], projection_dim=projection,
        layout="openclip" if openclip else "hf", default_clip_skip=skip,
    )


def _getter(sd: Mapping[str, torch.Tensor], anchor: str):
    """Look keys up relative to wherever ``anchor`` sits (the layout's prefix may vary)."""
    found = [k for k in sd if k.endswith(anchor)]
    if not found:
        raise KeyError(f"no key ending in {anchor!r}: not a CLIP text-encoder state dict")
    prefix = found[0][: -len(anchor)]

    def get(name: str, required: bool = True):
        if prefix + name not in sd and required:
            raise KeyError(f"text-encoder state dict lacks {prefix + name!r}")
        return sd.get(prefix + name)

    return get
