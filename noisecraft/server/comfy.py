"""ComfyUI's HTTP API (mounted at ``/`` and again under ``/api/``).

``POST /prompt`` validates the workflow here (cheap: no model is touched) and enqueues it;
a worker runs it.  Bodies and answers have ComfyUI's shapes, so ComfyUI clients work as is.
"""

from __future__ import annotations

import os
import platform
import sys
import time
from typing import Any

import torch
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from noisecraft import __version__
from noisecraft.graph import ExecutionContext, validate_prompt
from noisecraft.server.config import MODEL_FOLDERS
from noisecraft.server.jobqueue import ERROR, INTERRUPTED, SUCCESS, Job
from noisecraft.server.security import RequestError, read_json

router = APIRouter()


def validation_context(state) -> ExecutionContext:
    f = state.folders
    return ExecutionContext(input_dir=f.input, output_dir=f.output, temp_dir=f.temp,
                            resources={"folders": f})


def queue_item(job: Job) -> list[Any]:
    """ComfyUI's queue/history tuple: [number, prompt_id, prompt, extra_data, outputs]."""
    if job.kind == "workflow":
        p = job.payload
        return [job.number, job.id, p.get("prompt", {}), p.get("extra_data", {}),
                p.get("outputs", [])]
    return [job.number, job.id, {"noisecraft_generate": job.payload.get("settings", {})},
            {"client_id": job.client_id} if job.client_id else {}, []]


def history_entry(job: Job) -> dict[str, Any]:
    result = job.result or {}
    status = {SUCCESS: "success", ERROR: "error", INTERRUPTED: "error"}.get(job.status, "error")
    start_ms = int((job.started or job.created) * 1000)
    end_ms = int((job.finished or time.time()) * 1000)
    messages: list[list[Any]] = [["execution_start", {"prompt_id": job.id,
                                                      "timestamp": start_ms}]]
    if job.status == SUCCESS:
        messages.append(["execution_success", {"prompt_id": job.id, "timestamp": end_ms}])
    else:
        kind = "execution_interrupted" if job.status == INTERRUPTED else "execution_error"
        messages.append([kind, {"prompt_id": job.id, "timestamp": end_ms,
                                **(result.get("error") or {})}])
    return {
        "prompt": queue_item(job),
        "outputs": result.get("outputs", {}),
        "status": {"status_str": status, "completed": job.status == SUCCESS,
                   "messages": messages},
        "meta": {},
    }


@router.get("/prompt")
async def prompt_status(request: Request):
    hub = request.app.state.noisecraft.hub
    return (await hub.status_message())["data"]["status"]


@router.post("/prompt")
async def post_prompt(request: Request):
    state = request.app.state.noisecraft
    body = await read_json(request, "POST /prompt body")
    prompt = body.get("prompt")
    if not isinstance(prompt, dict) or not prompt:
        raise RequestError('the body needs "prompt": an API-format workflow object like '
                           '{"3": {"class_type": "KSampler", "inputs": {...}}}', kind="no_prompt")
    client_id = body.get("client_id")
    if client_id is not None and not isinstance(client_id, str):
        raise RequestError(f"client_id must be a string, got {type(client_id).__name__}")
    extra = body.get("extra_data") or {}
    if not isinstance(extra, dict):
        raise RequestError(f"extra_data must be an object, got {type(extra).__name__}")
    prompt_id = body.get("prompt_id")
    if prompt_id is not None and (not isinstance(prompt_id, str) or not 0 < len(prompt_id) < 100):
        raise RequestError("prompt_id must be a non-empty string of under 100 characters")
    checked = await run_in_threadpool(validate_prompt, prompt, state.registry,
                                      validation_context(state))
    if not checked.ok:
        return _json(checked.as_response(), 400)
    if await run_in_threadpool(state.queue.count_pending) >= state.config.limits.max_queue:
        raise RequestError("the queue is full; try again when some jobs have finished",
                           status=503, kind="queue_full")
    if prompt_id is not None and await run_in_threadpool(state.queue.get, prompt_id):
        raise RequestError(f"prompt_id {prompt_id!r} is already used", status=409)
    payload = {"prompt": checked.prompt, "extra_data": extra, "outputs": checked.outputs}
    job = await run_in_threadpool(lambda: state.queue.enqueue(
        "workflow", payload, client_id=client_id, front=bool(body.get("front")),
        job_id=prompt_id))
    await state.hub.broadcast_status()
    return {"prompt_id": job.id, "number": job.number, "node_errors": {}}


