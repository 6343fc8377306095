"""Paths inside an image's saved settings, made usable again (``noisecraft generate --from``).

Settings keep every path as it was given: the init image, the mask, the model, ControlNet
models and images, LoRA files, the embeddings and LoRA folders, an SD upscale's upscaler
model; relative paths are relative to
the folder the first run started in, which a later run may not share.
:func:`resolve_settings_paths` looks each relative path up in two places, in order:

1. the current folder (the path is kept as it is: re-running where the image was made gives
   settings identical to the original's);
2. the image's own folder (inputs kept next to their outputs, or moved together with them):
   the path becomes ``image_folder / path``.

A path in neither place is an :class:`~noisecraft.request.InputError` naming both places tried.
Absolute paths, in-memory placeholders (``"<image>"``), and names the caller knows (models or
ControlNets registered on its engine) are left alone, and so are LoRA entries that are not
found when ``loras_dir`` is set: they may be names in that folder, which the LoRA resolver
checks.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from noisecraft.request import InputError

IN_MEMORY = "<image>"
FILE_KEYS = ("init_image", "mask", "model", "embeddings_dir", "loras_dir")
UPSCALER_NAMES = ("lanczos", "none")
"""SD upscale's upscalers that are not files (``noisecraft.pipelines.sd_upscale``)."""


class _Finder:
    """Looks relative paths up in the current folder, then in the image's folder."""

    def __init__(self, image_path: str | os.PathLike) -> None:
        self.image = os.fspath(image_path)
        self.folder = Path(image_path).parent

    def find(self, value: Any, what: str, *, missing_ok: bool = False) -> Any:
        if not isinstance(value, str) or not value or value == IN_MEMORY:
            return value
        path = Path(value).expanduser()
        if path.is_absolute() or path.exists():
            return value
        beside = self.folder / path
        if beside.exists():
            return os.fspath(beside)
        if missing_ok:
            return value
        hint = " or name another model (-m, model=)" if what == "model" else ""
        raise InputError(
            f"{what} {value!r} in the settings of {self.image} is in neither place tried: "
            f"{Path.cwd() / path} (relative to the current folder) nor "
            f"{Path(os.path.abspath(beside))} (relative to the image's folder); put it in one "
            f"of them{hint}"
        )


def resolve_settings_paths(
    settings: Mapping[str, Any],
    image_path: str | os.PathLike,
    *,
    names: Collection[str] = (),
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """``settings`` (read from ``image_path``) with their relative paths found (see the module
    docstring).  ``names``: model and ControlNet names the caller's engine knows (left as they
    are); ``skip``: setting names the caller replaces anyway (e.g. the model of ``-m``)."""
    finder = _Finder(image_path)
    out = dict(settings)
    for key in FILE_KEYS:
        if key in out and key not in skip and out[key] not in names:
            out[key] = finder.find(out[key], key)
    if "controlnets" in out and "controlnets" not in skip:
        out["controlnets"] = [_controlnet(finder, unit, names) for unit in out["controlnets"]]
    if "loras" in out and "loras" not in skip:
        missing_ok = out.get("loras_dir") is not None
        out["loras"] = [_lora(finder, entry, missing_ok) for entry in out["loras"]]
    upscale = out.get("sd_upscale")
    if isinstance(upscale, Mapping) and upscale.get("upscaler") not in UPSCALER_NAMES:
        out["sd_upscale"] = {**upscale,
                             "upscaler": finder.find(upscale.get("upscaler"), "upscaler model")}
    return out


def _controlnet(finder: _Finder, unit: Any, names: Collection[str]) -> Any:
    if not isinstance(unit, Mapping):
        return unit
    unit = dict(unit)
    if unit.get("model") not in names:
        unit["model"] = finder.find(unit.get("model"), "ControlNet model")
    unit["image"] = finder.find(unit.get("image"), "ControlNet image")
    return unit


def _lora(finder: _Finder, entry: Any, missing_ok: bool) -> Any:
    if isinstance(entry, str):
        return finder.find(entry, "LoRA", missing_ok=missing_ok)
    if isinstance(entry, list | tuple) and entry:
        return [finder.find(entry[0], "LoRA", missing_ok=missing_ok), *entry[1:]]
    return entry
