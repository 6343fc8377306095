"""Routes for the browser UIs: the learning view's data, and what the ComfyUI editor needs.

* ``/api/noisecraft/schedule``, ``/api/noisecraft/forward``: the learning view's schedule
  table and forward-process frames (computed by :mod:`noisecraft.web.learn`);
  ``/api/noisecraft/default_workflow``: txt2img for a checkpoint this server has.
* The ComfyUI editor (``comfyui-frontend-package``) served unmodified at ``/editor/``.  It
  derives its API base from its own path, so it calls ``/editor/api/...``,
  ``/editor/internal/...`` and ``/editor/ws``: those serve the same API as ``/api``.
* The start-up endpoints the editor calls beyond ComfyUI's core API (users, settings,
  userdata, i18n, features, jobs, experiment/models, internal/...), with real storage on disk
  (:mod:`noisecraft.web.userdata`).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from noisecraft.graph import UnsafePathError, safe_join
from noisecraft.server import comfy, events, files
from noisecraft.server.config import MODEL_FOLDERS
from noisecraft.server.security import RequestError, decode_image, read_json
from noisecraft.web import (
    EDITOR_MISSING,
    editor_dir,
    editor_extension_dir,
    jobs,
    learn,
    static_dir,
)
from noisecraft.web.userdata import UserDataError, UserStore
from noisecraft.web.workflows import txt2img_workflow

api = APIRouter()  # served under /api and /editor/api
internal = APIRouter()  # served under /internal and /editor/internal
editor_api = APIRouter()  # only under /editor/api (the plain /api has its own answers)
EXTENSIONS = ["/extensions/noisecraft/noisecraft.js"]
EMPTY_CSS = Response(b"", media_type="text/css")


def _state(request: Request):
    return request.app.state.noisecraft


def _users(request: Request) -> UserStore:
    store = getattr(request.app.state, "noisecraft_users", None)
    if store is None:
        store = UserStore(_state(request).folders.root).create()
        request.app.state.noisecraft_users = store
    return store


async def _call(fn, *args, **kwargs):
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except UserDataError as e:
        raise RequestError(str(e), status=e.status,
                           kind="not_found" if e.status == 404 else "invalid_request") from None
    except ValueError as e:
        raise RequestError(str(e)) from None


def _flag(value: str | None) -> bool:
    return str(value).lower() in ("1", "true", "yes")


# ---- users and settings ---------------------------------------------------------------------

@api.get("/users")
async def users():
    return {"storage": "server", "migrated": True}


@api.post("/users")
async def create_user():
    return "default"  # one user, as ComfyUI without --multi-user


@api.get("/settings")
async def get_settings(request: Request):
    return await _call(_users(request).settings)


@api.post("/settings")
async def post_settings(request: Request):
    body = await read_json(request, "POST /settings body")
    await _call(_users(request).update_settings, body)
    return {}


@api.get("/settings/{setting_id}")
async def get_setting(request: Request, setting_id: str):
    return (await _call(_users(request).settings)).get(setting_id)


@api.post("/settings/{setting_id}")
async def post_setting(request: Request, setting_id: str):
    raw = await request.body()
    try:
        value = json.loads(raw) if raw.strip() else None
    except ValueError as e:
        raise RequestError(f"the value of setting {setting_id!r} is not valid JSON: {e}") from None
    await _call(_users(request).update_settings, {setting_id: value})
    return {}


# ---- userdata ---------------------------------------------------------------------------

@api.get("/userdata")
async def list_userdata(request: Request, dir: str = "", recurse: str = "",
                        full_info: str = "", split: str = ""):
    if not dir:
        raise RequestError("dir is required, e.g. /userdata?dir=workflows")
    return await _call(_users(request).list, dir, recurse=_flag(recurse),
                       full_info=_flag(full_info), split=_flag(split))


@api.get("/v2/userdata")
async def list_userdata_v2(request: Request, path: str = ""):
    return await _call(_users(request).list_v2, path)


@api.post("/userdata/{source:path}/move/{dest:path}")
async def move_userdata(request: Request, source: str, dest: str, overwrite: str = "",
                        full_info: str = ""):
    store = _users(request)
    target = await _call(store.move, source, dest, overwrite=_flag(overwrite or "true"))
    info = store.info(target)
    return info if _flag(full_info) else info["path"]


@api.get("/userdata/{name:path}")
async def get_userdata(request: Request, name: str):
    store = _users(request)
    path = await _call(store.path, name)
    if not path.is_file():
        raise RequestError(f"no userdata file {name!r}", status=404, kind="not_found")
    return FileResponse(path)


@api.post("/userdata/{name:path}")
async def post_userdata(request: Request, name: str, overwrite: str = "true",
                        full_info: str = ""):
    store = _users(request)
    path = await _call(store.write, name, await request.body(), overwrite=_flag(overwrite))
    info = store.info(path)
    return info if _flag(full_info) else info["path"]


@api.delete("/userdata/{name:path}")
async def delete_userdata(request: Request, name: str):
    await _call(_users(request).delete, name)
    return Response(status_code=204)


# ---- small start-up answers -------------------------------------------------------------

@api.get("/i18n")
async def i18n():
    return {}  # no translations beyond the editor's own


@api.get("/features")
async def features(request: Request):
    return {"supports_preview_metadata": False,
            "max_upload_size": _state(request).config.limits.max_body_bytes}


@api.get("/workflow_templates")
async def workflow_templates():
    return {}


@api.get("/global_subgraphs")
async def global_subgraphs():
    return {}


@api.get("/node_replacements")
async def node_replacements():
    return {}


@api.get("/experiment/models")
async def experiment_models(request: Request):
    folders = _state(request).folders
    return [{"name": k, "folders": [str(folders.models(k))]} for k in MODEL_FOLDERS]


@api.get("/experiment/models/{folder}")
async def experiment_models_folder(request: Request, folder: str):
    if folder not in MODEL_FOLDERS:
        raise RequestError(f"unknown model folder {folder!r}; known: {', '.join(MODEL_FOLDERS)}",
                           status=404, kind="not_found")
    names = await run_in_threadpool(_state(request).folders.model_names, folder)
    return [{"name": n, "pathIndex": 0} for n in names]


@api.get("/jobs")
async def list_jobs(request: Request, status: str | None = None, limit: int = 200,
                    offset: int = 0):
    if limit < 1 or offset < 0:
        raise RequestError("limit must be >= 1 and offset >= 0")
    wanted = await _call(jobs.parse_statuses, status)
    q = _state(request).queue
    every = await run_in_threadpool(lambda: q.running() + q.pending() + q.history(None))
    return jobs.listing(every, wanted, limit, offset)


@api.get("/jobs/{job_id}")
async def job_detail(request: Request, job_id: str):
    job = await run_in_threadpool(_state(request).queue.get, job_id)
    if job is None:
        raise RequestError(f"no job {job_id!r}", status=404, kind="not_found")
    return jobs.detail(job)


# ---- the learning view and the default workflow -----------------------------------------

@api.get("/noisecraft/schedule")
async def schedule(schedule: str = "scaled_linear", steps: int = 20, spacing: str = "normal"):
    return await _call(learn.schedule_table, schedule, steps, spacing)


@api.post("/noisecraft/forward")
async def forward(request: Request):
    body = await read_json(request, "POST /api/noisecraft/forward body")
    image = await run_in_threadpool(decode_image, body.get("image"),
                                    _state(request).config.limits, "image")
    frames, seed = body.get("frames", 21), body.get("seed", 0)
    if not isinstance(frames, int) or not isinstance(seed, int):
        raise RequestError("frames and seed must be whole numbers")
    return await _call(learn.forward_frames, image, str(body.get("schedule", "scaled_linear")),
                       frames, seed)


@api.get("/noisecraft/default_workflow")
async def default_workflow(request: Request):
    """``{"workflow": txt2img for the first checkpoint, "reason": null}``, or
    ``{"workflow": null, "reason": why not}`` (no checkpoint, or nodes this server lacks)."""
    state = _state(request)
    names = await run_in_threadpool(state.folders.model_names, "checkpoints")
    if not names:
        return {"workflow": None, "reason": "no checkpoint: put a model file in "
                f"{state.folders.models('checkpoints')}"}
    workflow = txt2img_workflow(names[0])
    missing = sorted({n["type"] for n in workflow["nodes"]} - set(state.registry))
    if missing:
        return {"workflow": None,
                "reason": f"this server has no {', '.join(missing)} node(s) for txt2img"}
    return {"workflow": workflow, "reason": None}


# ---- /internal (the editor's log panel and file pickers) -------------------------------------

@internal.get("/logs/raw")
async def logs_raw():
    return {"entries": [], "size": {"cols": 80, "rows": 24}}


@internal.get("/logs")
async def logs():
    return ""


@internal.patch("/logs/subscribe")
async def logs_subscribe():
    return None


@internal.get("/folder_paths")
async def folder_paths(request: Request):
    folders = _state(request).folders
    return {k: [[str(folders.models(k)), []]] for k in MODEL_FOLDERS}


@internal.get("/files/{directory_type}")
async def internal_files(request: Request, directory_type: str):
    folders = _state(request).folders
    if directory_type not in ("input", "output", "temp"):
        raise RequestError(f"directory_type must be input, output or temp, got "
                           f"{directory_type!r}")
    root = folders.of_type(directory_type)
    names = await run_in_threadpool(
        lambda: sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()))
    return names


@editor_api.get("/extensions")
async def editor_extensions():
    return EXTENSIONS


# ---- static pages --------------------------------------------------------------------------

pages = APIRouter()


@pages.get("/learn")
async def learn_page():
    return FileResponse(static_dir() / "learn.html")


@pages.get("/editor")
async def editor_root():
    return RedirectResponse("/editor/")


@pages.get("/editor/user.css")
async def editor_user_css():
    return EMPTY_CSS


@pages.get("/assets/images/{name:path}")
async def editor_images(name: str):
    """Icons the editor names by absolute path (its manifest, the favicon progress frames)."""
    return _file(_editor_root() / "assets" / "images", name, "editor image")


@pages.get("/assets/favicon.ico")
async def editor_favicon():
    """The icon the editor's layout sets by absolute path (``useFavicon('/assets/favicon.ico')``
    in LayoutDefault): ComfyUI serves the editor at ``/``, so it answers this from the
    editor's own assets, and so does noisecraft."""
    return _file(_editor_root() / "assets", "favicon.ico", "editor icon")


