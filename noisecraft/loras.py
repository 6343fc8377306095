"""The LoRAs of a request: names to files, tags and entries to one list, hashes for metadata.

A :class:`~noisecraft.request.GenerationRequest` names LoRAs in two ways: its ``loras``
entries (a file path, or a name in ``loras_dir``) and AUTOMATIC1111 tags ``<lora:NAME:W>`` in
its prompt and negative prompt (:mod:`noisecraft.prompt_loras`), always names in
``loras_dir``.  :func:`resolve_loras` turns both into a :class:`LoraPlan`: the prompts without
the tags (what the text encoder sees) and one (file, U-Net weight, text-encoder weight) per
file, the weights of a file named several times summed (merging is linear in the weight, so
that is what applying it several times would do).

Names in ``loras_dir`` (its subfolders too): the file's path relative to the folder, without
its suffix (``style``, ``people/anna``; the names ``GET /sdapi/v1/loras`` lists) or with it;
or the bare file stem, when only one file has it (A1111 names LoRAs by their file stem).

:func:`confine_loras` is for requests from untrusted callers (the HTTP server): only names
inside one folder, never paths.  :func:`lora_short_hash` is what A1111 writes as
``Lora hashes``.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, replace
from pathlib import Path

from noisecraft.checkpoints.files import (
    PICKLE_SUFFIXES,
    SAFETENSORS_SUFFIXES,
    file_sha256,
    read_safetensors_header,
)
from noisecraft.prompt_loras import split_lora_tags
from noisecraft.request import GenerationRequest, InputError

LORA_SUFFIXES = SAFETENSORS_SUFFIXES + PICKLE_SUFFIXES
SHORT_HASH = 12  # A1111's NetworkOnDisk.shorthash


@dataclass(frozen=True)
class ResolvedLora:
    """A LoRA file with its summed weights; ``name`` is how the request first named it."""

    path: Path
    unet_weight: float
    text_encoder_weight: float
    name: str

    @property
    def active(self) -> bool:
        return self.unet_weight != 0 or self.text_encoder_weight != 0


@dataclass(frozen=True)
class LoraPlan:
    """A request's prompts without ``<lora:...>`` tags and its LoRA files, in the order first
    named."""

    prompt: str
    negative_prompt: str
    loras: tuple[ResolvedLora, ...]

    @property
    def active(self) -> tuple[ResolvedLora, ...]:
        """The LoRAs with a non-zero weight (the others change nothing)."""
        return tuple(lo for lo in self.loras if lo.active)

    def applied_to(self, request: GenerationRequest) -> GenerationRequest:
        """``request`` with the tag-free prompts (what the pipelines encode)."""
        return replace(request, prompt=self.prompt, negative_prompt=self.negative_prompt)


def lora_files(folder: str | os.PathLike) -> dict[str, Path]:
    """``{name: file}`` of the LoRA files under ``folder`` (name: relative path without the
    suffix; hidden files and folders skipped; the first of two same-named files wins)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"loras_dir {os.fspath(folder)!r} does not exist or is not a folder")
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            path = Path(dirpath, f)
            if not f.startswith(".") and path.suffix.lower() in LORA_SUFFIXES:
                out.setdefault(path.relative_to(root).with_suffix("").as_posix(), path)
    return out


def find_lora(name: str, files: dict[str, Path], folder: str, where: str) -> Path:
    """The file ``name`` means in ``files`` (from :func:`lora_files` of ``folder``)."""
    key = name.replace("\\", "/")
    stem, suffix = os.path.splitext(key)
    if key in files:
        return files[key]
    if suffix.lower() in LORA_SUFFIXES and stem in files and files[stem].suffix == suffix:
        return files[stem]
    same_stem = [n for n in files if n.rsplit("/", 1)[-1] == key]
    if len(same_stem) == 1:
        return files[same_stem[0]]
    if len(same_stem) > 1:
        raise InputError(f"{where} names LoRA {name!r}, which is ambiguous in {folder}: "
                         f"{', '.join(same_stem)}; use one of those names")
    shown = ", ".join(sorted(files)[:20]) + (" ..." if len(files) > 20 else "")
    raise InputError(f"{where} names LoRA {name!r}, which is not in {folder}; available: "
                     f"{shown or 'none'}")


