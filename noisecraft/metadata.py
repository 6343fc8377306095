"""Image metadata: AUTOMATIC1111's ``parameters`` text, full JSON settings, atomic PNG writes.

An image noisecraft writes carries two PNG text chunks:

* ``parameters``: AUTOMATIC1111's format, which existing tools (A1111's PNG Info, CivitAI,
  image browsers) read::

      a red circle <lora:style:0.7>
      Negative prompt: blurry
      Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512,
      Lora hashes: "style: 0123456789ab"

  (the settings are one line in the file; LoRA tags stay in the prompt, as A1111 keeps them)

* ``noisecraft``: the complete settings as JSON, from which ``noisecraft generate --from``
  re-creates the image exactly.

The name tables below are the single home of the ComfyUI <-> AUTOMATIC1111 naming.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

SETTINGS_KEY = "noisecraft"
PARAMETERS_KEY = "parameters"

# ComfyUI sampler name -> AUTOMATIC1111 sampler name
A1111_SAMPLERS = {
    "euler": "Euler",
    "euler_ancestral": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a",
    "lms": "LMS",
    "dpmpp_2s_ancestral": "DPM++ 2S a",
    "dpmpp_sde": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_sde": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "DPM++ 3M SDE",
    "ddim": "DDIM",
    "ddpm": "DDPM",
    "uni_pc": "UniPC",
    "lcm": "LCM",
    # CFG++ (Chung et al. 2024), as Forge / A1111 1.10 name them
    "euler_cfg_pp": "Euler CFG++",
    "euler_ancestral_cfg_pp": "Euler a CFG++",
    "dpmpp_2m_cfg_pp": "DPM++ 2M CFG++",
    "dpmpp_2s_ancestral_cfg_pp": "DPM++ 2S a CFG++",
}
# ComfyUI scheduler (spacing) name -> AUTOMATIC1111 "Schedule type"
A1111_SCHEDULERS = {
    "normal": "Normal",
    "karras": "Karras",
    "exponential": "Exponential",
    "sgm_uniform": "SGM Uniform",
    "simple": "Simple",
    "ddim_uniform": "DDIM",
    "beta": "Beta",
    "leading": "Leading",
    "trailing": "Trailing",
    "linspace": "Uniform",
}

# SD upscale's upscaler value (noisecraft.pipelines.sd_upscale) -> AUTOMATIC1111 upscaler name;
# a model file is named by its stem, as A1111 names the files in models/ESRGAN
A1111_UPSCALERS = {"none": "None", "lanczos": "Lanczos"}


def upscaler_label(upscaler: str | os.PathLike) -> str:
    """AUTOMATIC1111's name of an SD-upscale upscaler: ``None``, ``Lanczos`` or the file's stem."""
    value = os.fspath(upscaler)
    return A1111_UPSCALERS.get(value) or Path(value).stem


def _inverse(table: Mapping[str, str]) -> dict[str, str]:
    return {v.lower(): k for k, v in table.items()}


_SAMPLER_FROM_A1111 = _inverse(A1111_SAMPLERS)
_SCHEDULER_FROM_A1111 = _inverse(A1111_SCHEDULERS) | {"automatic": "normal", "uniform": "normal"}


def sampler_from_a1111(name: str) -> tuple[str, str | None]:
    """(sampler, scheduler or None) for an A1111 sampler name, incl. old ``"DPM++ 2M Karras"``."""
    key = name.strip().lower()
    if key in _SAMPLER_FROM_A1111:
        return _SAMPLER_FROM_A1111[key], None
    if key in A1111_SAMPLERS:  # already a ComfyUI name
        return key, None
    for suffix, scheduler in (
        (" karras", "karras"), (" exponential", "exponential"), (" sgm uniform", "sgm_uniform"),
    ):
        if key.endswith(suffix) and key[: -len(suffix)] in _SAMPLER_FROM_A1111:
            return _SAMPLER_FROM_A1111[key[: -len(suffix)]], scheduler
    raise ValueError(
        f"unknown sampler {name!r}; AUTOMATIC1111 names: {', '.join(A1111_SAMPLERS.values())}; "
        f"ComfyUI names: {', '.join(A1111_SAMPLERS)}"
    )


def scheduler_from_a1111(name: str) -> str:
    key = name.strip().lower()
    if key in _SCHEDULER_FROM_A1111:
        return _SCHEDULER_FROM_A1111[key]
    if key in A1111_SCHEDULERS:
        return key
    raise ValueError(
        f"unknown schedule type {name!r}; choose one of: {', '.join(A1111_SCHEDULERS.values())}"
    )


def _quote(value: Any) -> str:
    text = str(value)
    if any(c in text for c in ',:\n"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def lora_hashes_text(hashes: Mapping[str, str] | None) -> str:
    """A1111's ``Lora hashes`` value: ``"name: hash, name2: hash2"`` (empty for none)."""
    return ", ".join(f"{name}: {h}" for name, h in (hashes or {}).items())


