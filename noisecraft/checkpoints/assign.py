"""Moving weights from an open file into modules built on the meta device, without a second copy.

The loaders (``loader.py``, ``diffusers_folder.py``) all follow the same three steps:

1. build each network on ``device="meta"`` (no storage) and :func:`check_state_dict` the file's
   names and shapes against it: every missing, unexpected or mis-shaped key is found *before*
   any weight is read, and reported by name with the expected and found shapes;
2. :func:`read_tensor` each weight: a memory-mapped view of the file when dtype and device
   already match (no copy at all), else converted one tensor at a time; after a conversion the
   source's file pages are handed back to the kernel (``madvise(MADV_DONTNEED)`` on Linux), so a
   float16 file loaded as float32 does not keep the float16 pages resident as well;
3. :func:`assign` the tensors with ``load_state_dict(strict=True, assign=True)``.

A failure in any step raises before a model is returned, so nothing half-loaded escapes.

Weights loaded without conversion stay views of the file's pages (private, copy-on-write
mappings: changing a weight never writes to the file). The file must therefore not be
truncated or rewritten *in place* while the model lives (save new checkpoints to a temporary
name and rename them over the old one, which leaves the mapped old file intact).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import sys
from collections.abc import Iterable, Mapping
from functools import cache

import torch
from torch import nn

from noisecraft.checkpoints.files import SAFETENSORS_SUFFIXES, CheckpointError, StateDictFile

MAX_LISTED = 5
_MADV_DONTNEED = 4


def placeholders(f: StateDictFile, keys: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """``{module key: meta tensor shaped like the file's tensor keys[module key]}``: what the
    detection and renaming code needs, without reading any data."""
    return {mk: torch.empty(f.shape(fk), device="meta") for mk, fk in keys.items()}


def _layouts_agree(got: tuple[int, ...], want: tuple[int, ...]) -> bool:
    """A linear weight ``[O, I]`` stored as a 1x1 conv ``[O, I, 1, 1]`` (or the reverse):
    SD U-Net ``proj_in``/``proj_out`` and VAE attention projections exist in both forms."""
    return got[:2] == want[:2] and all(s == 1 for s in got[2:] + want[2:])


def _listed(keys: Iterable[str]) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:MAX_LISTED])
    return shown + (f" (and {len(keys) - MAX_LISTED} more)" if len(keys) > MAX_LISTED else "")


def check_state_dict(
    module: nn.Module,
    shapes: Mapping[str, tuple[int, ...] | torch.Size],
    *,
    path: str | os.PathLike,
    what: str,
    prefix: str = "",
) -> dict[str, tuple[int, ...]]:
    """Compare ``shapes`` (``{module key: shape}``) with what ``module`` expects.

    Raises CheckpointError listing (a few of) the missing, unexpected and mis-shaped keys, as
    the file names them (``prefix`` + key). Returns ``{key: expected shape}`` for tensors that
    need only a reshape (linear <-> 1x1 conv).
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = expected.keys() - shapes.keys()
    unexpected = shapes.keys() - expected.keys()
    reshape, wrong = {}, []
    for k in expected.keys() & shapes.keys():
        got, want = tuple(shapes[k]), expected[k]
        if got == want:
            continue
        if _layouts_agree(got, want):
            reshape[k] = want
        else:
            wrong.append(f"{prefix}{k}: expected shape {want}, found {got}")
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing key(s): {_listed(prefix + k for k in missing)}")
    if unexpected:
        problems.append(
            f"{len(unexpected)} unexpected key(s): {_listed(prefix + k for k in unexpected)}"
        )
    if wrong:
        problems.append(f"{len(wrong)} mis-shaped tensor(s): {_listed(wrong)}")
    if problems:
        config = getattr(module, "config", None)
        raise CheckpointError(
            path,
            f"the {what} weights do not fit the architecture "
            f"{'read from the file' if config is None else config}: " + "; ".join(problems)
            + ". Nothing was loaded.",
        )
    return reshape


def _is_file_mapped(f: StateDictFile) -> bool:
    # safetensors maps the file privately and hands out views that never overlap; torch.load's
    # tensors may share storage (tied weights), so their pages are never released.
    return f.path.suffix.lower() in SAFETENSORS_SUFFIXES and sys.platform.startswith("linux")


@cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _release_pages(t: torch.Tensor) -> None:
    """Drop the resident pages that lie wholly inside ``t``'s bytes (a clean, private file
    mapping: they are re-read from the file if ever touched again)."""
    start = t.data_ptr()
    end = start + t.numel() * t.element_size()
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo:
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), _MADV_DONTNEED)


def read_tensor(
    f: StateDictFile, key: str, *, dtype: torch.dtype | None, device: torch.device | str
) -> torch.Tensor:
    """One tensor of ``f`` in ``dtype`` (floating point tensors only; None keeps the file's)
    on ``device``; a view of the file when nothing needs converting."""
    t = f[key]
    target = dtype if dtype is not None and t.is_floating_point() else t.dtype
    out = t.to(device=device, dtype=target)
    if out is not t and _is_file_mapped(f):
        _release_pages(t)
    return out


def read_tensors(
    f: StateDictFile, keys: Mapping[str, str], *, dtype: torch.dtype | None,
    device: torch.device | str,
) -> dict[str, torch.Tensor]:
    """``{module key: read_tensor(f, file key)}`` for ``keys = {module key: file key}``."""
    return {mk: read_tensor(f, fk, dtype=dtype, device=device) for mk, fk in keys.items()}


def assign(
    module: nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    reshape: Mapping[str, tuple[int, ...]],
    *,
    path: str | os.PathLike,
    what: str,
) -> nn.Module:
    """Load ``state_dict`` (checked by :func:`check_state_dict`) into the meta-built
    ``module`` by assignment; return it in eval mode."""
    sd = {k: t.reshape(reshape[k]) if k in reshape else t for k, t in state_dict.items()}
    try:
        module.load_state_dict(sd, strict=True, assign=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(path, f"cannot load the {what} weights: {e}") from None
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(path, f"the {what} was not fully loaded: {_listed(left)} "
                                    "have no data (a bug in noisecraft's loader)")
    return module.eval()
