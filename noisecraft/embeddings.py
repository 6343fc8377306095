"""Textual-inversion embeddings (Gal et al. 2022, "An Image is Worth One Word"): files, names,
and where a prompt refers to them.

File layouts read (never executing code: pickles go through ``torch.load(weights_only=True)``):

* AUTOMATIC1111 ``.pt``: ``{"string_to_param": {"*": [n, C]}, "name", "step", ...}``;
* ``.pt`` / ``.safetensors`` with ``emb_params`` ``[n, C]`` (SD 1.x: C = 768, SD 2.x: 1024);
* SDXL ``.safetensors``: ``clip_l`` ``[n, 768]`` and ``clip_g`` ``[n, 1280]``.

An :class:`Embedding` keeps its vectors by encoder (``""`` for a single-encoder file,
``clip_l`` / ``clip_g`` for SDXL); :meth:`Embedding.vectors_for` picks the ones for a text
encoder's width and says what fits when nothing does.

Prompts name embeddings as ComfyUI does (``embedding:name``, also with a subfolder or file
suffix, and inside weights: ``(embedding:name:1.2)``) or as AUTOMATIC1111 does (the bare file
name as a word): :func:`embedding_references`.  :func:`list_embeddings` is the answer of
A1111's ``GET /sdapi/v1/embeddings``.
"""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from noisecraft.request import InputError

EMBEDDING_SUFFIXES = (".safetensors", ".pt", ".bin")
SDXL_KEYS = ("clip_l", "clip_g")
COMFY_PREFIX = "embedding:"
_COMFY_REF = re.compile(r"embedding:([^\s,()\[\]]+?)(?=:[+-]?[.\d]+\)|[\s,()\[\]]|$)")


@dataclass(frozen=True, eq=False)
class Embedding:
    """One embedding file: ``vectors`` ``{encoder key: [n, C]}`` (float32) and its name."""

    name: str
    vectors: dict[str, torch.Tensor]
    path: Path | None = None
    step: int | None = None

    @property
    def num_vectors(self) -> int:
        return next(iter(self.vectors.values())).shape[0]

    @property
    def widths(self) -> dict[str, int]:
        return {k: v.shape[-1] for k, v in self.vectors.items()}

    def vectors_for(self, width: int, key: str | None = None) -> torch.Tensor:
        """The ``[n, width]`` vectors for a text encoder of ``width`` (``key``: ``clip_l`` /
        ``clip_g`` to choose among an SDXL file's); an InputError names the widths it has."""
        candidates = [v for k, v in self.vectors.items()
                      if v.shape[-1] == width and (key is None or k in (key, ""))]
        if not candidates:
            have = ", ".join(f"{k or 'vectors'} {w}" for k, w in self.widths.items())
            raise InputError(
                f"embedding {self.name!r} ({self.path or 'in memory'}) does not fit this model: "
                f"its text encoder takes {width}-wide token vectors, the embedding has {have}. "
                "Use an embedding trained for this model family (SD 1.x: 768, SD 2.x: 1024, "
                "SDXL: clip_l 768 + clip_g 1280)."
            )
        return candidates[0]


