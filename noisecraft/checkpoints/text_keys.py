"""Text-encoder key layouts: OpenCLIP <-> transformers (HF), single files, diffusers folders.

Layouts, as stored in real files:

- SD1 single file: ``cond_stage_model.transformer.text_model.*`` (OpenAI CLIP ViT-L/14, already in
  transformers' ``CLIPTextModel`` names).
- SD2 single file: ``cond_stage_model.model.*`` (OpenCLIP ViT-H/14 text tower, OpenCLIP names).
- SDXL single file: ``conditioner.embedders.0.transformer.text_model.*`` (CLIP-L, HF names) and
  ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG/14, OpenCLIP names); the refiner has
  only bigG, at ``conditioner.embedders.0.model.*``.
- diffusers folders: ``text_encoder/`` and ``text_encoder_2/`` hold plain ``CLIPTextModel`` /
  ``CLIPTextModelWithProjection`` keys (``text_model.*``, ``text_projection.weight``).

``noisecraft.models.text`` modules have the state-dict keys of the single files with the leading
``cond_stage_model.`` / ``conditioner.`` removed; the renaming between OpenCLIP and HF names lives
in the one table below and nowhere else.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

# (OpenCLIP name, HF name, transform). Transforms: "same"; "transpose" (OpenCLIP multiplies
# x @ text_projection, HF stores a Linear weight); "qkv" (OpenCLIP's nn.MultiheadAttention keeps
# q, k, v stacked in one in_proj tensor, HF has three projections; "{}" is q, k, v).
TOWER_TABLE: tuple[tuple[str, str, str], ...] = (
    ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", "same"),
    ("positional_embedding", "text_model.embeddings.position_embedding.weight", "same"),
    ("ln_final.weight", "text_model.final_layer_norm.weight", "same"),
    ("ln_final.bias", "text_model.final_layer_norm.bias", "same"),
    ("text_projection", "text_projection.weight", "transpose"),
)
BLOCK_TABLE: tuple[tuple[str, str, str], ...] = (
    ("ln_1.weight", "layer_norm1.weight", "same"),
    ("ln_1.bias", "layer_norm1.bias", "same"),
    ("attn.in_proj_weight", "self_attn.{}_proj.weight", "qkv"),
    ("attn.in_proj_bias", "self_attn.{}_proj.bias", "qkv"),
    ("attn.out_proj.weight", "self_attn.out_proj.weight", "same"),
    ("attn.out_proj.bias", "self_attn.out_proj.bias", "same"),
    ("ln_2.weight", "layer_norm2.weight", "same"),
    ("ln_2.bias", "layer_norm2.bias", "same"),
    ("mlp.c_fc.weight", "mlp.fc1.weight", "same"),
    ("mlp.c_fc.bias", "mlp.fc1.bias", "same"),
    ("mlp.c_proj.weight", "mlp.fc2.weight", "same"),
    ("mlp.c_proj.bias", "mlp.fc2.bias", "same"),
)
OPENCLIP_BLOCK = "transformer.resblocks.{}."
HF_BLOCK = "text_model.encoder.layers.{}."
# Stored in OpenCLIP checkpoints but not part of a text encoder: CLIP's contrastive temperature
# and (in some exports) the causal mask buffer. Dropped when converting to HF names.
OPENCLIP_UNUSED = ("logit_scale", "attn_mask")
# Stored by older transformers (and so in most SD1 files); always 0..76, sometimes corrupted
# (float, off by a little) in merged checkpoints. Dropped; the model rebuilds it.
HF_UNUSED = ("text_model.embeddings.position_ids",)

_OPENCLIP_BLOCK_RE = re.compile(r"^transformer\.resblocks\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^text_model\.encoder\.layers\.(\d+)\.(.+)$")
QKV = ("q", "k", "v")


def _unknown(kind: str, keys: list[str], allowed: str) -> KeyError:
    shown = ", ".join(sorted(keys)[:5]) + (" ..." if len(keys) > 5 else "")
    return KeyError(f"{len(keys)} {kind} key(s) not in the text-encoder table: {shown}; {allowed}")


def openclip_to_hf(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenCLIP text-tower keys (without the ``model.`` prefix) -> transformers CLIP keys.

    ``in_proj_weight``/``in_proj_bias`` are split in three along dim 0 (q, k, v), the text
    projection is transposed, ``logit_scale`` and ``attn_mask`` are dropped.
    """
    tower = {oc: (hf, how) for oc, hf, how in TOWER_TABLE}
    block = {oc: (hf, how) for oc, hf, how in BLOCK_TABLE}
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in sd.items():
        if key in OPENCLIP_UNUSED:
            continue
        if key in tower:
            hf, how = tower[key]
            out[hf] = value.t().contiguous() if how == "transpose" else value
            continue
        m = _OPENCLIP_BLOCK_RE.match(key)
        if m is None or m.group(2) not in block:
            unknown.append(key)
            continue
        hf, how = block[m.group(2)]
        prefix = HF_BLOCK.format(m.group(1))
        if how == "qkv":
            # cloned: views of one tensor could not be saved separately with safetensors
            for name, part in zip(QKV, value.chunk(3, dim=0), strict=True):
                out[prefix + hf.format(name)] = part.clone()
        else:
            out[prefix + hf] = value
    if unknown:
        raise _unknown(
            "OpenCLIP", unknown,
            "allowed: token_embedding, positional_embedding, ln_final, text_projection, "
            "logit_scale and transformer.resblocks.N.{ln_1,attn,ln_2,mlp}",
        )
    return out


