"""Loading single-file Stable Diffusion checkpoints (A1111 / ComfyUI / CivitAI layout).

A single file holds the three networks under fixed prefixes, in the original LDM/SGM names:

* U-Net ``model.diffusion_model.*``;
* VAE ``first_stage_model.*``;
* text encoder(s): ``cond_stage_model.transformer.text_model.*`` (SD1, transformers names),
  ``cond_stage_model.model.*`` (SD2, OpenCLIP names), ``conditioner.embedders.0.transformer.*`` +
  ``conditioner.embedders.1.model.*`` (SDXL), ``conditioner.embedders.0.model.*`` (refiner).

noisecraft's modules carry exactly these names (minus the prefix), so no renaming happens.
Everything else in a file (EMA copies, the training schedule's buffers, ``v_pred`` markers, ...)
is ignored and listed in ``bundle.extras["ignored_keys"]``.

noisecraft's own checkpoints (written by the trainer) use the same layout and describe
themselves in the safetensors ``__metadata__`` (see :func:`noisecraft_metadata`); those
descriptions take priority over detection, so any architecture noisecraft can build loads back.

Loading builds every network on the meta device, checks all names and shapes before reading a
weight, then assigns memory-mapped tensors (see ``noisecraft.checkpoints.assign``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from noisecraft.checkpoints.assign import (
    assign,
    check_state_dict,
    placeholders,
    read_tensors,
)
from noisecraft.checkpoints.detect import UNET_PREFIX, VAE_PREFIX, detect_family
from noisecraft.checkpoints.files import (
    CheckpointError,
    StateDictFile,
    file_sha256,
    open_state_dict,
)
from noisecraft.checkpoints.text_keys import (
    CHECKPOINT_PREFIX,
    HF_UNUSED,
    OPENCLIP_UNUSED,
)
from noisecraft.checkpoints.unet_detect import unet_config_from_state_dict
from noisecraft.checkpoints.vae_keys import (
    VAE_PREFIXES,
    vae_config_from_state_dict,
    vae_state_dict_from_diffusers,
)
from noisecraft.models.family import FAMILIES, Family, ModelBundle
from noisecraft.models.latent_formats import LatentFormat
from noisecraft.models.text import build_text_encoder
from noisecraft.models.text_config import (
    TextEncoderConfig,
    text_config_from_state_dict,
    text_configs,
)
from noisecraft.models.unet import UNetModel
from noisecraft.models.unet_configs import UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig

META_FAMILY = "noisecraft.family"
META_UNET = "noisecraft.unet_config"
META_VAE = "noisecraft.vae_config"
META_TEXT = "noisecraft.text_config"
_VAE_IGNORED = ("loss.", "model_ema.")
_MAX_LISTED = 5


class Part(NamedTuple):
    """One network ready to load: built on meta, checked, with ``{module key: file key}``."""

    what: str
    module: nn.Module
    keys: dict[str, str]
    reshape: dict[str, tuple[int, ...]]


# ---- noisecraft's own metadata ---------------------------------------------------------------


def noisecraft_metadata(
    family: Family,
    *,
    unet: UNetConfig | None = None,
    vae: VAEConfig | None = None,
    text: Sequence[TextEncoderConfig] | None = None,
) -> dict[str, str]:
    """The safetensors ``__metadata__`` entries that describe a noisecraft checkpoint (JSON of the
    frozen dataclasses; ``text`` is a list, one config per encoder). :func:`load_checkpoint`
    reads them back in preference to detection."""
    out = {META_FAMILY: json.dumps(dataclasses.asdict(family))}
    for key, value in ((META_UNET, unet), (META_VAE, vae)):
        if value is not None:
            out[key] = json.dumps(dataclasses.asdict(value))
    if text is not None:
        out[META_TEXT] = json.dumps([dataclasses.asdict(c) for c in text])
    return out


def _family_from_dict(d: dict) -> Family:
    d = dict(d)
    latent = d.pop("latent", None)
    return Family(**d, **({"latent": LatentFormat(**latent)} if latent is not None else {}))


def _text_from_json(d) -> tuple[TextEncoderConfig, ...]:
    return tuple(TextEncoderConfig(**c) for c in (d if isinstance(d, list) else [d]))


_META_BUILDERS: dict[str, Callable[[Any], Any]] = {
    META_FAMILY: _family_from_dict,
    META_UNET: lambda d: UNetConfig(**d),
    META_VAE: lambda d: VAEConfig(**d),
    META_TEXT: _text_from_json,
}


def parse_noisecraft_metadata(metadata: Mapping[str, str], path) -> dict[str, Any]:
    """``{metadata key: parsed config}`` for the noisecraft entries in a safetensors file's raw
    ``__metadata__`` (the one reader of :func:`noisecraft_metadata`'s format; ``path`` names the
    file in errors)."""
    out = {}
    for key, build in _META_BUILDERS.items():
        raw = metadata.get(key)
        if raw is None:
            continue
        try:
            out[key] = build(json.loads(raw))
        except (json.JSONDecodeError, TypeError, ValueError, KeyError) as e:
            raise CheckpointError(
                path, f"metadata {key!r} is not valid ({e}); expected the JSON that "
                      "noisecraft.checkpoints.noisecraft_metadata() writes",
            ) from None
    return out


def read_noisecraft_metadata(f: StateDictFile) -> dict[str, Any]:
    """``{metadata key: parsed config}`` for the noisecraft entries present in ``f``."""
    return parse_noisecraft_metadata(f.metadata, f.path)


# ---- planning each network -------------------------------------------------------------------


def _under(f: StateDictFile, prefix: str) -> dict[str, str]:
    return {k[len(prefix):]: k for k in f.keys() if k.startswith(prefix)}


def _shapes(ph: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in ph.items()}


def unet_part(f: StateDictFile, config: UNetConfig | None, prefix: str = UNET_PREFIX) -> Part:
    """Plan the U-Net under ``prefix`` (architecture read from shapes unless ``config``)."""
    keys = _under(f, prefix)
    ph = placeholders(f, keys)
    if config is None:
        try:
            config = unet_config_from_state_dict({prefix + k: v for k, v in ph.items()}, prefix)
        except ValueError as e:
            raise CheckpointError(f.path, f"U-Net: {e}") from None
    module = UNetModel(config, device="meta")
    reshape = check_state_dict(module, _shapes(ph), path=f.path, what="U-Net", prefix=prefix)
    return Part("U-Net", module, keys, reshape)


def _vae_prefix(f: StateDictFile) -> str:
    for prefix in ("", *VAE_PREFIXES):
        if prefix + "encoder.conv_in.weight" in f:
            return prefix
    roots = sorted({k.split(".")[0] for k in f.keys()})[:_MAX_LISTED]
    raise CheckpointError(
        f.path,
        "no VAE found: expected 'encoder.conv_in.weight' with no prefix or under one of "
        f"{', '.join(VAE_PREFIXES)} (original ldm or diffusers AutoencoderKL names); the file's "
        f"top-level names are {roots}",
    )


def _is_diffusers_vae(keys) -> bool:
    return any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in keys)


def vae_part(f: StateDictFile, config: VAEConfig | None, prefix: str) -> Part:
    """Plan a VAE stored under ``prefix`` in ldm names (diffusers names: :func:`load_vae`)."""
    keys = {k: v for k, v in _under(f, prefix).items() if not k.startswith(_VAE_IGNORED)}
    ph = placeholders(f, keys)
    if config is None:
        try:
            config = vae_config_from_state_dict(ph)
        except (KeyError, ValueError) as e:
            raise CheckpointError(f.path, f"VAE ({prefix}*): {e}") from None
    module = AutoencoderKL(config, device="meta")
    reshape = check_state_dict(module, _shapes(ph), path=f.path, what="VAE", prefix=prefix)
    return Part("VAE", module, keys, reshape)


_ENCODER_HEAD = re.compile(r"^(embedders\.\d+\.)?(transformer|model)\.")


def is_unused_text_key(key: str) -> bool:
    """Stored by some exports but not part of a text encoder (``position_ids``,
    OpenCLIP's ``logit_scale``/``attn_mask``)."""
    m = _ENCODER_HEAD.match(key)
    return m is not None and key[m.end():] in (*HF_UNUSED, *OPENCLIP_UNUSED)


def split_encoders(sd: Mapping[str, Any], arrangement: str) -> list[dict[str, Any]]:
    """One dict per encoder of the arrangement (``embedders.N.`` stripped for conditioners)."""
    n = len(text_configs(arrangement))
    if arrangement not in ("sdxl", "sdxl_refiner"):
        return [dict(sd)]
    heads = [f"embedders.{i}." for i in range(n)]
    return [{k[len(h):]: v for k, v in sd.items() if k.startswith(h)} for h in heads]


def text_configs_from_shapes(
    ph: Mapping[str, torch.Tensor], arrangement: str, path
) -> tuple[TextEncoderConfig, ...]:
    """Encoder configs read from (placeholder) module-key tensors; usage from the presets."""
    parts = split_encoders(ph, arrangement)
    try:
        return tuple(text_config_from_state_dict(p, like=c)
                     for p, c in zip(parts, text_configs(arrangement), strict=True))
    except (KeyError, ValueError) as e:
        raise CheckpointError(path, f"{arrangement} text encoder: {e}") from None


def text_part(
    f: StateDictFile, arrangement: str, configs: Sequence[TextEncoderConfig] | None
) -> Part:
    prefix = CHECKPOINT_PREFIX[arrangement]
    keys = {k: v for k, v in _under(f, prefix).items() if not is_unused_text_key(k)}
    if not keys:
        raise CheckpointError(
            f.path, f"no text encoder in the file (no key starts with {prefix!r}, as an "
                    f"{arrangement} checkpoint's do); noisecraft needs the complete model",
        )
    ph = placeholders(f, keys)
    configs = tuple(configs) if configs else text_configs_from_shapes(ph, arrangement, f.path)
    try:
        module = build_text_encoder(arrangement, configs=configs, device="meta")
    except ValueError as e:
        raise CheckpointError(f.path, f"text encoder: {e}") from None
    reshape = check_state_dict(module, _shapes(ph), path=f.path, what="text encoder",
                               prefix=prefix)
    return Part("text encoder", module, keys, reshape)


def check_context(path, unet: UNetConfig, text: nn.Module) -> None:
    """The text encoders' output width must be the U-Net's cross-attention width."""
    encoders = list(getattr(text, "embedders", [text]))
    widths = [e.config.width for e in encoders]
    if sum(widths) != unet.context_dim:
        raise CheckpointError(
            path,
            f"the text encoder(s) give {'+'.join(map(str, widths))}-wide hidden states but the "
            f"U-Net's cross-attention expects context_dim={unet.context_dim}; the parts do not "
            "belong together",
        )


def family_with_prediction(name: str, details: Mapping[str, Any]) -> Family:
    """``FAMILIES[name]`` with the detected prediction type and zero-terminal-SNR flag."""
    fam = FAMILIES[name]
    if details.get("prediction", fam.prediction) != fam.prediction:
        fam = fam.with_overrides(prediction=details["prediction"])
    if details.get("zero_terminal_snr"):
        fam = fam.with_overrides(zero_terminal_snr=True)
    return fam


def load_parts(f: StateDictFile, parts: Sequence[Part], *, dtype, device) -> list[nn.Module]:
    """Read and assign every (already checked) part; tensors converted one at a time."""
    return [assign(p.module, read_tensors(f, p.keys, dtype=dtype, device=device), p.reshape,
                   path=f.path, what=p.what) for p in parts]


# ---- public entry points ---------------------------------------------------------------------


def _ignored(f: StateDictFile, parts: Sequence[tuple[Part, str]]) -> list[str]:
    used = {fk for part, _ in parts for fk in part.keys.values()}
    return sorted(k for k in f.keys() if k not in used)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    vae: str | os.PathLike | None = None,
    hash_file: bool = True,
) -> ModelBundle:
    """Load a single-file checkpoint (original layout) into a :class:`ModelBundle`.

    Args:
        family: a name from ``FAMILIES`` to use instead of detection (e.g. ``"sd2-v"`` when
            the SD2 v-prediction heuristic guesses wrong); it must fit the file's text layout.
        device, dtype: where and in which floating dtype the weights end up (``dtype=None``
            keeps the file's). float32/float16/bfloat16 files all load into any of them.
        vae: a separate VAE file (:func:`load_vae`) to use instead of the one in the
            checkpoint (or for a checkpoint saved without one).
        hash_file: compute the file's SHA-256 for ``bundle.sha256`` (reads the whole file).

    Raises CheckpointError naming the file and the problem (unknown architecture, missing /
    unexpected / mis-shaped keys, corrupt or unsafe file); nothing is loaded then.
    """
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(path, "is a folder; use load_diffusers_folder() (or load_model(), "
                                    "which picks the loader by what the path is)")
    separate_vae = load_vae(vae, device=device, dtype=dtype) if vae is not None else None
    with open_state_dict(path) as f:
        own = read_noisecraft_metadata(f)
        if META_FAMILY in own and family is None:
            fam, details = own[META_FAMILY], {"reason": f"{META_FAMILY} metadata"}
        else:
            name, details = detect_family(f, family=family)
            fam = family_with_prediction(name, details)
        unet = unet_part(f, own.get(META_UNET))
        text = text_part(f, fam.text, own.get(META_TEXT))
        check_context(path, unet.module.config, text.module)
        parts = [(unet, UNET_PREFIX), (text, CHECKPOINT_PREFIX[fam.text])]
        if separate_vae is None:
            if not any(k.startswith(VAE_PREFIX) for k in f.keys()):
                raise CheckpointError(path, f"no VAE in the file (no {VAE_PREFIX}* keys); pass "
                                            "vae=<a VAE file> to load_checkpoint")
            parts.append((vae_part(f, own.get(META_VAE), VAE_PREFIX), VAE_PREFIX))
        modules = load_parts(f, [p for p, _ in parts], dtype=dtype, device=device)
        ignored = _ignored(f, parts)
    return ModelBundle(
        family=fam,
        unet=modules[0],
        text_encoder=modules[1],
        vae=separate_vae if separate_vae is not None else modules[2],
        name=path.stem,
        sha256=file_sha256(path) if hash_file else None,
        extras={"detection": details, "source": str(path), "ignored_keys": ignored},
    )


