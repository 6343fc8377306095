"""AUTOMATIC1111's web API (``/sdapi/v1/``), as the published clients (``webuiapi``) call it.

txt2img and img2img are synchronous, as in A1111: the route builds a
:class:`~noisecraft.request.GenerationRequest` (A1111 names -> noisecraft's via
:mod:`noisecraft.metadata`), enqueues it, waits for a worker to finish it and answers with
base64 PNGs that carry the ``parameters`` chunk.  Fields noisecraft does not implement
(``restore_faces``, ``tiling``, ...) are accepted and ignored; wrong types and values are
refused with a 4xx saying which field.  Of the selectable scripts (``script_name``), img2img
has "SD upscale" (:mod:`noisecraft.server.a1111_scripts`); another name is a 422, as A1111
answers for a script it does not have.
The ControlNet extension's ``alwayson_scripts.controlnet.args`` units are run
(:func:`_controlnets`).  ``<lora:NAME:WEIGHT>`` tags in the prompt and negative prompt apply
the LoRA ``NAME`` from ``models/loras`` (the names ``GET /loras`` lists), as A1111's built-in
Lora extension does; the tags stay in the answer's prompt and infotext, with ``Lora hashes``.
The options ``s_min_uncond`` / ``s_min_uncond_all`` (NGMS, set by ``POST /options`` or a
request's ``override_settings``) skip the negative-prompt pass at low sigma (:func:`_ngms`).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from noisecraft import __version__
from noisecraft.graph import safe_join
from noisecraft.metadata import (
    A1111_SAMPLERS,
    A1111_SCHEDULERS,
    PARAMETERS_KEY,
    extra_parameters,
    format_parameters,
    parse_parameters,
    sampler_from_a1111,
    scheduler_from_a1111,
)
from noisecraft.models_folder import ModelFolderError, ModelFolders
from noisecraft.request import CONTROL_PREPROCESSORS
from noisecraft.server.a1111_scripts import (
    IMG2IMG_SCRIPTS,
    SD_UPSCALE,
    sd_upscale_spec,
    selected_script,
    upscalers,
)
from noisecraft.server.generate import b64, build_payload, check_model, output_images, run_job
from noisecraft.server.inpaint_area import FILLS
from noisecraft.server.security import RequestError, decode_image, read_json

router = APIRouter()

DEFAULT_OPTIONS = {"sd_model_checkpoint": None, "CLIP_stop_at_last_layers": 1,
                   "samples_format": "png", "eta_noise_seed_delta": 0, "sd_vae": "Automatic",
                   "s_min_uncond": 0.0, "s_min_uncond_all": False}


def _get(body: dict, name: str, kind: type | tuple, default: Any = None) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise RequestError(f"{name} must be {names}, got {type(value).__name__} {value!r:.40}",
                           status=422)
    return value


def _sampler(body: dict) -> tuple[str, str]:
    name = _get(body, "sampler_name", str) or _get(body, "sampler_index", str) or "Euler"
    try:
        sampler, scheduler = sampler_from_a1111(name)
        explicit = _get(body, "scheduler", str)
        if explicit:
            scheduler = scheduler_from_a1111(explicit)
    except ValueError as e:
        raise RequestError(str(e), status=422) from None
    return sampler, scheduler or "normal"


async def _settings(state, body: dict, overrides: dict) -> dict[str, Any]:
    """A1111 txt2img/img2img fields -> noisecraft settings (shared part)."""
    options = {**DEFAULT_OPTIONS, **await run_in_threadpool(state.queue.options), **overrides}
    sampler, scheduler = _sampler(body)
    seed = _get(body, "seed", int, -1)
    batch = _get(body, "batch_size", int, 1) * _get(body, "n_iter", int, 1)
    clip_skip = options.get("CLIP_stop_at_last_layers")
    return {
        "prompt": _get(body, "prompt", str, ""),
        "negative_prompt": _get(body, "negative_prompt", str, ""),
        "steps": _get(body, "steps", int, 20),
        "cfg_scale": _get(body, "cfg_scale", float, 7.0),
        "seed": None if seed < 0 else seed,
        "sampler": sampler,
        "scheduler": scheduler,
        "width": _get(body, "width", int, 512),
        "height": _get(body, "height", int, 512),
        "batch_size": batch,
        "clip_skip": clip_skip if isinstance(clip_skip, int) and clip_skip > 1 else None,
        "model": _model_name(options.get("sd_model_checkpoint")),
        "eta": _get(body, "eta", float) if sampler in ("ddim", "euler_ancestral") else None,
        "controlnets": await run_in_threadpool(_controlnets, state, body),
        **_ngms(options, "override_settings"),
    }


def _ngms(options: dict, where: str) -> dict[str, Any]:
    """A1111's options ``s_min_uncond`` (NGMS, "Negative Guidance minimum sigma") and
    ``s_min_uncond_all`` (skip on every step, not every other) -> the request's
    ``uncond_min_sigma`` and ``uncond_min_sigma_all_steps``."""
    value = options.get("s_min_uncond")
    value = 0.0 if value is None else value
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise RequestError(f"{where}.s_min_uncond (NGMS, Negative Guidance minimum sigma) must "
                           f"be a number >= 0 (0 = off), got {value!r:.40}", status=422)
    every = options.get("s_min_uncond_all")
    every = False if every is None else every
    if not isinstance(every, bool):
        raise RequestError(f"{where}.s_min_uncond_all must be true or false, got "
                           f"{every!r:.40}", status=422)
    return {"uncond_min_sigma": float(value), "uncond_min_sigma_all_steps": every}


def _controlnet_unit(state, unit: Any, where: str) -> dict[str, Any] | None:
    """One ControlNet extension unit -> a noisecraft ControlNet setting (None if disabled)."""
    if not isinstance(unit, dict):
        raise RequestError(f"{where} must be an object", status=422)
    if not _get(unit, "enabled", (bool, int), True):
        return None
    module = _get(unit, "module", str, "none").lower()
    if module not in CONTROL_PREPROCESSORS:
        raise RequestError(f"{where}.module {module!r} is not available; noisecraft has: "
                           f"{', '.join(CONTROL_PREPROCESSORS)} (send a ready control map "
                           "with module none)", status=422)
    data = unit.get("image") or unit.get("input_image")
    if isinstance(data, dict):  # the extension's {"image": ..., "mask": ...}
        data = data.get("image")
    if not isinstance(data, str):
        raise RequestError(f"{where}.image must be a base64 image", status=422)
    image = decode_image(data, state.config.limits, f"{where}.image")
    path = safe_join(state.folders.input, f"api/{uuid.uuid4().hex}_controlnet.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG")
    name = _model_name(_get(unit, "model", str, ""))
    folders = ModelFolders.at(state.folders.root / "models")
    names = folders.names("controlnet")
    name = name if name in names else {n.rsplit(".", 1)[0]: n for n in names}.get(name, name)
    try:
        model = folders.resolve("controlnet", name or "")
    except ModelFolderError:
        raise RequestError(f"{where}.model: unknown ControlNet {name!r}; available: "
                           f"{', '.join(names) or 'none'} (put files in "
                           f"{state.folders.root / 'models' / 'controlnet'})",
                           status=422) from None
    return {"model": str(model), "image": str(path),
            "strength": _get(unit, "weight", float, 1.0),
            "start_percent": _get(unit, "guidance_start", float, 0.0),
            "end_percent": _get(unit, "guidance_end", float, 1.0), "preprocessor": module}


def _controlnets(state, body: dict) -> list[dict[str, Any]]:
    """``alwayson_scripts: {"controlnet": {"args": [{"image", "module", "model", "weight",
    "guidance_start", "guidance_end", "enabled"}]}}`` (the sd-webui-controlnet extension's
    API) -> the request's ``controlnets``; images go to the input folder.  Modules: ``none``
    (the image is the control map) and ``canny`` (ComfyUI's thresholds)."""
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, dict):
        raise RequestError("alwayson_scripts must be an object", status=422)
    script = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None)
    if script is None:
        return []
    args = script.get("args") if isinstance(script, dict) else None
    if not isinstance(args, list):
        raise RequestError("alwayson_scripts.controlnet.args must be a list of units",
                           status=422)
    units = [_controlnet_unit(state, u, f"alwayson_scripts.controlnet.args[{i}]")
             for i, u in enumerate(args)]
    return [u for u in units if u is not None]