def _editor_root():
    root = editor_dir()
    if root is None:
        raise RequestError(EDITOR_MISSING, status=404, kind="editor_missing")
    return root


@pages.get("/editor/templates/{name}")
async def editor_templates(name: str):
    """The workflow-template index the editor reads (ComfyUI serves it from the
    comfyui-workflow-templates package): noisecraft ships none."""
    if name == "index_logo.json":
        return {}
    if name.startswith("index") and name.endswith(".json"):
        return []
    raise RequestError(f"no workflow template {name!r}: noisecraft ships none", status=404,
                       kind="not_found")


@pages.get("/editor/extensions/noisecraft/{name}")
async def editor_extension(name: str):
    return _file(editor_extension_dir(), name, "editor extension")


@pages.get("/editor/{path:path}")
async def editor_file(path: str):
    return _file(_editor_root(), path or "index.html", "editor file")


def _file(root, name: str, what: str) -> FileResponse:
    try:
        path = safe_join(root, name, what=what)
    except (UnsafePathError, ValueError) as e:
        raise RequestError(str(e), kind="unsafe_path") from None
    if not path.is_file():
        raise RequestError(f"no {what} {name!r}", status=404, kind="not_found")
    headers: dict[str, Any] = {}
    if name == "index.html":
        headers["Cache-Control"] = "no-cache"
    return FileResponse(path, headers=headers)


def _build() -> APIRouter:
    out = APIRouter()
    out.include_router(editor_api, prefix="/editor/api")
    for prefix in ("/api", "/editor/api"):
        out.include_router(api, prefix=prefix)
    for prefix in ("/internal", "/editor/internal"):
        out.include_router(internal, prefix=prefix)
    for module in (comfy, files):  # the editor's view of ComfyUI's core API
        out.include_router(module.router, prefix="/editor/api")
    out.include_router(events.router, prefix="/editor")  # /editor/ws
    out.include_router(pages)
    return out


router = _build()
