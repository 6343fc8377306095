"""A worker: claims jobs from the queue and runs them on one long-lived :class:`Engine`.

Models stay loaded between jobs (the engine's cache); the graph executor's output cache too.
While a job runs, a heartbeat thread renews its lease and turns an interrupt request (or a
lost lease) into a cancel of the job's :class:`~noisecraft.request.CancelToken`.  Events
(progress, previews, ComfyUI's execution events) go into the queue's event log, from which
the server streams them to the websocket of the client that queued the job.

Job kinds and their payloads (plain JSON):

* ``generate``: ``{"settings": GenerationRequest.settings(), "inputs": {"init_image":
  "relative/path/in/input.png", "mask": ...}, "save": {"type": "output" | "temp",
  "prefix": "noisecraft"}}`` (LoRAs are names in ``models/loras``, resolved here by
  :func:`~noisecraft.loras.confine_loras`); the result's ``outputs`` is ``{"images":
  [{"filename", "subfolder", "type"}]}`` plus ``seeds``.  With ``"sd_upscale": {"scale",
  "upscaler", "tile", "overlap"}`` (:mod:`noisecraft.server.a1111_scripts`) the request runs
  through :func:`~noisecraft.pipelines.sd_upscale.sd_upscale` instead of one engine call.
* ``workflow``: ``{"prompt": API-format prompt, "extra_data": {...}}``, run by the graph
  :class:`~noisecraft.graph.Executor`; the result holds ComfyUI's history ``outputs``.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image

from noisecraft.graph import ExecutionContext, Executor, NodeRegistry, safe_join
from noisecraft.metadata import save_png
from noisecraft.request import CancelToken, GenerationRequest, InputError, Interrupted
from noisecraft.server.config import WorkerConfig
from noisecraft.server.confine import confine_request
from noisecraft.server.jobqueue import ERROR, INTERRUPTED, SUCCESS, Job, JobQueue, worker_identity

log = logging.getLogger(__name__)

PREVIEW_JPEG, PREVIEW_PNG = 1, 2  # ComfyUI's image type in binary preview frames


def encode_preview(image: Any, max_side: int = 512) -> bytes | None:
    """JPEG bytes of a preview (a PIL image, or bytes passed through); None if unusable."""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, tuple) and len(image) >= 2:  # ComfyUI's ("JPEG", image, size)
        image = image[1]
    if not isinstance(image, Image.Image):
        return None
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def default_registry() -> NodeRegistry:
    """The built-in nodes (when ``noisecraft.nodes`` provides them)."""
    registry = NodeRegistry()
    try:
        from noisecraft.nodes import register_builtin_nodes
    except ImportError:
        log.warning("noisecraft.nodes has no register_builtin_nodes: no graph nodes available")
        return registry
    register_builtin_nodes(registry)
    return registry


class _Heartbeat:
    """Renews the lease of one job every ``lease / 4`` seconds; cancels on request or loss."""

    def __init__(self, queue: JobQueue, job: Job, owner: str, lease: float,
                 cancel: CancelToken) -> None:
        self.queue, self.job, self.owner, self.lease, self.cancel = queue, job, owner, lease, cancel
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-{job.id[:8]}",
                                        daemon=True)

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        interval = max(0.05, self.lease / 4)
        while not self._stop.wait(interval):
            try:
                ours, cancel = self.queue.renew(self.job, self.owner, self.lease)
            except Exception:  # a busy database: try again next beat, the lease is long
                log.exception("renewing the lease of job %s failed", self.job.id)
                continue
            if not ours:
                self.lost = True
            if cancel or not ours:
                self.cancel.cancel()


class Worker:
    """Runs jobs from the queue ``config.queue`` names (``config.data_dir``'s SQLite file by
    default).  ``engine`` and ``registry`` default to a new :class:`~noisecraft.engine.Engine`
    on ``config.device`` with ``config.compute_backend`` and the built-in nodes."""

    def __init__(self, config: WorkerConfig, *, engine=None, registry: NodeRegistry | None = None,
                 queue: JobQueue | None = None) -> None:
        if engine is None:
            from noisecraft.engine import Engine

            engine = Engine(device=config.device, backend=config.compute_backend)
        self.config = config
        self.folders = config.folders.create()
        self.engine = engine
        self.registry = registry if registry is not None else default_registry()
        self.executor = Executor(self.registry)
        if queue is None:
            from noisecraft.server.backends import open_queue

            queue = open_queue(config.queue, self.folders)
        self.queue = queue
        self.identity = worker_identity()
        self.current: Job | None = None

    # ---- loop ---------------------------------------------------------------------------

    def run(self, stop: threading.Event | None = None) -> int:
        """Claim and run jobs until ``stop`` is set (or ``config.max_jobs`` ran)."""
        stop = stop or threading.Event()
        if self.config.queue.backend == "redis":  # jobs arrive as Dramatiq messages
            from noisecraft.server.backends.redis_worker import consume

            return consume(self, stop)
        done = 0
        self.queue.release_dead()
        while not stop.is_set():
            if self.config.max_jobs is not None and done >= self.config.max_jobs:
                break
            if self.run_one(stop):
                done += 1
            else:
                stop.wait(self.config.queue.poll_seconds)
        return done

    def run_one(self, stop: threading.Event | None = None) -> bool:
        """Claim one job and run it; False when the queue had nothing to run."""
        job = self.queue.claim(self.identity, self.config.queue.lease_seconds)
        if job is None:
            return False
        self.run_job(job, stop)
        return True

    def run_job(self, job: Job, stop: threading.Event | None = None) -> None:
        """Run a job this worker claimed, and record its outcome (or give it back when
        ``stop`` interrupted it)."""
        lease = self.config.queue.lease_seconds
        self.current = job
        cancel = CancelToken()
        try:
            with _Heartbeat(self.queue, job, self.identity, lease, cancel) as beat:
                watcher = _watch_stop(stop, cancel)
                status, result, files = self._execute(job, cancel)
                watcher.set()
            if stop is not None and stop.is_set() and status == INTERRUPTED:
                self.queue.release(job, self.identity)  # shutting down: someone else runs it
                _delete(files)
                return
            if beat.lost or not self.queue.finish(job, self.identity, status, result):
                log.warning("job %s attempt %d lost its lease; its result is discarded",
                            job.id, job.attempt)
                _delete(files)
                return
            self.queue.publish("job_finished", {"prompt_id": job.id, "status": status},
                               job_id=job.id, client_id=job.client_id)
        finally:
            self.current = None

    # ---- execution ----------------------------------------------------------------------

    def _emitter(self, job: Job) -> Callable[[str, dict[str, Any]], None]:
        def emit(event: str, data: dict[str, Any]) -> None:
            data = dict(data)
            preview = data.pop("preview", None)
            self.queue.publish(event, data, job_id=job.id, client_id=job.client_id)
            blob = encode_preview(preview) if preview is not None else None
            if blob is not None:
                self.queue.publish("preview", {"prompt_id": job.id, "node": data.get("node"),
                                               "image_type": PREVIEW_JPEG},
                                   job_id=job.id, client_id=job.client_id, blob=blob)
        return emit

    def _execute(self, job: Job, cancel: CancelToken) -> tuple[str, dict[str, Any], list[Path]]:
        emit = self._emitter(job)
        try:
            if job.kind == "generate":
                return self._generate(job, cancel, emit)
            if job.kind == "workflow":
                return self._workflow(job, cancel, emit)
            raise InputError(f"unknown job kind {job.kind!r}; known: generate, workflow")
        except Interrupted as e:
            emit("execution_interrupted", {"prompt_id": job.id, "node_id": None,
                                           "node_type": None, "executed": []})
            return INTERRUPTED, {"error": {"type": "interrupted", "message": str(e)}}, []
        except Exception as e:  # recorded in history and sent to the client, never raised
            log.exception("job %s failed", job.id)
            message = f"{type(e).__name__}: {e}" if not isinstance(e, InputError) else str(e)
            emit("execution_error", {
                "prompt_id": job.id, "node_id": None, "node_type": job.kind, "executed": [],
                "exception_message": message, "exception_type": type(e).__name__,
                "traceback": [], "current_inputs": {},
            })
            return ERROR, {"error": {"type": type(e).__name__, "message": message,
                                     "user_error": isinstance(e, InputError)}}, []

    def _resolve_inputs(self, payload: dict[str, Any]) -> dict[str, Any]:
        resolved = {}
        for name, rel in (payload.get("inputs") or {}).items():
            if name not in ("init_image", "mask"):
                raise InputError(f"unknown job input {name!r}; known: init_image, mask")
            resolved[name] = str(safe_join(self.folders.input, rel, what=f"{name} file"))
        model = payload["settings"].get("model")
        if model is not None and not Path(model).is_absolute():
            path = safe_join(self.folders.models("checkpoints"), model, what="model name")
            if path.exists():  # else a name registered on the engine (or a clear error)
                resolved["model"] = str(path)
        return resolved

    def _generate(self, job: Job, cancel: CancelToken, emit):
        payload = job.payload
        request = GenerationRequest.from_settings(payload["settings"],
                                                  **self._resolve_inputs(payload))
        request = confine_request(request, self.folders)
        save = payload.get("save") or {}
        kind = save.get("type", "output")
        folder = self.folders.of_type(kind)
        emit("execution_start", {"prompt_id": job.id})
        emit("executing", {"node": "generate", "prompt_id": job.id})
        every = self.config.preview_every

        def on_step(ev) -> None:
            data: dict[str, Any] = {"value": ev.step, "max": ev.total, "node": "generate",
                                    "prompt_id": job.id, "stage": ev.stage}
            if every and (ev.step % every == 0 or ev.step == ev.total):
                bundle = self.engine.model(request.model)
                data["preview"] = self.engine.preview(bundle, ev.x0[:1])[0]
            emit("progress", data)

        finish = None
        if payload.get("inpaint") and request.mask is not None:
            from noisecraft.server.inpaint_area import prepare

            request, finish = prepare(request, payload["inpaint"])
        generated = self._run(request, payload, on_step, cancel)
        prefix = str(save.get("prefix", "noisecraft"))
        images, files = [], []
        for i, g in enumerate(generated):
            name = f"{prefix}_{job.id[:8]}_{job.attempt}_{i:02d}.png"
            image = finish(g.image) if finish else g.image
            files.append(save_png(image, folder / name, g.settings))
            images.append({"filename": name, "subfolder": "", "type": kind})
        outputs = {"generate": {"images": images}}
        emit("executed", {"node": "generate", "output": outputs["generate"], "prompt_id": job.id})
        emit("executing", {"node": None, "prompt_id": job.id})
        emit("execution_success", {"prompt_id": job.id})
        info = [g.settings for g in generated]
        return SUCCESS, {"outputs": outputs, "seeds": [g.seed for g in generated],
                         "info": info}, files

    def _run(self, request: GenerationRequest, payload: dict[str, Any], on_step,
             cancel: CancelToken) -> list:
        """The request's images: one engine call, or the SD upscale pipeline's tiles."""
        if payload.get("sd_upscale"):
            from noisecraft.pipelines.sd_upscale import sd_upscale
            from noisecraft.server.a1111_scripts import pipeline_args

            args = pipeline_args(payload["sd_upscale"], self.folders.root)
            return [sd_upscale(self.engine, request, callback=on_step, cancel=cancel, **args)]
        return list(self.engine.generate(request, callback=on_step, cancel=cancel).images)

    def _workflow(self, job: Job, cancel: CancelToken, emit):
        context = ExecutionContext(
            input_dir=self.folders.input, output_dir=self.folders.output,
            temp_dir=self.folders.temp, cancel=cancel,
            resources={"engine": self.engine, "folders": self.folders},
        )
        extra = (job.payload.get("extra_data") or {}).get("extra_pnginfo")
        run = self.executor.execute(job.payload["prompt"], context, prompt_id=job.id,
                                    on_event=emit, extra_pnginfo=extra)
        files = [
            self.folders.of_type(img.get("type", "output")) / img.get("subfolder", "")
            / img["filename"]
            for ui in run.outputs.values() for img in ui.get("images", [])
            if isinstance(img, dict) and "filename" in img
        ]
        result = {"outputs": run.outputs, "executed": run.executed, "cached": run.cached}
        if run.status == "success":
            return SUCCESS, result, files
        result["error"] = run.error
        return (INTERRUPTED if run.status == "interrupted" else ERROR), result, files


def _watch_stop(stop: threading.Event | None, cancel: CancelToken) -> threading.Event:
    """Cancel the running job when the worker is asked to stop; returns the 'done' event."""
    done = threading.Event()
    if stop is None:
        return done

    def watch() -> None:
        while not done.wait(0.1):
            if stop.is_set():
                cancel.cancel()
                return

    threading.Thread(target=watch, daemon=True, name="stop-watch").start()
    return done


def _delete(files: list[Path]) -> None:
    for path in files:
        try:
            Path(path).unlink(missing_ok=True)
        except OSError:
            log.warning("could not delete %s", path)


def wait_for(queue: JobQueue, job_id: str, timeout: float, poll: float = 0.05) -> Job:
    """Block until ``job_id`` is finished (for tests and synchronous callers)."""
    deadline = time.monotonic() + timeout
    while True:
        job = queue.get(job_id)
        if job is None:
            raise KeyError(f"no job {job_id!r}")
        if job.status not in ("pending", "running"):
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job.status} after {timeout:.0f} s")
        time.sleep(poll)


def run_worker_process(config: WorkerConfig) -> int:
    """A worker process's main: runs until SIGTERM/SIGINT (the running job is given back to
    the queue) or ``config.max_jobs``; returns the number of jobs run."""
    import signal

    logging.basicConfig(level=logging.INFO, format="%(asctime)s worker %(message)s")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker = Worker(config)
    log.info("worker %s on %s, data in %s", worker.identity, worker.engine.device,
             config.data_dir)
    return worker.run(stop)