def _json(body: dict, status: int):
    from fastapi.responses import JSONResponse

    return JSONResponse(body, status_code=status)


def _id_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"{what} must be a list of prompt id strings")
    return value


@router.get("/queue")
async def get_queue(request: Request):
    q = request.app.state.noisecraft.queue
    running, pending = await run_in_threadpool(lambda: (q.running(), q.pending()))
    return {"queue_running": [queue_item(j) for j in running],
            "queue_pending": [queue_item(j) for j in pending]}


@router.post("/queue")
async def post_queue(request: Request):
    state = request.app.state.noisecraft
    body = await read_json(request, "POST /queue body")
    if body.get("clear"):
        await run_in_threadpool(state.queue.cancel, None)
    if "delete" in body:
        ids = _id_list(body["delete"], "delete")
        await run_in_threadpool(state.queue.cancel, ids)
    if "front" in body:  # noisecraft extension: {"front": "<prompt_id>"} moves it first
        if not isinstance(body["front"], str):
            raise RequestError("front must be a prompt id string")
        if not await run_in_threadpool(state.queue.move_to_front, body["front"]):
            raise RequestError(f"prompt {body['front']!r} is not pending", status=404)
    await state.hub.broadcast_status()
    return {}


@router.post("/interrupt")
async def interrupt(request: Request):
    state = request.app.state.noisecraft
    raw = await request.body()
    prompt_id = None
    if raw.strip():
        body = await read_json(request, "POST /interrupt body")
        prompt_id = body.get("prompt_id")
        if prompt_id is not None and not isinstance(prompt_id, str):
            raise RequestError("prompt_id must be a string")
    await run_in_threadpool(state.queue.interrupt, prompt_id)
    return {}


@router.get("/history")
async def get_history(request: Request, max_items: int | None = None):
    q = request.app.state.noisecraft.queue
    if max_items is not None and max_items < 0:
        raise RequestError("max_items must be >= 0")
    jobs = await run_in_threadpool(q.history, max_items)
    return {j.id: history_entry(j) for j in jobs}


@router.get("/history/{prompt_id}")
async def get_history_item(request: Request, prompt_id: str):
    q = request.app.state.noisecraft.queue
    jobs = await run_in_threadpool(q.history, None, prompt_id)
    return {j.id: history_entry(j) for j in jobs}


@router.post("/history")
async def post_history(request: Request):
    q = request.app.state.noisecraft.queue
    body = await read_json(request, "POST /history body")
    if body.get("clear"):
        await run_in_threadpool(q.delete_history, None)
    if "delete" in body:
        await run_in_threadpool(q.delete_history, _id_list(body["delete"], "delete"))
    return {}


@router.get("/object_info")
async def object_info(request: Request):
    state = request.app.state.noisecraft
    return await run_in_threadpool(state.registry.object_info, validation_context(state))


@router.get("/object_info/{node_class}")
async def object_info_node(request: Request, node_class: str):
    state = request.app.state.noisecraft
    if node_class not in state.registry:
        raise RequestError(f"no node class {node_class!r}", status=404, kind="not_found")
    return await run_in_threadpool(state.registry.object_info, validation_context(state),
                                   node_class)


@router.get("/system_stats")
async def system_stats():
    try:
        ram_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        ram_free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram_total = ram_free = 0
    return {
        "system": {"os": os.name, "platform": platform.platform(), "ram_total": ram_total,
                   "ram_free": ram_free, "comfyui_version": f"noisecraft {__version__}",
                   "python_version": sys.version, "pytorch_version": torch.__version__,
                   "embedded_python": False, "argv": []},
        "devices": [{"name": "cpu", "type": "cpu", "index": None, "vram_total": 0,
                     "vram_free": 0, "torch_vram_total": 0, "torch_vram_free": 0}],
    }


@router.get("/embeddings")
async def embeddings(request: Request):
    folders = request.app.state.noisecraft.folders
    names = await run_in_threadpool(folders.model_names, "embeddings")
    return [n.rsplit(".", 1)[0] for n in names]


@router.get("/models")
async def model_folders():
    return list(MODEL_FOLDERS)


@router.get("/models/{folder}")
async def models(request: Request, folder: str):
    if folder not in MODEL_FOLDERS:
        raise RequestError(f"unknown model folder {folder!r}; known: {', '.join(MODEL_FOLDERS)}",
                           status=404, kind="not_found")
    folders = request.app.state.noisecraft.folders
    return await run_in_threadpool(folders.model_names, folder)


@router.get("/extensions")
async def extensions():
    return []
