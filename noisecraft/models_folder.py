"""The models folder: where checkpoints, LoRAs, VAEs, ... are found by name.

Layout (ComfyUI's)::

    models/checkpoints/  models/loras/  models/vae/  models/embeddings/
    models/controlnet/   models/upscale_models/

Existing model collections are used where they are, never copied, through a config file in
ComfyUI's ``extra_model_paths.yaml`` format (YAML, or the same structure as TOML)::

    comfyui:
        base_path: /home/me/ComfyUI/
        checkpoints: models/checkpoints/
        loras: models/loras/
    a111:
        base_path: /home/me/stable-diffusion-webui/
        checkpoints: models/Stable-diffusion
        vae: models/VAE
        loras: |
            models/Lora
            models/LyCORIS
        embeddings: embeddings

A section that gives only ``base_path`` is read with the layout found there: AUTOMATIC1111's
(``models/Stable-diffusion``, ``models/Lora``, ``models/VAE``, ``embeddings``, ...) if
``models/Stable-diffusion`` exists, else ComfyUI's (``models/<kind>``).  Relative paths are
relative to ``base_path``, which is relative to the config file.

A name is a path relative to one of a kind's folders (``"sd15/dream.safetensors"``); the first
folder that has it wins.  The built-in default model is listed among the checkpoints as
:data:`DEFAULT_CHECKPOINT_NAME` when its weights exist.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from noisecraft.graph.context import safe_join

MODEL_KINDS = ("checkpoints", "loras", "vae", "embeddings", "controlnet", "upscale_models")
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft")
DEFAULT_CHECKPOINT_NAME = "noisecraft-default.safetensors"
COMFYUI_LAYOUT = {kind: (f"models/{kind}",) for kind in MODEL_KINDS}
A1111_LAYOUT = {
    "checkpoints": ("models/Stable-diffusion",),
    "loras": ("models/Lora", "models/LyCORIS"),
    "vae": ("models/VAE",),
    "embeddings": ("embeddings",),
    "controlnet": ("models/ControlNet", "extensions/sd-webui-controlnet/models"),
    "upscale_models": ("models/ESRGAN", "models/RealESRGAN"),
}
# ComfyUI's config also accepts these names for the same folders
_ALIASES = {"unet": "checkpoints", "diffusion_models": "checkpoints", "lora": "loras",
            "upscale_models": "upscale_models", "controlnets": "controlnet"}
_SECTION_KEYS = {"base_path", "is_default"}


class ModelFolderError(ValueError):
    """A bad models-folder config, or a model name that is in none of the folders."""


def _default_model_path() -> Path:
    from noisecraft.engine import DEFAULT_MODEL_PATH

    return DEFAULT_MODEL_PATH


@dataclass(frozen=True)
class ModelFolders:
    """Folders searched for each model kind, in order; see the module docstring.

    ``default_model``: the built-in model's weights (listed as :data:`DEFAULT_CHECKPOINT_NAME`
    when the file exists); None leaves it out.
    """

    folders: Mapping[str, tuple[Path, ...]] = field(default_factory=dict)
    default_model: Path | None = field(default_factory=_default_model_path)

    # ---- building ------------------------------------------------------------------------

    @classmethod
    def at(cls, models_dir: str | os.PathLike, **kwargs: Any) -> ModelFolders:
        """ComfyUI's layout under ``models_dir`` (``models_dir/checkpoints`` etc.)."""
        root = Path(models_dir).expanduser()
        return cls({kind: (root / kind,) for kind in MODEL_KINDS}, **kwargs)

    @classmethod
    def load(cls, models_dir: str | os.PathLike | None = None,
             config: str | os.PathLike | None = None, **kwargs: Any) -> ModelFolders:
        """``models_dir`` (ComfyUI layout; searched first) plus the folders a config names."""
        base = cls.at(models_dir, **kwargs) if models_dir is not None else cls(**kwargs)
        return base.with_config(config) if config is not None else base

    def with_config(self, config: str | os.PathLike) -> ModelFolders:
        """These folders followed by the ones ``config`` (YAML or TOML) names."""
        path = Path(config).expanduser()
        extra = folders_from_config(read_config(path), path.parent)
        merged = {k: tuple(v) for k, v in self.folders.items()}
        for kind, paths in extra.items():
            merged[kind] = merged.get(kind, ()) + tuple(p for p in paths
                                                        if p not in merged.get(kind, ()))
        return ModelFolders(merged, self.default_model)

    def create(self) -> ModelFolders:
        """Make the first folder of every kind (the ones noisecraft writes to)."""
        for paths in self.folders.values():
            if paths:
                paths[0].mkdir(parents=True, exist_ok=True)
        return self

    # ---- looking up ----------------------------------------------------------------------

    def paths(self, kind: str) -> tuple[Path, ...]:
        if kind not in MODEL_KINDS:
            raise ModelFolderError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
        return tuple(self.folders.get(kind, ()))

    def has_default(self) -> bool:
        return self.default_model is not None and Path(self.default_model).is_file()

    def names(self, kind: str) -> list[str]:
        """Model names of ``kind``: files with a model suffix (and, for checkpoints, diffusers
        folders holding ``model_index.json``), relative to their folder, sorted."""
        found: set[str] = set()
        for root in self.paths(kind):
            found.update(_model_names(root, diffusers=kind == "checkpoints"))
        if kind == "checkpoints" and self.has_default():
            found.add(DEFAULT_CHECKPOINT_NAME)
        return sorted(found)

    def resolve(self, kind: str, name: str) -> Path:
        """The file (or diffusers folder) called ``name``; names may not leave their folder."""
        if kind == "checkpoints" and name == DEFAULT_CHECKPOINT_NAME and self.has_default():
            return Path(self.default_model)
        for root in self.paths(kind):
            path = safe_join(root, name, what=f"{kind} name")
            if path.exists():
                return path
        where = ", ".join(str(p) for p in self.paths(kind)) or "no folders configured"
        names = self.names(kind)
        shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "") or "none"
        raise ModelFolderError(f"no {kind} model named {name!r} in {where}; available: {shown}")