def load_vae(
    path: str | os.PathLike,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
) -> AutoencoderKL:
    """Load a standalone VAE file: original ldm names (bare, ``first_stage_model.`` or ``vae.``,
    so a full checkpoint's VAE loads too) or diffusers ``AutoencoderKL`` names."""
    with open_state_dict(path) as f:
        prefix = _vae_prefix(f)
        keys = {k: v for k, v in _under(f, prefix).items() if not k.startswith(_VAE_IGNORED)}
        if not _is_diffusers_vae(keys):
            part = vae_part(f, read_noisecraft_metadata(f).get(META_VAE), prefix)
            return load_parts(f, [part], dtype=dtype, device=device)[0]
        try:
            ph = vae_state_dict_from_diffusers(placeholders(f, keys))
            config = vae_config_from_state_dict(ph)
        except (KeyError, ValueError) as e:
            raise CheckpointError(path, f"not a diffusers AutoencoderKL state dict: {e}") \
                from None
        module = AutoencoderKL(config, device="meta")
        reshape = check_state_dict(module, _shapes(ph), path=path, what="VAE", prefix=prefix)
        sd = vae_state_dict_from_diffusers(read_tensors(f, keys, dtype=dtype, device=device))
        return assign(module, sd, reshape, path=path, what="VAE")


def load_model(path: str | os.PathLike, **kwargs) -> ModelBundle:
    """The front door: a folder loads as a diffusers folder, a file as a single checkpoint.
    Keyword arguments go to :func:`load_diffusers_folder` / :func:`load_checkpoint`."""
    from noisecraft.checkpoints.diffusers_folder import load_diffusers_folder

    path = Path(path)
    if path.is_dir():
        return load_diffusers_folder(path, **kwargs)
    return load_checkpoint(path, **kwargs)
