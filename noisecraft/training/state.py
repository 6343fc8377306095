"""Checkpoints of a training run: the model file, and the exact training state beside it.

A checkpoint is a directory ``RUN_DIR/checkpoints/step_NNNNNNNN/`` holding

* ``model.safetensors`` - the weights used for sampling (the EMA average when EMA is on) in the
  ORIGINAL single-file key layout that loaders read (``model.diffusion_model.*``,
  ``first_stage_model.*``, ``cond_stage_model.transformer.text_model.*``), with the configs and
  family as JSON strings in the safetensors ``__metadata__`` (``noisecraft.family``,
  ``noisecraft.unet_config``, ...);
* ``state.safetensors`` - everything else a resumed run needs to continue bit for bit: the
  trained (online) weights, the optimiser state flattened into tensors, the EMA averages, the
  step, the data-order counter and the RNG states of torch, Python and NumPy (global) and of
  the run's own generators.  Non-tensor parts are JSON in the metadata;
* ``rng_rank{R}.safetensors`` - one per data-parallel process with that process's RNG states.

``RUN_DIR/checkpoints/latest`` names the newest complete checkpoint; it is replaced atomically
after every file of the checkpoint is written, so an interrupted save leaves the previous one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Mapping
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model."
"""+ a ``CLIPTextEncoder``'s own keys (``transformer.text_model.*``): the SD 1.x layout."""

CHECKPOINTS = "checkpoints"
LATEST = "latest"


# ----------------------------------------------------------------------------- metadata & files


def to_json(value: Any) -> str:
    """JSON of a config: dataclasses become dicts (nested ones too), tuples become lists."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    return json.dumps(value, sort_keys=True, default=str)


def field_defaults(config: Any) -> dict[str, Any]:
    """The JSON default of every field of a (nested) dataclass config that has one, shaped like
    ``json.loads(to_json(config))``: what a config recorded before a field existed meant."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value) and not isinstance(value, type):
            out[f.name] = field_defaults(value)
        elif f.default is not MISSING:
            out[f.name] = json.loads(to_json(f.default))
        elif f.default_factory is not MISSING:
            out[f.name] = json.loads(to_json(f.default_factory()))
    return out


def atomic_save(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]):
    """``safetensors`` save through a temporary file and ``os.replace`` (never half-written)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    save_file(contiguous, str(tmp), metadata=dict(metadata))
    os.replace(tmp, path)


def save_model_file(
    path: Path,
    parts: Mapping[str, Mapping[str, torch.Tensor]],
    metadata: Mapping[str, Any],
    *,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``{prefix + key: tensor}`` for each ``prefix -> state_dict`` in ``parts``.

    ``metadata`` values that are not strings are stored as JSON.  ``dtype`` (e.g. float16 for
    a shipped file) casts the floating-point tensors; loaders upcast.
    """
    tensors = {}
    for prefix, sd in parts.items():
        for key, value in sd.items():
            if dtype is not None and value.is_floating_point():
                value = value.to(dtype)
            tensors[prefix + key] = value
    meta = {k: v if isinstance(v, str) else to_json(v) for k, v in metadata.items()}
    atomic_save(tensors, path, meta)
    return Path(path)


def read_metadata(path: Path) -> dict[str, Any]:
    """The ``__metadata__`` of a safetensors file, JSON values decoded."""
    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata() or {}
    out = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def split_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


# ----------------------------------------------------------------------------- optimiser