def _model_names(root: Path, *, diffusers: bool) -> set[str]:
    if not root.is_dir():
        return set()
    out = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        if diffusers and "model_index.json" in filenames and here != root:
            out.add(here.relative_to(root).as_posix())
            dirnames.clear()  # its unet/, vae/ ... are parts, not models
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        out.update((here / f).relative_to(root).as_posix() for f in filenames
                   if not f.startswith(".") and f.lower().endswith(MODEL_SUFFIXES))
    return out


def read_config(path: Path) -> dict[str, Any]:
    """The config's top-level mapping: TOML for ``.toml`` files, YAML otherwise."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ModelFolderError(f"cannot read the model paths config {path}: {e}") from None
    if path.suffix.lower() == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ModelFolderError(f"{path} is not valid TOML: {e}") from None
    else:
        try:
            import yaml
        except ImportError:
            raise ModelFolderError(
                f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the same "
                "structure as a .toml file") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ModelFolderError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ModelFolderError(f"{path}: expected sections like 'comfyui:' or 'a111:' at the top")
    return data


def _split(value: Any, where: str) -> list[str]:
    if isinstance(value, str):
        return [line.strip() for line in value.splitlines() if line.strip()]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return [v.strip() for v in value if v.strip()]
    raise ModelFolderError(f"{where} must be a path, several paths (one per line) or a list "
                           f"of paths, got {value!r}")


def _detected_layout(base: Path) -> dict[str, tuple[str, ...]]:
    return A1111_LAYOUT if (base / "models" / "Stable-diffusion").is_dir() else COMFYUI_LAYOUT


def folders_from_config(data: Mapping[str, Any], relative_to: Path) -> dict[str, list[Path]]:
    """``{kind: [folders]}`` from a parsed config (ComfyUI's ``extra_model_paths`` format)."""
    out: dict[str, list[Path]] = {}
    for section, entries in data.items():
        if not isinstance(entries, dict):
            raise ModelFolderError(f"section {section!r} must map folder kinds to paths, got "
                                   f"{type(entries).__name__}")
        base = Path(str(entries.get("base_path", "."))).expanduser()
        base = base if base.is_absolute() else relative_to / base
        given = {k: v for k, v in entries.items() if k not in _SECTION_KEYS}
        if not given:
            given = {kind: list(paths) for kind, paths in _detected_layout(base).items()}
        for key, value in given.items():
            kind = _ALIASES.get(key, key)
            if kind not in MODEL_KINDS:
                continue  # ComfyUI's configs name other folders too (clip, gligen, ...)
            for p in _split(value, f"section {section!r} entry {key!r}"):
                folder = Path(p).expanduser()
                out.setdefault(kind, []).append(folder if folder.is_absolute() else base / folder)
    return out


def model_folders_of(context: Any) -> ModelFolders:
    """The models folders of an execution context: ``resources["models"]`` (a ModelFolders),
    else the server's ``resources["folders"]`` (ComfyUI layout under its ``models/``), else no
    folders (the built-in default model only)."""
    context = getattr(context, "execution", context)  # a NodeContext's run context
    resources = getattr(context, "resources", None) or {}
    found = resources.get("models")
    if isinstance(found, ModelFolders):
        return found
    folders = resources.get("folders")
    root = getattr(folders, "root", None)
    if root is not None:
        return ModelFolders.at(Path(root) / "models")
    return ModelFolders()