def _model_name(title: Any) -> str | None:
    """``"name.safetensors [hash]"`` (A1111's title) -> ``"name.safetensors"``."""
    if not isinstance(title, str) or not title:
        return None
    return title.split(" [", 1)[0]


def _overrides(body: dict) -> dict:
    value = body.get("override_settings") or {}
    if not isinstance(value, dict):
        raise RequestError("override_settings must be an object", status=422)
    return value


async def _answer(state, body: dict, payload: dict) -> dict[str, Any]:
    job = await run_job(state, payload)
    pngs = await run_in_threadpool(output_images, state, job)
    infos = job.result.get("info", [])
    texts = [format_parameters(i) for i in infos]
    first = infos[0] if infos else {}
    info = {
        "prompt": first.get("prompt", ""), "all_prompts": [i.get("prompt") for i in infos],
        "negative_prompt": first.get("negative_prompt", ""),
        "all_negative_prompts": [i.get("negative_prompt") for i in infos],
        "seed": first.get("seed"), "all_seeds": job.result.get("seeds", []),
        "subseed": -1, "all_subseeds": [-1] * len(infos), "subseed_strength": 0,
        "width": first.get("width"), "height": first.get("height"),
        "sampler_name": A1111_SAMPLERS.get(first.get("sampler", ""), first.get("sampler")),
        "cfg_scale": first.get("cfg_scale"), "steps": first.get("steps"),
        "batch_size": len(infos), "restore_faces": False, "face_restoration_model": None,
        "sd_model_name": first.get("model_name"), "sd_model_hash": first.get("model_hash"),
        "seed_resize_from_w": -1, "seed_resize_from_h": -1,
        "denoising_strength": body.get("denoising_strength"),
        "extra_generation_params": extra_parameters(first), "index_of_first_image": 0,
        "infotexts": texts,
        "styles": [], "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": 1,
        "is_using_inpainting_conditioning": False, "version": f"noisecraft {__version__}",
        "prompt_id": job.id,
    }
    images = [b64(p) for p in pngs] if body.get("send_images", True) else []
    return {"images": images, "parameters": body, "info": json.dumps(info)}


