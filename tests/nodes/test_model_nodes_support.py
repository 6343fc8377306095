"""Shared set-up for the model-node tests (no tests here): a models folder holding tiny
checkpoints in the real single-file layout, an engine, and a run context.

The tiny fixture VAE downsamples by 2, not 8: EmptyLatentImage (which assumes 8) at 64x64
gives an 8x8 latent, which that VAE decodes to 16x16 pixels, the size ``generate_image(width=
16, height=16)`` samples at.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from noisecraft.engine import Engine
from noisecraft.graph import ExecutionContext
from noisecraft.models_folder import ModelFolders
from noisecraft.nodes import builtin_registry
from tests.fixtures.checkpoints import write_single_file

SD1_NAME = "tiny_sd1.safetensors"
PIXELS = 16  # image side the tiny VAE gives for a 64x64 EmptyLatentImage


def write_models(root: Path, families: dict[str, str] | None = None) -> Path:
    """``root/checkpoints/<name>`` for each ``{name: fixture family}`` (default: tiny SD1)."""
    (root / "checkpoints").mkdir(parents=True, exist_ok=True)
    for name, family in (families or {SD1_NAME: "sd1"}).items():
        target = root / "checkpoints" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        write_single_file(target, family)
    return root


def make_context(models: Path, tmp: Path, engine: Engine | None = None) -> ExecutionContext:
    for sub in ("input", "output"):
        (tmp / sub).mkdir(parents=True, exist_ok=True)
    return ExecutionContext(
        input_dir=tmp / "input", output_dir=tmp / "output",
        resources={"engine": engine or Engine(device="cpu"),
                   "models": ModelFolders.at(models, default_model=None)},
    )


def registry():
    return builtin_registry(models=True)


def txt2img_prompt(ckpt: str = SD1_NAME, *, seed: int = 42, steps: int = 3,
                   sampler: str = "euler_ancestral", cfg: float = 7.5, batch: int = 1) -> dict:
    """ComfyUI's default workflow, API format (its node ids)."""
    return {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "5": {"class_type": "EmptyLatentImage",
              "inputs": {"width": 64, "height": 64, "batch_size": batch}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly", "clip": ["4", 1]}},
        "3": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": sampler, "scheduler": "normal", "positive": ["6", 0],
            "negative": ["7", 0], "latent_image": ["5", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["4", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0],
                                                    "filename_prefix": "nc"}},
    }


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """IMAGE [B, H, W, 3] -> uint8 [B, H, W, 3] rounded to nearest (the engine's rounding)."""
    return (image * 255).round().clamp(0, 255).to(torch.uint8).numpy()


def write_test_image(path: Path, size: int = PIXELS, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB").save(path)
    return path


def write_test_mask(path: Path, size: int = PIXELS) -> Path:
    """Binary mask: the right half (white = repaint)."""
    a = np.zeros((size, size), dtype=np.uint8)
    a[:, size // 2:] = 255
    Image.fromarray(a, "L").save(path)
    return path
