"""``create_app(config)``: the FastAPI app, and ``serve(config)``: it under uvicorn.

Routes: ComfyUI's API at ``/`` and under ``/api/`` (:mod:`.comfy`, :mod:`.files`, the ``/ws``
websocket of :mod:`.events`), AUTOMATIC1111's at ``/sdapi/v1/`` (:mod:`.a1111`) and
``POST /api/generate`` (:mod:`.generate`), the web UI's routes and the ComfyUI editor at
``/editor/`` (:mod:`.web_routes`).  The web UI's static files (``config.web_dir``, by default
:func:`noisecraft.web.static_dir`) are mounted at ``/`` after every API route.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.concurrency import run_in_threadpool

from noisecraft import __version__
from noisecraft.graph import NodeRegistry
from noisecraft.server import a1111, comfy, events, files, generate, web_routes
from noisecraft.server.backends import on_server_start, open_queue
from noisecraft.server.config import Folders, ServerConfig
from noisecraft.server.events import EventHub
from noisecraft.server.jobqueue import JobQueue
from noisecraft.server.security import GuardMiddleware, install_error_handlers
from noisecraft.server.supervisor import Supervisor
from noisecraft.server.worker import default_registry
from noisecraft.web import static_dir as web_static_dir

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """What the routes share (``request.app.state.noisecraft``)."""

    config: ServerConfig
    folders: Folders
    queue: JobQueue  # or a RedisJobQueue (--queue redis): the same methods
    registry: NodeRegistry
    hub: EventHub


def create_app(config: ServerConfig, *, registry: NodeRegistry | None = None,
               start_workers: bool = True) -> FastAPI:
    """The ASGI app.  ``start_workers=False`` leaves running jobs to workers started
    elsewhere (``noisecraft worker --data-dir ...``), as tests and multi-machine setups do."""
    config.check()
    folders = config.folders.create()
    queue = open_queue(config.queue, folders)
    state = ServerState(config, folders, queue,
                        registry if registry is not None else default_registry(),
                        EventHub(queue))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await run_in_threadpool(on_server_start, queue)
        supervisor = Supervisor(config).start() if start_workers and config.workers else None
        await state.hub.start()
        try:
            yield
        finally:
            await state.hub.stop()
            if supervisor is not None:
                supervisor.stop()

    app = FastAPI(title="noisecraft", version=__version__, lifespan=lifespan,
                  docs_url="/docs", redoc_url=None)
    app.state.noisecraft = state
    install_error_handlers(app)
    for prefix in ("", "/api"):
        app.include_router(comfy.router, prefix=prefix)
        app.include_router(files.router, prefix=prefix)
        app.include_router(events.router, prefix=prefix)
    app.include_router(a1111.router, prefix="/sdapi/v1")
    app.include_router(generate.router, prefix="/api")
    app.include_router(web_routes.router)  # web UI data, the ComfyUI editor at /editor/

    @app.get("/health")
    async def health():
        return {"ok": True, "version": __version__}

    from fastapi.staticfiles import StaticFiles  # the web UI (mounted after the APIs)

    web_dir = config.web_dir if config.web_dir is not None else web_static_dir()
    app.mount("/", StaticFiles(directory=web_dir, html=True), name="web")
    app.add_middleware(GuardMiddleware, auth=config.auth, limits=config.limits)
    if config.cors_allow:
        app.add_middleware(CORSMiddleware, allow_origins=list(config.cors_allow),
                           allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                           allow_headers=["*"], allow_credentials="*" not in config.cors_allow)
    return app


def serve(config: ServerConfig) -> None:
    """Run the server (and its worker processes) until interrupted."""
    import uvicorn

    app = create_app(config)
    uvicorn.run(app, host=config.host, port=config.port, log_level="info",
                ws_max_size=1 << 20)
