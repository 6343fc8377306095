"""``POST /api/generate``: settings in, a PNG out; plus the helpers the A1111 routes share.

    curl -X POST localhost:8188/api/generate -d '{"prompt": "a red circle", "seed": 1}' \\
        -o image.png

The body holds :func:`noisecraft.api.generate_image`'s settings (``prompt`` required;
``model`` is a name from ``GET /models/checkpoints``; ``init_image``/``mask`` are base64
images; ``loras`` entries and ``<lora:NAME:W>`` prompt tags name files in ``models/loras``,
as ``GET /sdapi/v1/loras`` lists them, never paths).  The answer is the PNG (with its
``parameters`` chunk) and the headers ``X-Seed`` and ``X-Prompt-Id``; with ``"response":
"json"`` it is ``{"images": [base64 PNG...], "seeds", "info", "prompt_id"}`` instead.
``"wait": false`` answers 202 ``{"prompt_id", "number"}`` as soon as the job is queued
(durably); ``"client_id"`` routes its events to that ``/ws``.
The server validates and enqueues; a worker generates.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import fields
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool

from noisecraft.graph import safe_join
from noisecraft.request import GenerationRequest, InputError
from noisecraft.server.confine import confine_request
from noisecraft.server.jobqueue import SUCCESS, Job
from noisecraft.server.security import RequestError, decode_image, read_json

router = APIRouter()

IMAGE_FIELDS = ("init_image", "mask")
SETTING_NAMES = tuple(f.name for f in fields(GenerationRequest))
DEFAULT_TIMEOUT = 3600.0


def check_model(state, model: Any) -> str | None:
    if model is None or model == "":
        return None
    if not isinstance(model, str):
        raise RequestError(f"model must be a checkpoint name string, got {type(model).__name__}")
    names = state.folders.model_names("checkpoints")
    if model not in names:
        stems = {n.rsplit(".", 1)[0]: n for n in names}
        if model in stems:
            return stems[model]
        raise RequestError(
            f"unknown model {model!r}; available checkpoints: {', '.join(names) or 'none'} "
            f"(put files in {state.folders.models('checkpoints')})", kind="unknown_model")
    return model


def build_payload(state, settings: dict[str, Any], images: dict[str, Image.Image],
                  save_type: str = "output", prefix: str = "noisecraft") -> dict[str, Any]:
    """Validate settings into a ``generate`` job payload; images are stored in the input
    folder as PNG files the worker reads back."""
    limits = state.config.limits
    settings = dict(settings)
    settings["model"] = check_model(state, settings.get("model"))
    inputs = {}
    for name, image in images.items():
        rel = f"api/{uuid.uuid4().hex}_{name}.png"
        path = safe_join(state.folders.input, rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, format="PNG")
        inputs[name] = rel
        settings[name] = str(path)
    try:
        request = GenerationRequest.from_settings(settings)
        confine_request(request, state.folders)  # the worker does it again
    except (InputError, TypeError, ValueError) as e:
        raise RequestError(str(e), kind="invalid_settings") from None
    if request.steps > limits.max_steps:
        raise RequestError(f"steps={request.steps} exceeds this server's limit of "
                           f"{limits.max_steps}")
    if request.batch_size > limits.max_batch:
        raise RequestError(f"batch_size={request.batch_size} exceeds this server's limit of "
                           f"{limits.max_batch}")
    w, h = request.width or 0, request.height or 0
    scale = max(1.0, request.hires_scale) ** 2
    if w * h * scale > limits.max_image_pixels:
        raise RequestError(f"{w}x{h} (hires x{request.hires_scale}) exceeds this server's limit "
                           f"of {limits.max_image_pixels} pixels per image")
    out = request.settings()
    for name in inputs:
        out[name] = None
    return {"settings": out, "inputs": inputs, "save": {"type": save_type, "prefix": prefix}}


async def enqueue(state, payload: dict[str, Any], client_id: str | None = None) -> Job:
    if await run_in_threadpool(state.queue.count_pending) >= state.config.limits.max_queue:
        raise RequestError("the queue is full; try again later", status=503, kind="queue_full")
    job = await run_in_threadpool(lambda: state.queue.enqueue("generate", payload,
                                                              client_id=client_id))
    await state.hub.broadcast_status()
    return job


async def run_job(state, payload: dict[str, Any], client_id: str | None = None,
                  timeout: float = DEFAULT_TIMEOUT) -> Job:
    """Enqueue a generate job and wait for it; raises a 4xx/5xx RequestError on failure."""
    job = await enqueue(state, payload, client_id)
    done = await state.hub.wait_job(job.id, timeout)
    if done is None:
        raise RequestError(f"job {job.id} did not finish within {timeout:.0f} s; it stays "
                           "queued (see GET /history/{id})", status=504, kind="timeout")
    if done.status != SUCCESS:
        error = (done.result or {}).get("error") or {}
        message = error.get("message", f"job {done.status}")
        if done.status == "cancelled":
            raise RequestError(f"job {job.id} was cancelled", status=409, kind="cancelled")
        if done.status == "interrupted":
            raise RequestError(f"job {job.id} was interrupted: {message}", status=409,
                               kind="interrupted")
        raise RequestError(message, status=400 if error.get("user_error") else 500,
                           kind=str(error.get("type", "generation_failed")))
    return done


def output_images(state, job: Job) -> list[bytes]:
    images = []
    for ui in (job.result or {}).get("outputs", {}).values():
        for img in ui.get("images", []):
            folder = state.folders.of_type(img.get("type", "output"))
            images.append(safe_join(folder, img["filename"]).read_bytes())
    return images


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@router.post("/generate")
async def api_generate(request: Request):
    state = request.app.state.noisecraft
    body = await read_json(request, "POST /api/generate body")
    response_kind = body.pop("response", "png")
    timeout = body.pop("timeout", DEFAULT_TIMEOUT)
    wait = body.pop("wait", True)
    client_id = body.pop("client_id", None)
    if not isinstance(wait, bool):
        raise RequestError("wait must be true (answer with the image) or false (answer 202 "
                           "with the prompt_id at once; poll GET /history/{prompt_id})")
    if client_id is not None and not isinstance(client_id, str):
        raise RequestError("client_id must be a string (the clientId of your /ws socket)")
    if response_kind not in ("png", "json"):
        raise RequestError(f'response must be "png" or "json", got {response_kind!r}')
    if not isinstance(timeout, int | float) or timeout <= 0:
        raise RequestError("timeout must be a positive number of seconds")
    if not isinstance(body.get("prompt"), str):
        raise RequestError('the body needs "prompt": a string, e.g. {"prompt": "a red circle"}')
    unknown = sorted(set(body) - set(SETTING_NAMES))
    if unknown:
        raise RequestError(f"unknown setting(s) {', '.join(unknown)}; known: "
                           f"{', '.join(SETTING_NAMES)}, response, timeout, wait, client_id")
    images = {}
    for name in IMAGE_FIELDS:
        if body.get(name) is not None:
            images[name] = await run_in_threadpool(decode_image, body.pop(name),
                                                   state.config.limits, name)
        body.pop(name, None)
    payload = await run_in_threadpool(build_payload, state, body, images)
    if not wait:
        job = await enqueue(state, payload, client_id)
        return JSONResponse({"prompt_id": job.id, "number": job.number}, status_code=202)
    job = await run_job(state, payload, client_id, timeout=float(timeout))
    pngs = await run_in_threadpool(output_images, state, job)
    seeds = job.result.get("seeds", [])
    if response_kind == "json":
        return {"images": [b64(p) for p in pngs], "seeds": seeds,
                "info": job.result.get("info", []), "prompt_id": job.id}
    return Response(pngs[0], media_type="image/png",
                    headers={"X-Seed": str(seeds[0]) if seeds else "", "X-Prompt-Id": job.id})