def _as_matrix(t: Any, path: Path, key: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or t.ndim not in (1, 2) or not t.is_floating_point():
        raise InputError(f"embedding {path}: {key} must be a float tensor [n, C], got "
                         f"{getattr(t, 'shape', type(t).__name__)}")
    return (t[None] if t.ndim == 1 else t).detach().to(torch.float32).cpu()


def _vectors(data: dict, path: Path) -> dict[str, torch.Tensor]:
    if "string_to_param" in data:
        params = data["string_to_param"]
        if not isinstance(params, dict) or len(params) != 1:
            raise InputError(f"embedding {path}: string_to_param must hold one tensor")
        return {"": _as_matrix(next(iter(params.values())), path, "string_to_param")}
    if "emb_params" in data:
        return {"": _as_matrix(data["emb_params"], path, "emb_params")}
    if all(k in data for k in SDXL_KEYS):
        return {k: _as_matrix(data[k], path, k) for k in SDXL_KEYS}
    raise InputError(
        f"embedding {path}: not a textual-inversion file; expected string_to_param (A1111 "
        f".pt), emb_params, or clip_l + clip_g (SDXL); found keys {sorted(map(str, data))[:8]}"
    )


def _read(path: Path) -> dict:
    if path.suffix.lower() == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types
            raise InputError(f"embedding {path}: not a readable safetensors file ({e})") from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True,
                          mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise InputError(
            f"embedding {path}: refused, loading it would run code from the file (it pickles "
            "objects that are not plain tensors); noisecraft never executes code from model "
            f"files. Use a .safetensors embedding. (detail: {str(e).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise InputError(f"embedding {path}: corrupt or truncated file ({e})") from None
    if not isinstance(data, dict):
        raise InputError(f"embedding {path}: expected a dict, got {type(data).__name__}")
    return data


def load_embedding(path: str | os.PathLike, name: str | None = None) -> Embedding:
    """Read an embedding file (see the module docstring for the layouts)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"embedding {path} does not exist")
    data = _read(path)
    step = data.get("step")
    return Embedding(name or path.stem, _vectors(data, path), path,
                     int(step) if isinstance(step, int) else None)


def embedding_files(folders) -> dict[str, Path]:
    """``{name: file}`` for the embeddings in ``folders``' ``embeddings`` folders (a
    :class:`~noisecraft.models_folder.ModelFolders`): name = file name without suffix (with
    its subfolder); the first folder that has a name wins."""
    out: dict[str, Path] = {}
    for rel in folders.names("embeddings"):
        stem, suffix = os.path.splitext(rel)
        if suffix.lower() in EMBEDDING_SUFFIXES and stem not in out:
            out[stem] = folders.resolve("embeddings", rel)
    return out


def embedding_references(prompt: str, names: list[str] | set[str]) -> list[tuple[int, int, str]]:
    """``(start, end, name)`` of each embedding named in ``prompt``: ComfyUI's
    ``embedding:name`` (suffix optional, weights syntax allowed around it) and AUTOMATIC1111's
    bare ``name`` as a whole word.  ``embedding:`` with an unknown name is an InputError
    listing the known ones; an unknown bare word is just a word."""
    known = set(names)
    found: list[tuple[int, int, str]] = []
    for m in _COMFY_REF.finditer(prompt):
        name = m.group(1)
        stem = os.path.splitext(name)[0] if name not in known else name
        if stem not in known:
            raise InputError(f"prompt names embedding {name!r}, which is not in the embeddings "
                             f"folder; known: {', '.join(sorted(known)) or 'none'}")
        found.append((m.start(), m.end(), stem))
    taken = [(s, e) for s, e, _ in found]
    for name in sorted(known, key=len, reverse=True):
        for m in re.finditer(rf"(?<![\w:/.-]){re.escape(name)}(?![\w/.-])", prompt):
            if not any(s <= m.start() < e for s, e in taken):
                found.append((m.start(), m.end(), name))
                taken.append((m.start(), m.end()))
    return sorted(found)


def list_embeddings(folders) -> dict[str, Any]:
    """A1111's ``/sdapi/v1/embeddings`` answer: ``{"loaded": {name: {"step", "sd_checkpoint",
    "sd_checkpoint_name", "shape", "vectors"}}, "skipped": {name: reason}}``."""
    loaded, skipped = {}, {}
    for name, path in embedding_files(folders).items():
        try:
            emb = load_embedding(path, name)
        except InputError as e:
            skipped[name] = str(e)
            continue
        loaded[name] = {"step": emb.step, "sd_checkpoint": None, "sd_checkpoint_name": None,
                        "shape": max(emb.widths.values()), "vectors": emb.num_vectors}
    return {"loaded": loaded, "skipped": skipped}


class PromptEmbeddings:
    """The embeddings prompts may name: ``{name: file or Embedding}``, loaded when a prompt first
    names them (then kept by this object).  :meth:`splitter` gives the function
    :func:`noisecraft.prompts.tokenize_spans` uses to put their vectors in place of tokens."""

    def __init__(self, entries: dict[str, Path | Embedding]) -> None:
        self._entries = dict(entries)
        self._loaded: dict[str, Embedding] = {}

    @classmethod
    def from_dir(cls, folder: str | os.PathLike) -> PromptEmbeddings:
        """Every embedding file under ``folder`` (subfolders too), named by its path relative to
        ``folder`` without the suffix (AUTOMATIC1111's ``--embeddings-dir``)."""
        folder = Path(folder)
        if not folder.is_dir():
            raise InputError(f"embeddings folder {folder} does not exist or is not a folder")
        files = sorted(p for p in folder.rglob("*")
                       if p.is_file() and p.suffix.lower() in EMBEDDING_SUFFIXES)
        out: dict[str, Path | Embedding] = {}
        for p in files:
            out.setdefault(p.relative_to(folder).with_suffix("").as_posix(), p)
        return cls(out)

    @classmethod
    def from_folders(cls, folders) -> PromptEmbeddings:
        """The ``embeddings`` folders of a :class:`~noisecraft.models_folder.ModelFolders`."""
        return cls(dict(embedding_files(folders)))

    @property
    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Embedding:
        if name not in self._loaded:
            entry = self._entries[name]
            self._loaded[name] = entry if isinstance(entry, Embedding) else load_embedding(
                entry, name)
        return self._loaded[name]

    def splitter(self, width: int, key: str | None = None):
        """``text -> [text | vectors, ...]`` for a text encoder of ``width`` (``key``: ``clip_l``
        / ``clip_g``, which of an SDXL file's vectors); a misfit raises an InputError naming the
        embedding and its widths."""
        names = set(self._entries)

        def split(text: str) -> list:
            parts: list = []
            pos = 0
            for start, end, name in embedding_references(text, names):
                if start > pos:
                    parts.append(text[pos:start])
                rows = self.get(name).vectors_for(width, key).tolist()
                parts.append(tuple(tuple(r) for r in rows))
                pos = end
            if pos < len(text) or not parts:
                parts.append(text[pos:])
            return parts

        return split