class _Names:
    """Looks names up in the request's loras_dir, listing the folder once, when first asked."""

    def __init__(self, folder: str | None) -> None:
        self.folder = folder
        self._files: dict[str, Path] | None = None

    def find(self, name: str, where: str) -> Path:
        if self.folder is None:
            raise InputError(f"{where} names LoRA {name!r}, but loras_dir is not set; pass "
                             "loras_dir (a folder of LoRA files), or give the file's path")
        if self._files is None:
            self._files = lora_files(self.folder)
        return find_lora(name, self._files, self.folder, where).resolve()


def _entry_path(name: str, names: _Names) -> Path:
    path = Path(name).expanduser()
    if path.is_file():
        return path.resolve()
    if path.exists():
        raise InputError(f"LoRA {name!r} is a folder; give a LoRA file (.safetensors, ...)")
    if names.folder is None:
        raise InputError(f"LoRA {name!r} is not a file, and loras_dir is not set to look the "
                         "name up in")
    return names.find(name, "loras")


def resolve_loras(request: GenerationRequest) -> LoraPlan:
    """The request's LoRA files (entries first, then the prompt's and the negative prompt's
    tags) with weights summed per file, and its prompts without the tags.

    InputError: a bad tag, an unknown name (listing the names in ``loras_dir``), a name
    without ``loras_dir``, an entry that is neither a file nor a name there.
    """
    prompt, tags = split_lora_tags(request.prompt, "prompt")
    negative, negative_tags = split_lora_tags(request.negative_prompt, "negative prompt")
    names = _Names(request.loras_dir)
    mentions = [(_entry_path(e.name, names), e.unet_weight, e.text_encoder_weight, e.name)
                for e in request.loras]
    for where, found in (("prompt", tags), ("negative prompt", negative_tags)):
        mentions += [(names.find(t.name, f"{where} tag {t.text}"), t.unet_weight,
                      t.text_encoder_weight, t.name) for t in found]
    summed: dict[Path, ResolvedLora] = {}
    for path, unet, text, name in mentions:
        seen = summed.get(path)
        summed[path] = ResolvedLora(path, unet, text, name) if seen is None else replace(
            seen, unet_weight=seen.unet_weight + unet,
            text_encoder_weight=seen.text_encoder_weight + text)
    return LoraPlan(prompt, negative, tuple(summed.values()))


def confine_loras(request: GenerationRequest, folder: str | os.PathLike) -> GenerationRequest:
    """``request`` as an untrusted caller may send it: every LoRA it names, by entry or tag,
    must be a name inside ``folder``.  Absolute paths and ``..`` are refused (as for every file
    name the server takes), and so is a ``loras_dir`` of the caller's choosing.  Returns the
    request with its entries as the files they name and ``loras_dir`` set to ``folder``; an
    unknown name is an InputError listing the names in ``folder``."""
    from noisecraft.graph.context import UnsafePathError, safe_join

    if request.loras_dir is not None:
        raise InputError(f"loras_dir cannot be chosen here; LoRA names are looked up in "
                         f"{os.fspath(folder)}")
    names = _Names(os.fspath(folder))
    tags = [(t.name, f"{where} tag {t.text}") for where, text in
            (("prompt", request.prompt), ("negative prompt", request.negative_prompt))
            for t in split_lora_tags(text, where)[1]]
    for name, where in [(e.name, "loras") for e in request.loras] + tags:
        try:
            safe_join(folder, name, what=f"LoRA name in {where}")
        except UnsafePathError as e:
            raise InputError(str(e)) from None
    entries = tuple(e._replace(name=str(names.find(e.name, "loras"))) for e in request.loras)
    for name, where in tags:
        names.find(name, where)
    return replace(request, loras=entries, loras_dir=os.fspath(folder))


def lora_short_hash(path: str | os.PathLike) -> str:
    """A1111's short LoRA hash (the first 12 hex digits): a safetensors file's
    ``sshs_model_hash`` metadata if it has one, else the SHA-256 of its bytes after the header
    (kohya's "addnet" hash, which CivitAI lists as AutoV3); other files: of the whole file."""
    path = Path(path)
    if path.suffix.lower() not in SAFETENSORS_SUFFIXES:
        return file_sha256(path)[:SHORT_HASH]
    given = read_safetensors_header(path)[1].get("sshs_model_hash")
    if given:
        return given[:SHORT_HASH]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        f.seek(8 + n)
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()[:SHORT_HASH]


def hash_label(name: str) -> str:
    """A LoRA's name as A1111 writes it in ``Lora hashes`` (no ``:`` or ``,``; a path's
    stem for a file given by path)."""
    label = Path(name).stem if os.path.splitext(name)[1].lower() in LORA_SUFFIXES else name
    return label.replace(":", "").replace(",", "")
