"""Reading real model files: single-file checkpoints, diffusers folders, VAEs and LoRAs.

Front door: :func:`load_model` (a folder or a file). See ``loader``, ``diffusers_folder``,
``detect`` and ``lora`` for the details; ``files`` for the safe, memory-mapped file access.
"""

from noisecraft.checkpoints.detect import detect_family
from noisecraft.checkpoints.diffusers_folder import load_diffusers_folder
from noisecraft.checkpoints.files import CheckpointError, file_sha256, open_state_dict
from noisecraft.checkpoints.loader import (
    load_checkpoint,
    load_model,
    load_vae,
    noisecraft_metadata,
)

__all__ = [
    "CheckpointError",
    "detect_family",
    "file_sha256",
    "load_checkpoint",
    "load_diffusers_folder",
    "load_model",
    "load_vae",
    "noisecraft_metadata",
    "open_state_dict",
]
