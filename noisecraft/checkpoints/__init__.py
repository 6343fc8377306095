"""Reading real model files: single-file checkpoints, diffusers folders, VAEs and LoRAs.

Front door: :func:`load_model` (a folder or a file). See ``loader``, ``diffusers_folder``,
``detect`` and ``lora`` for the details; ``files`` for the safe, memory-mapped file access.

The names below are imported on first use (PEP 562), so that ``noisecraft.models`` modules can
import this package's key tables (``text_keys``, ``unet_keys``, ...) without a circular import
through the loaders, which import the models.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CheckpointError": "files",
    "file_sha256": "files",
    "open_state_dict": "files",
    "detect_family": "detect",
    "load_checkpoint": "loader",
    "load_model": "loader",
    "load_vae": "loader",
    "noisecraft_metadata": "loader",
    "load_diffusers_folder": "diffusers_folder",
    "LoraHandle": "lora",
    "apply_loras": "lora",
    "read_lora": "lora",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