@router.post("/txt2img")
async def txt2img(request: Request):
    state = request.app.state.noisecraft
    body = await read_json(request, "txt2img body")
    selected_script(body, ())  # txt2img has no selectable scripts here
    settings = await _settings(state, body, _overrides(body))
    if _get(body, "enable_hr", bool, False):
        scale = _get(body, "hr_scale", float, 2.0)
        upscaler = _get(body, "hr_upscaler", str, "Latent")
        settings.update(
            hires_scale=scale,
            hires_upscale="latent" if upscaler.lower().startswith("latent") else "image",
            hires_steps=_get(body, "hr_second_pass_steps", int, 0) or None,
            hires_strength=_get(body, "denoising_strength", float, 0.7),
        )
    kind = "output" if _get(body, "save_images", bool, False) else "temp"
    payload = await run_in_threadpool(build_payload, state, settings, {}, kind, "txt2img")
    return await _answer(state, body, payload)


@router.post("/img2img")
async def img2img(request: Request):
    state = request.app.state.noisecraft
    limits = state.config.limits
    body = await read_json(request, "img2img body")
    init_images = body.get("init_images")
    if not isinstance(init_images, list) or not init_images:
        raise RequestError("init_images must be a list with at least one base64 image",
                           status=422)
    script = selected_script(body, IMG2IMG_SCRIPTS)
    settings = await _settings(state, body, _overrides(body))
    settings["strength"] = _get(body, "denoising_strength", float, 0.75)
    settings["mask_blur"] = _get(body, "mask_blur", int, 4)
    images = {"init_image": await run_in_threadpool(decode_image, init_images[0], limits,
                                                    "init_images[0]")}
    payload_extra = {}
    if body.get("mask") is not None:
        images["mask"] = await run_in_threadpool(decode_image, body["mask"], limits, "mask")
        fill = _get(body, "inpainting_fill", int, 1)
        if fill not in FILLS:
            raise RequestError(f"inpainting_fill must be one of {sorted(FILLS)} "
                               f"({', '.join(FILLS.values())}), got {fill}", status=422)
        padding = _get(body, "inpaint_full_res_padding", int, 0)
        if padding < 0:
            raise RequestError("inpaint_full_res_padding must be >= 0", status=422)
        payload_extra["inpaint"] = {
            "fill": fill, "padding": padding,
            "full_res": bool(_get(body, "inpaint_full_res", (bool, int), False)),
            "invert": bool(_get(body, "inpainting_mask_invert", (bool, int), 0)),
        }
    if script == SD_UPSCALE:
        payload_extra["sd_upscale"] = await run_in_threadpool(
            _sd_upscale, state, body, settings, images)
    kind = "output" if _get(body, "save_images", bool, False) else "temp"
    payload = await run_in_threadpool(build_payload, state, settings, images, kind, "img2img")
    payload.update(payload_extra)
    return await _answer(state, body, payload)


def _sd_upscale(state, body: dict, settings: dict, images: dict) -> dict[str, Any]:
    """The SD upscale script's job entry; its requests are one image, unmasked."""
    if "mask" in images:
        raise RequestError(f"{SD_UPSCALE} takes no mask (it re-details the whole image)",
                           status=422)
    if _get(body, "n_iter", int, 1) != 1:
        raise RequestError(f"{SD_UPSCALE} makes one image per request here; send n_iter 1",
                           status=422)
    settings["batch_size"] = 1  # A1111's batch_size only groups the tiles
    return sd_upscale_spec(state.folders.root, body.get("script_args"), images["init_image"],
                           (settings["width"], settings["height"]),
                           state.config.limits.max_image_pixels)


