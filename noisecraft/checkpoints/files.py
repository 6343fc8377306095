"""Reading model files safely: safetensors (memory-mapped) and pickled ``.ckpt`` without code.

Every reader here

* checks the file before trusting it (header size, JSON, tensor offsets inside the file, dtype
  and shape agreeing with the byte count), so a truncated or corrupt file is refused with a
  message naming the file and what was wrong, before any model is touched;
* never executes code from a file: ``.ckpt``/``.pt``/``.bin`` go through
  ``torch.load(weights_only=True)``, which refuses anything but tensors and plain containers;
* memory-maps: tensors are views of the file's pages (safetensors' ``safe_open``; ``torch.load``
  with ``mmap=True``), so loading into a model built on the meta device with
  ``load_state_dict(assign=True)`` never holds the weights twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors spec caps the JSON header at 100 MB

_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


class CheckpointError(ValueError):
    """A model file that cannot be used, with the file's name and what was expected."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {problem}")


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict, dict[str, str]]:
    """Validate a safetensors file's header; return ({name: info}, metadata).

    Checks the 8-byte header length, the JSON, every tensor's dtype, and that its byte range
    lies inside the file and matches its shape.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(path, "file is too short to be safetensors (no 8-byte header)")
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(
                path,
                f"corrupt safetensors header: it claims {n} bytes but the file has {size}; "
                "the file is truncated or not a safetensors file",
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(path, f"corrupt safetensors header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(path, "corrupt safetensors header (expected a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(path, f"corrupt entry for tensor {name!r} in the header") \
                from None
        if dtype not in _DTYPE_SIZES:
            raise CheckpointError(path, f"tensor {name!r} has unsupported dtype {dtype!r}")
        count = 1
        for d in shape:
            count *= d
        if end > data_size:
            raise CheckpointError(
                path,
                f"truncated: tensor {name!r} ends at byte {end} of the data but the file holds "
                f"only {data_size} bytes of data (an interrupted download or copy?)",
            )
        if end - start != count * _DTYPE_SIZES[dtype]:
            raise CheckpointError(
                path, f"tensor {name!r}: {end - start} bytes do not fit shape {shape} of {dtype}"
            )
    return header, metadata


@dataclass(eq=False)
class StateDictFile:
    """A model file opened for reading: names, metadata, tensors on demand (memory-mapped).

    Behaves as a read-only mapping ``name -> tensor``.  Use as a context manager or call
    :meth:`close` to release the file.
    """

    path: Path
    metadata: dict[str, str]
    _keys: list[str]
    _shapes: dict[str, tuple[int, ...]]
    _handle: object = None
    _tensors: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def keys(self) -> list[str]:
        return list(self._keys)

    def __contains__(self, name: object) -> bool:
        return name in self._shapes

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._shapes:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        if self._tensors is not None:
            return self._tensors[name]
        return self._handle.get_tensor(name)

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._keys:
            yield k, self[k]

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors under ``prefix``, with the prefix stripped (loaded lazily per tensor)."""
        return {k[len(prefix):]: self[k] for k in self._keys if k.startswith(prefix)}

    def close(self) -> None:
        self._handle = None
        self._tensors = None

    def __enter__(self) -> StateDictFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _open_safetensors(path: Path) -> StateDictFile:
    header, metadata = read_safetensors_header(path)
    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(path, f"cannot open as safetensors: {e}") from None
    shapes = {k: tuple(v["shape"]) for k, v in header.items()}
    return StateDictFile(path, dict(metadata), list(header), shapes, handle)


def _unwrap_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    """Find the flat name->tensor dict inside a pickled checkpoint (``state_dict`` nesting)."""
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            inner = obj[key]
            if any(isinstance(v, torch.Tensor) for v in inner.values()):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"expected a dict of tensors, found {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(path, "contains no tensors")
    return tensors


def _open_pickle(path: Path) -> StateDictFile:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            path,
            "refused: loading this file would need to run code from it (it pickles objects "
            "that are not plain tensors). noisecraft never executes code from model files; "
            f"use a .safetensors version of the model. (detail: {str(e).splitlines()[0]})",
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(path, f"corrupt or truncated checkpoint: {e}") from None
    tensors = _unwrap_state_dict(obj, path)
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    return StateDictFile(path, {}, list(tensors), shapes, None, tensors)


def open_state_dict(path: str | os.PathLike) -> StateDictFile:
    """Open a model file (.safetensors memory-mapped; .ckpt/.pt/.pth/.bin without code)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(path, "no such file" if not path.exists() else "not a file")
    suffix = path.suffix.lower()
    if suffix in SAFETENSORS_SUFFIXES:
        return _open_safetensors(path)
    if suffix in PICKLE_SUFFIXES:
        return _open_pickle(path)
    raise CheckpointError(
        path,
        f"unknown file type {suffix!r}; expected one of "
        f"{', '.join(SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES)}",
    )


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file (AUTOMATIC1111's "Model hash" is its first 10 hex digits)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