def flatten_optimizer(sd: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``optimizer.state_dict()`` -> (tensors ``optim.<param>.<name>``, JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for key, value in meta["scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# ----------------------------------------------------------------------------- RNG


def capture_rng(generators: Mapping[str, torch.Generator]) -> tuple[dict, dict]:
    """RNG states of torch (CPU), Python and NumPy (global) and of ``generators``."""
    version, mt, gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {
        "rng.torch": torch.get_rng_state(),
        "rng.python": torch.tensor(mt, dtype=torch.int64),
        "rng.numpy": torch.from_numpy(np_keys.astype(np.int64)),
    }
    for name, g in generators.items():
        tensors[f"rng.gen.{name}"] = g.get_state()
    meta = {"python": [version, gauss], "numpy": [np_kind, int(np_pos), int(np_has_gauss),
                                                  float(np_gauss)]}
    return tensors, meta


def restore_rng(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any],
                generators: Mapping[str, torch.Generator]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    version, gauss = meta["python"]
    random.setstate((version, tuple(int(v) for v in tensors["rng.python"].tolist()), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["rng.numpy"].numpy().astype(np.uint32)
    np.random.set_state((kind, keys, pos, has_gauss, cached))
    for name, g in generators.items():
        g.set_state(tensors[f"rng.gen.{name}"])


# ----------------------------------------------------------------------------- checkpoint dirs


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint directory of a run, or None."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.exists():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "state.safetensors").exists():
        raise FileNotFoundError(
            f"{pointer} names {path.name}, but {path}/state.safetensors is missing; the run "
            f"directory was edited by hand? Point 'latest' at a complete checkpoint."
        )
    return path


def commit_checkpoint(run_dir: Path, step: int, keep: int = 2) -> Path:
    """Mark the checkpoint of ``step`` as the latest; delete all but the newest ``keep``."""
    root = Path(run_dir) / CHECKPOINTS
    target = checkpoint_dir(run_dir, step)
    tmp = root / (LATEST + ".tmp")
    tmp.write_text(target.name + "\n")
    os.replace(tmp, root / LATEST)
    old = sorted(p for p in root.glob("step_*") if p.is_dir() and p != target)
    for path in old[: max(len(old) - (keep - 1), 0)]:
        shutil.rmtree(path, ignore_errors=True)
    return target


def save_state(
    path: Path,
    *,
    step: int,
    trained: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    ema: Mapping[str, Any] | None,
    extra: Mapping[str, Any],
) -> None:
    """``state.safetensors``: online weights, optimiser, EMA and the JSON ``extra``."""
    tensors = {f"online.{k}": v for k, v in trained.items()}
    opt_tensors, opt_meta = flatten_optimizer(optimizer.state_dict())
    tensors.update(opt_tensors)
    meta: dict[str, Any] = {"step": step, "optimizer": opt_meta, "extra": dict(extra)}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema["shadow"].items()})
        meta["ema"] = {"decay": ema["decay"], "num_updates": ema["num_updates"]}
    atomic_save(tensors, path, {"noisecraft.training_state": to_json(meta)})


def load_state(path: Path) -> dict[str, Any]:
    """Inverse of :func:`save_state`: ``step``, ``trained``, ``optimizer``, ``ema``, ``extra``."""
    tensors = load_file(str(path))
    meta = read_metadata(path)["noisecraft.training_state"]
    ema = None
    if "ema" in meta:
        ema = {**meta["ema"], "shadow": split_prefix(tensors, "ema.")}
    return {
        "step": int(meta["step"]),
        "trained": split_prefix(tensors, "online."),
        "optimizer": unflatten_optimizer(tensors, meta["optimizer"]),
        "ema": ema,
        "extra": meta["extra"],
    }


def save_rng(path: Path, generators: Mapping[str, torch.Generator]) -> None:
    tensors, meta = capture_rng(generators)
    atomic_save(tensors, path, {"noisecraft.rng": to_json(meta)})


def load_rng(path: Path, generators: Mapping[str, torch.Generator]) -> None:
    if not Path(path).exists():
        raise FileNotFoundError(
            f"{path} is missing: this checkpoint was written by a run with fewer processes; "
            "resume with the same number of processes (torchrun --nproc_per_node) as before"
        )
    restore_rng(load_file(str(path)), read_metadata(path)["noisecraft.rng"], generators)


# ----------------------------------------------------------------------------- loading


def load_trained_model(path: Path):
    """A ``ModelBundle`` from a file written by the trainer (float32, eval mode).

    The architecture comes from the ``noisecraft.*`` metadata, parsed by the checkpoint
    loader's own reader (``noisecraft.checkpoints.loader.parse_noisecraft_metadata``, so both
    read one format); fp16-stored weights are upcast.  A pixel-space model has no
    ``first_stage_model.*`` keys and ``vae=None``.
    """
    from noisecraft.checkpoints.loader import (
        META_FAMILY,
        META_TEXT,
        META_UNET,
        META_VAE,
        parse_noisecraft_metadata,
    )
    from noisecraft.models.family import ModelBundle
    from noisecraft.models.text import CLIPTextEncoder
    from noisecraft.models.unet import UNetModel
    from noisecraft.models.vae import AutoencoderKL

    with safe_open(str(path), framework="pt") as f:
        meta = parse_noisecraft_metadata(f.metadata() or {}, path)
    missing = [k for k in (META_FAMILY, META_UNET, META_TEXT) if k not in meta]
    if missing:
        raise ValueError(f"{path} lacks metadata {missing}: not a noisecraft-trained model file")
    if len(meta[META_TEXT]) != 1:
        raise ValueError(f"{path}: {META_TEXT} lists {len(meta[META_TEXT])} text encoders; "
                         "the trainer's models have exactly one (CLIP layout)")
    tensors = {k: v.float() for k, v in load_file(str(path)).items()}
    unet = UNetModel(meta[META_UNET])
    unet.load_state_dict(split_prefix(tensors, UNET_PREFIX))
    text = CLIPTextEncoder(meta[META_TEXT][0])
    text.load_state_dict(split_prefix(tensors, TEXT_PREFIX))
    vae = None
    if META_VAE in meta:
        vae = AutoencoderKL(meta[META_VAE])
        vae.load_state_dict(split_prefix(tensors, VAE_PREFIX))
        vae.eval()
    return ModelBundle(meta[META_FAMILY], unet.eval(), vae, text.eval(), name=Path(path).stem)