@router.get("/options")
async def get_options(request: Request):
    state = request.app.state.noisecraft
    options = {**DEFAULT_OPTIONS, **await run_in_threadpool(state.queue.options)}
    if options["sd_model_checkpoint"] is None:
        names = await run_in_threadpool(state.folders.model_names, "checkpoints")
        options["sd_model_checkpoint"] = names[0] if names else None
    return options


@router.post("/options")
async def set_options(request: Request):
    state = request.app.state.noisecraft
    body = await read_json(request, "options body")
    if "sd_model_checkpoint" in body:
        body["sd_model_checkpoint"] = await run_in_threadpool(
            check_model, state, _model_name(body["sd_model_checkpoint"]))
    if "CLIP_stop_at_last_layers" in body:
        value = body["CLIP_stop_at_last_layers"]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 12:
            raise RequestError("CLIP_stop_at_last_layers must be a whole number in [1, 12]",
                               status=422)
    _ngms(body, "options")
    await run_in_threadpool(state.queue.set_options, body)
    return None


@router.get("/sd-models")
async def sd_models(request: Request):
    folders = request.app.state.noisecraft.folders
    names = await run_in_threadpool(folders.model_names, "checkpoints")
    return [{"title": n, "model_name": n.rsplit(".", 1)[0], "hash": None, "sha256": None,
             "filename": f"models/checkpoints/{n}", "config": None} for n in names]


@router.post("/refresh-checkpoints")
async def refresh_checkpoints():
    return None  # the folder is read on every request


@router.get("/samplers")
async def samplers():
    from noisecraft.samplers import sampler_names

    known = set(sampler_names())
    return [{"name": a, "aliases": [c], "options": {}} for c, a in A1111_SAMPLERS.items()
            if c in known]


@router.get("/schedulers")
async def schedulers():
    return [{"name": c, "label": a, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for c, a in A1111_SCHEDULERS.items()]


@router.get("/loras")
async def loras(request: Request):
    folders = request.app.state.noisecraft.folders
    names = await run_in_threadpool(folders.model_names, "loras")
    return [{"name": n.rsplit(".", 1)[0], "alias": n.rsplit(".", 1)[0],
             "path": f"models/loras/{n}", "metadata": {}} for n in names]


@router.get("/scripts")
async def scripts():
    return {"txt2img": [], "img2img": [name.lower() for name in IMG2IMG_SCRIPTS]}


@router.get("/upscalers")
async def get_upscalers(request: Request):
    root = request.app.state.noisecraft.folders.root
    entries = await run_in_threadpool(upscalers, root)
    return [{k: v for k, v in e.items() if k != "value"} for e in entries]


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False):
    state = request.app.state.noisecraft
    running = await run_in_threadpool(state.queue.running)
    pending = await run_in_threadpool(state.queue.count_pending)
    job = running[0] if running else None
    step = state.hub.progress.get(job.id, {}) if job else {}
    value, total = int(step.get("value", 0)), int(step.get("max", 0))
    image = None
    if job is not None and not skip_current_image:
        event = await run_in_threadpool(state.queue.latest_event, job.id, "preview")
        image = b64(event.blob) if event and event.blob else None
    return {
        "progress": value / total if total else 0.0,
        "eta_relative": 0.0,
        "state": {"skipped": False, "interrupted": False, "job": job.id if job else "",
                  "job_count": len(running) + pending, "job_timestamp": "",
                  "job_no": 0, "sampling_step": value, "sampling_steps": total},
        "current_image": image,
        "textinfo": None,
    }


@router.post("/interrupt")
async def interrupt(request: Request):
    await run_in_threadpool(request.app.state.noisecraft.queue.interrupt, None)
    return None


@router.post("/skip")
async def skip(request: Request):
    await run_in_threadpool(request.app.state.noisecraft.queue.interrupt, None)
    return None


@router.post("/png-info")
async def png_info(request: Request):
    state = request.app.state.noisecraft
    body = await read_json(request, "png-info body")
    image = await run_in_threadpool(decode_image, body.get("image"), state.config.limits,
                                    "image")
    items = {k: v for k, v in getattr(image, "text", image.info).items() if isinstance(v, str)}
    text = items.pop(PARAMETERS_KEY, "")
    parsed = {}
    if text:
        try:
            parsed = parse_parameters(text)
        except ValueError:
            parsed = {}
    return {"info": text, "items": items, "parameters": parsed}
