"""AUTOMATIC1111's selectable img2img script "SD upscale" (``"script_name": "SD upscale"``,
matched case-insensitively as A1111 does) and the upscaler list it indexes.

``script_args`` is the script's A1111 layout ``[info, overlap, upscaler_index, scale_factor]``
(``scripts/sd_upscale.py``: ``run(p, _, overlap, upscaler_index, scale_factor)``; ``info`` is
its UI text, ignored).  Missing or null entries take A1111's UI defaults: overlap 64, upscaler
index 0 (``"None"``: no enlargement) and scale 2.  ``upscaler_index`` indexes ``GET
/sdapi/v1/upscalers`` (``None``, ``Lanczos``, then the files in ``models/upscale_models`` by
name, as A1111 orders its list) or, as A1111 also accepts, is an upscaler name.  The tile size
is the request's ``width`` x ``height``, the tile denoising its ``denoising_strength``.

The HTTP layer only validates and puts ``{"scale", "upscaler", "tile", "overlap"}`` in the job
payload (``upscaler``: ``"none"``, ``"lanczos"`` or a file name in ``models/upscale_models``);
the worker resolves the file and runs :func:`noisecraft.pipelines.sd_upscale.sd_upscale`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from noisecraft.metadata import A1111_UPSCALERS
from noisecraft.models_folder import ModelFolders
from noisecraft.pipelines.sd_upscale import check_scale, check_tiles
from noisecraft.request import InputError
from noisecraft.server.security import RequestError

SD_UPSCALE = "SD upscale"
IMG2IMG_SCRIPTS = (SD_UPSCALE,)
ARGS_LAYOUT = "[info, overlap, upscaler_index, scale_factor]"
DEFAULT_ARGS = (None, 64, 0, 2.0)


def upscale_models(root: Path) -> ModelFolders:
    """The models folder of the server data folder ``root`` (upscalers in upscale_models/)."""
    return ModelFolders.at(root / "models", default_model=None)


def upscalers(root: Path) -> list[dict[str, Any]]:
    """A1111's ``/sdapi/v1/upscalers`` entries, plus ``value``: what the pipeline is given."""
    files = sorted(upscale_models(root).names("upscale_models"),
                   key=lambda n: Path(n).stem.lower())
    builtin = [{"name": name, "model_name": None, "model_path": None, "model_url": None,
                "scale": 4, "value": value} for value, name in A1111_UPSCALERS.items()]
    return builtin + [{"name": Path(n).stem, "model_name": n,
                       "model_path": f"models/upscale_models/{n}", "model_url": None,
                       "scale": None, "value": n} for n in files]


def selected_script(body: dict, scripts: tuple[str, ...]) -> str | None:
    """The selectable script ``script_name`` names (None for none), or a 422 as A1111's."""
    name = body.get("script_name")
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise RequestError(f"script_name must be a string, got {type(name).__name__}",
                           status=422)
    for script in scripts:
        if script.lower() == name.strip().lower():
            return script
    raise RequestError(f"Script '{name}' not found; noisecraft has: "
                       f"{', '.join(scripts) or 'none here'}", status=422)


def _number(value: Any, what: str, kind: type) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            kind is int and value != int(value)):
        raise RequestError(f"script_args {what} must be a {'whole ' if kind is int else ''}"
                           f"number, got {value!r:.40}", status=422)
    return kind(value)


def _upscaler(choice: Any, root: Path) -> dict[str, Any]:
    entries = upscalers(root)
    names = ", ".join(f"{i}: {e['name']}" for i, e in enumerate(entries))
    if isinstance(choice, str):
        found = [e for e in entries if e["name"].lower() == choice.strip().lower()]
        if found:
            return found[0]
    elif isinstance(choice, int) and not isinstance(choice, bool) and 0 <= choice < len(entries):
        return entries[choice]
    raise RequestError(f"script_args upscaler_index {choice!r:.40} is not an upscaler; "
                       f"choose an index or name from GET /sdapi/v1/upscalers ({names})",
                       status=422)


def sd_upscale_spec(root: Path, args: Any, init: Image.Image, tile: tuple[int, int],
                    max_pixels: int) -> dict[str, Any]:
    """The job payload's ``sd_upscale`` entry from A1111 ``script_args``; 422 if unusable."""
    if args is None:
        args = []
    if not isinstance(args, list) or len(args) > len(DEFAULT_ARGS):
        raise RequestError(f"script_args of {SD_UPSCALE} must be a list {ARGS_LAYOUT}, "
                           f"got {args!r:.60}", status=422)
    values = [a if a is not None else d
              for a, d in zip(args + [None] * (4 - len(args)), DEFAULT_ARGS, strict=True)]
    overlap = _number(values[1], "overlap", int)
    upscaler = _upscaler(values[2], root)
    scale = _number(values[3], "scale_factor", float)
    try:
        check_scale(scale)
        check_tiles(tile, overlap)
    except InputError as e:
        raise RequestError(f"{SD_UPSCALE}: {e} (the tile size is the request's width x "
                           "height)", status=422) from None
    factor = 1.0 if upscaler["value"] == "none" else scale
    if init.width * init.height * factor * factor > max_pixels:
        raise RequestError(f"{SD_UPSCALE}: {init.width}x{init.height} x{factor} exceeds this "
                           f"server's limit of {max_pixels} pixels per image", status=422)
    return {"scale": scale, "upscaler": upscaler["value"], "tile": list(tile),
            "overlap": overlap}


def pipeline_args(spec: dict[str, Any], root: Path) -> dict[str, Any]:
    """A job's ``sd_upscale`` entry -> keyword arguments of ``sd_upscale`` (the worker's
    side: an upscaler file name is resolved inside ``models/upscale_models``)."""
    upscaler = spec.get("upscaler", "lanczos")
    if upscaler not in A1111_UPSCALERS:
        try:
            upscaler = str(upscale_models(root).resolve("upscale_models", upscaler))
        except ValueError as e:  # ModelFolderError, UnsafePathError
            raise InputError(str(e)) from None
    return {"scale": float(spec["scale"]), "upscaler": upscaler,
            "tile": tuple(int(v) for v in spec["tile"]), "overlap": int(spec["overlap"])}