def extra_parameters(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A1111's ``extra_generation_params`` of these settings: ``NGMS`` (with ``NGMS all
    steps``), the SD upscale script's overlap and upscaler, and ``Lora hashes`` (only those
    that apply)."""
    out: dict[str, Any] = {}
    if settings.get("uncond_min_sigma"):
        out["NGMS"] = settings["uncond_min_sigma"]
        if settings.get("uncond_min_sigma_all_steps"):
            out["NGMS all steps"] = True
    upscale = settings.get("sd_upscale")
    if upscale:
        out["SD upscale overlap"] = upscale.get("overlap")
        out["SD upscale upscaler"] = upscaler_label(upscale.get("upscaler", ""))
    hashes = lora_hashes_text(settings.get("lora_hashes"))
    if hashes:
        out["Lora hashes"] = hashes
    return out


def format_parameters(settings: Mapping[str, Any]) -> str:
    """AUTOMATIC1111's ``parameters`` text from a settings mapping (noisecraft field names)."""
    lines = [str(settings.get("prompt", ""))]
    if settings.get("negative_prompt"):
        lines.append(f"Negative prompt: {settings['negative_prompt']}")
    fields: list[tuple[str, Any]] = [
        ("Steps", settings.get("steps")),
        ("Sampler", A1111_SAMPLERS.get(settings.get("sampler", ""), settings.get("sampler"))),
        ("Schedule type", A1111_SCHEDULERS.get(settings.get("scheduler", ""))),
        ("CFG scale", settings.get("cfg_scale")),
        ("Seed", settings.get("seed")),
        ("Size", f"{settings['width']}x{settings['height']}" if "width" in settings else None),
        ("Model hash", settings.get("model_hash")),
        ("Model", settings.get("model_name")),
        ("Denoising strength", settings.get("strength") if settings.get("init_image") else None),
        ("Clip skip", settings.get("clip_skip") if settings.get("clip_skip", 1) != 1 else None),
        *extra_parameters(settings).items(),
        ("Version", f"noisecraft {settings['version']}" if settings.get("version") else None),
    ]
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields if v not in (None, "")))
    return "\n".join(lines)


_PARAM = re.compile(r'\s*(\w[\w \-/+]*):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text: str) -> dict[str, Any]:
    """Parse A1111 ``parameters`` text into noisecraft settings (unknown keys kept verbatim)."""
    lines = text.strip().split("\n")
    params: dict[str, str] = {}
    if lines and len(_PARAM.findall(lines[-1])) >= 3:
        for key, value in _PARAM.findall(lines.pop()):
            if value.startswith('"'):
                value = json.loads(value)
            params[key.strip()] = value.strip()
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    if "Steps" in params:
        out["steps"] = int(params.pop("Steps"))
    if "Sampler" in params:
        out["sampler"], scheduler = sampler_from_a1111(params.pop("Sampler"))
        if scheduler:
            out["scheduler"] = scheduler
    if "Schedule type" in params:
        out["scheduler"] = scheduler_from_a1111(params.pop("Schedule type"))
    if "CFG scale" in params:
        out["cfg_scale"] = float(params.pop("CFG scale"))
    if "Seed" in params:
        out["seed"] = int(params.pop("Seed"))
    if "Size" in params:
        w, h = params.pop("Size").lower().split("x")
        out["width"], out["height"] = int(w), int(h)
    if "Denoising strength" in params:
        out["strength"] = float(params.pop("Denoising strength"))
    if "Clip skip" in params:
        out["clip_skip"] = int(params.pop("Clip skip"))
    if "Model" in params:
        out["model_name"] = params.pop("Model")
    if "Model hash" in params:
        out["model_hash"] = params.pop("Model hash")
    if "NGMS" in params:
        out["uncond_min_sigma"] = float(params.pop("NGMS"))
    if "NGMS all steps" in params:
        out["uncond_min_sigma_all_steps"] = params.pop("NGMS all steps").lower() == "true"
    out["extra"] = params
    return out


def png_info(
    settings: Mapping[str, Any] | None, extra_text: Mapping[str, str] | None = None
) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    if settings:
        info.add_itxt(PARAMETERS_KEY, format_parameters(settings))
        info.add_itxt(SETTINGS_KEY, json.dumps(dict(settings), sort_keys=True))
    for key, value in (extra_text or {}).items():
        info.add_itxt(key, value)
    return info


def save_png(
    image: Image.Image,
    path: str | os.PathLike,
    settings: Mapping[str, Any] | None,
    *,
    extra_text: Mapping[str, str] | None = None,
):
    """Write a PNG atomically (temporary file in the same folder, then rename).

    An interrupted run never leaves a half-written image under ``path``.  ``extra_text`` adds
    further text chunks (e.g. ComfyUI's ``prompt`` and ``workflow`` JSON).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file (it carries the settings), got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".png.part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(settings, extra_text))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """Settings stored in an image: noisecraft's JSON if present, else parsed A1111 text."""
    try:
        with Image.open(path) as im:
            text = dict(im.text) if hasattr(im, "text") else dict(im.info)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
    if SETTINGS_KEY in text:
        return json.loads(text[SETTINGS_KEY])
    if PARAMETERS_KEY in text:
        return parse_parameters(text[PARAMETERS_KEY])
    raise ValueError(
        f"{path} carries no generation settings (no 'noisecraft' or 'parameters' PNG text chunk)"
    )
