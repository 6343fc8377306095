"""SaveLatent and LoadLatent: ComfyUI's ``.latent`` files, in the run's output / input folders.

A ``.latent`` file is a safetensors file holding the raw latents [B, C, h, w] under
``latent_tensor`` and an empty tensor under ``latent_format_version_0`` (the version marker);
older files without the marker hold latents multiplied by SD's 0.18215, which LoadLatent
divides out, as ComfyUI does.  Names are resolved like SaveImage / LoadImage's
(:func:`noisecraft.nodes.files.save_slot`, :func:`~noisecraft.nodes.files.resolve_annotated`):
subfolders allowed, ``..`` and absolute paths refused.  Writes are atomic.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from noisecraft.graph.context import NodeContext
from noisecraft.graph.schema import COMBO, LATENT, STRING, Input, Node, NodeOutput, NodeSchema
from noisecraft.graph.schema import Output as Out
from noisecraft.nodes.files import input_files, resolve_annotated, save_slot

SUFFIX = ".latent"
TENSOR_KEY = "latent_tensor"
VERSION_KEY = "latent_format_version_0"
LEGACY_SCALE = 1.0 / 0.18215  # files written before the version marker hold latents * 0.18215


def write_latent_file(path: Path, samples: torch.Tensor, metadata: dict[str, str] | None) -> None:
    """``samples`` and the version marker as a safetensors file at ``path``, atomically."""
    tensors = {TENSOR_KEY: samples.detach().cpu().contiguous(),
               VERSION_KEY: torch.tensor([])}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".latent.part", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_latent_file(path: Path) -> torch.Tensor:
    """The raw latents of a ``.latent`` file (float32; legacy files rescaled)."""
    if not path.is_file():
        raise FileNotFoundError(f"latent file {path} does not exist")
    try:
        tensors = load_file(path, device="cpu")
    except (SafetensorError, OSError) as e:
        raise ValueError(f"cannot read latent file {path}: {e} (a .latent file is a "
                         "safetensors file, as SaveLatent writes)") from None
    if TENSOR_KEY not in tensors:
        raise ValueError(f"latent file {path} has no {TENSOR_KEY!r} tensor (it has: "
                         f"{', '.join(sorted(tensors)) or 'none'})")
    scale = 1.0 if VERSION_KEY in tensors else LEGACY_SCALE
    return tensors[TENSOR_KEY].float() * scale


def _metadata(context: NodeContext | None) -> dict[str, str]:
    """ComfyUI's metadata: the API prompt and each extra_pnginfo entry, as JSON strings."""
    prompt = getattr(context, "prompt", None)
    metadata = {"prompt": "" if prompt is None else json.dumps(prompt)}
    for key, value in (getattr(context, "extra_pnginfo", None) or {}).items():
        metadata[str(key)] = json.dumps(value)
    return metadata


class SaveLatent(Node):
    schema = NodeSchema(
        name="SaveLatent", category="_for_testing", output_node=True, needs_context=True,
        inputs=[Input("samples", LATENT),
                Input("filename_prefix", STRING, default="latents/ComfyUI")],
        outputs=[],
    )

    @classmethod
    def execute(cls, samples, filename_prefix="latents/ComfyUI", context: NodeContext = None):
        """Write ``<prefix>_<counter:05>_.latent`` in the output folder (only the latents:
        a noise mask or batch indices are not kept, as in ComfyUI)."""
        directory, subfolder, stem, counter = save_slot(filename_prefix, "output", context,
                                                        SUFFIX)
        name = f"{stem}_{counter:05}_{SUFFIX}"
        write_latent_file(directory / name, samples["samples"], _metadata(context))
        return NodeOutput((), ui={"latents": [{"filename": name, "subfolder": subfolder,
                                               "type": "output"}]})


def _latent_files(context) -> list[str]:
    return input_files(context, SUFFIX)


class LoadLatent(Node):
    schema = NodeSchema(
        name="LoadLatent", category="_for_testing", needs_context=True,
        inputs=[Input("latent", COMBO, choices=_latent_files, check_choices=False)],
        outputs=[Out(LATENT)],
    )

    @classmethod
    def fingerprint(cls, context=None, **inputs):
        """The file's SHA-256, so a replaced file is re-read (ComfyUI's IS_CHANGED)."""
        path = resolve_annotated(context, inputs["latent"], "latent")
        return hashlib.sha256(path.read_bytes()).hexdigest()

    @classmethod
    def validate_inputs(cls, context=None, **inputs):
        name = inputs.get("latent")
        if context is None:
            return {"latent": "no execution context, so no input folder to find the file in"}
        try:
            path = resolve_annotated(context, name, "latent")
        except ValueError as e:
            return {"latent": str(e)}
        return {} if path.is_file() else {"latent": f"Invalid latent file: {name} (no such "
                                                    "file)"}

    @classmethod
    def execute(cls, latent, context: NodeContext):
        """``{"samples": ...}`` from the named file (input folder, or ``"name [output]"``)."""
        path = resolve_annotated(context.execution, latent, "latent")
        return ({"samples": read_latent_file(path)},)


LATENT_FILE_NODES = [SaveLatent, LoadLatent]