def hf_to_openclip(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIP text keys -> OpenCLIP text-tower keys (inverse of ``openclip_to_hf``).

    q/k/v projections are concatenated into ``in_proj_*`` (a layer missing one of them is an
    error); ``position_ids`` is dropped.
    """
    tower = {hf: (oc, how) for oc, hf, how in TOWER_TABLE}
    block = {}
    for oc, hf, how in BLOCK_TABLE:
        for name in QKV if how == "qkv" else ("",):
            block[hf.format(name)] = (oc, how, name)
    out: dict[str, torch.Tensor] = {}
    pending: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        if key in HF_UNUSED:
            continue
        if key in tower:
            oc, how = tower[key]
            out[oc] = value.t().contiguous() if how == "transpose" else value
            continue
        m = _HF_BLOCK_RE.match(key)
        if m is None or m.group(2) not in block:
            unknown.append(key)
            continue
        oc, how, name = block[m.group(2)]
        oc_key = OPENCLIP_BLOCK.format(m.group(1)) + oc
        if how == "qkv":
            pending.setdefault(oc_key, {})[name] = value
        else:
            out[oc_key] = value
    if unknown:
        raise _unknown(
            "transformers CLIP", unknown,
            "allowed: text_model.{embeddings,encoder.layers.N,final_layer_norm}.*, "
            "text_projection.weight",
        )
    for oc_key, parts in pending.items():
        if set(parts) != set(QKV):
            raise KeyError(
                f"{oc_key}: need q_proj, k_proj and v_proj to build it, got only {sorted(parts)}"
            )
        out[oc_key] = torch.cat([parts[name] for name in QKV], dim=0)
    return out


# ---- whole-checkpoint helpers -------------------------------------------------------------

# Prefix of the text part of a single-file checkpoint, per text arrangement
# (noisecraft.models.family.Family.text). The module's own keys are what follows.
CHECKPOINT_PREFIX = {
    "sd1": "cond_stage_model.",
    "sd2": "cond_stage_model.",
    "sdxl": "conditioner.",
    "sdxl_refiner": "conditioner.",
    "clip": "cond_stage_model.",
}
# Inside a module: where an encoder of each layout keeps its weights.
LAYOUT_PREFIX = {"hf": "transformer.", "openclip": "model."}


def text_state_dict_from_checkpoint(
    sd: Mapping[str, torch.Tensor], arrangement: str
) -> dict[str, torch.Tensor]:
    """The text-encoder part of a single-file checkpoint, keys as the noisecraft module has them
    (e.g. ``cond_stage_model.model.ln_final.weight`` -> ``model.ln_final.weight``)."""
    if arrangement not in CHECKPOINT_PREFIX:
        raise ValueError(
            f"unknown text arrangement {arrangement!r}; allowed: {', '.join(CHECKPOINT_PREFIX)}"
        )
    prefix = CHECKPOINT_PREFIX[arrangement]
    out = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not out:
        raise KeyError(f"no key starts with {prefix!r}: this is not an {arrangement} checkpoint's"
                       " text encoder (or it was saved without one)")
    return out


def diffusers_to_original(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """A diffusers ``text_encoder*/`` state dict -> one encoder's keys in original layout
    (``transformer.text_model.*`` for layout "hf", ``model.transformer.resblocks.*`` for
    "openclip"). For SDXL put ``embedders.0.`` / ``embedders.1.`` in front of the results."""
    if layout == "hf":
        return {LAYOUT_PREFIX["hf"] + k: v for k, v in sd.items() if k not in HF_UNUSED}
    if layout == "openclip":
        return {LAYOUT_PREFIX["openclip"] + k: v for k, v in hf_to_openclip(sd).items()}
    raise ValueError(f"unknown text-encoder layout {layout!r}; allowed: {', '.join(LAYOUT_PREFIX)}")


def original_to_diffusers(sd: Mapping[str, torch.Tensor], layout: str) -> dict[str, torch.Tensor]:
    """Inverse of ``diffusers_to_original``: one encoder's original-layout keys -> diffusers."""
    if layout not in LAYOUT_PREFIX:
        raise ValueError(
            f"unknown text-encoder layout {layout!r}; allowed: {', '.join(LAYOUT_PREFIX)}"
        )
    prefix = LAYOUT_PREFIX[layout]
    stray = [k for k in sd if not k.startswith(prefix)]
    if stray:
        raise KeyError(f"layout {layout!r} keys start with {prefix!r}; got e.g. {stray[0]!r}")
    inner = {k[len(prefix):]: v for k, v in sd.items()}
    if layout == "openclip":
        return openclip_to_hf(inner)
    return {k: v for k, v in inner.items() if k not in HF_UNUSED}
