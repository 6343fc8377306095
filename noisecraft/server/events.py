"""Streaming worker events to websocket clients (ComfyUI's ``/ws?clientId=``).

Workers append events to the queue's event log (SQLite); one :class:`EventHub` task per
server process reads the log and sends each event to the websockets of the client that
queued the job (to every client when the job had no ``client_id``), as ComfyUI does:

* JSON text frames ``{"type": "progress", "data": {...}}`` for ``status``,
  ``execution_start``, ``executing``, ``progress``, ``executed``, ``execution_cached``,
  ``execution_error``, ``execution_interrupted``, ``execution_success``;
* binary preview frames: 4-byte big-endian event type 1 (PREVIEW_IMAGE), 4-byte image type
  (1 = JPEG, 2 = PNG), then the image bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import uuid
from typing import Any

from fastapi import APIRouter, WebSocket, WebSocketDisconnect
from starlette.concurrency import run_in_threadpool

from noisecraft.server.jobqueue import Event, JobQueue

log = logging.getLogger(__name__)
router = APIRouter()

PREVIEW_IMAGE = 1  # ComfyUI's BinaryEventTypes.PREVIEW_IMAGE
STATUS_AFTER = frozenset({"execution_start", "execution_success", "execution_error",
                          "execution_interrupted", "job_finished", "queue_changed"})
INTERNAL = frozenset({"job_finished", "queue_changed", "preview"})


def preview_frame(image: bytes, image_type: int = 1) -> bytes:
    return struct.pack(">II", PREVIEW_IMAGE, image_type) + image


class EventHub:
    """Fans worker events out to websockets; remembers each running job's latest progress."""

    def __init__(self, queue: JobQueue, poll_seconds: float = 0.05) -> None:
        self.queue = queue
        self.poll_seconds = poll_seconds
        self.sockets: dict[str, set[WebSocket]] = {}
        self.progress: dict[str, dict[str, Any]] = {}
        self._waiters: dict[str, list[asyncio.Event]] = {}
        self._task: asyncio.Task | None = None
        self._seq = 0

    # ---- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        self._seq = await run_in_threadpool(self.queue.last_seq)
        self._task = asyncio.create_task(self._pump(), name="noisecraft-events")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _pump(self) -> None:
        pruned = 0
        while True:
            try:
                events = await run_in_threadpool(self.queue.events_after, self._seq)
            except Exception:
                log.exception("reading the event log failed; retrying")
                events = []
            for event in events:
                self._seq = event.seq
                await self._dispatch(event)
            pruned += 1
            if pruned % 2000 == 0:
                await run_in_threadpool(self.queue.prune_events)
            if not events:
                await asyncio.sleep(self.poll_seconds)

    # ---- waiting for jobs (synchronous APIs: A1111, /api/generate) -----------------------

    async def wait_job(self, job_id: str, timeout: float | None = None):
        """The finished :class:`~noisecraft.server.jobqueue.Job` (None on timeout)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            job = await run_in_threadpool(self.queue.get, job_id)
            if job is None or job.status not in ("pending", "running"):
                return job
            event = asyncio.Event()
            self._waiters.setdefault(job_id, []).append(event)
            try:
                wait = 1.0 if deadline is None else min(1.0, deadline - loop.time())
                if wait <= 0:
                    return None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), wait)
            finally:
                waiters = self._waiters.get(job_id)
                if waiters and event in waiters:
                    waiters.remove(event)

    # ---- dispatch -----------------------------------------------------------------------

    async def _dispatch(self, event: Event) -> None:
        if event.type == "progress" and event.job_id:
            self.progress[event.job_id] = event.data
        if event.type in ("job_finished", "execution_success", "execution_error",
                          "execution_interrupted") and event.job_id:
            self.progress.pop(event.job_id, None)
            for waiter in self._waiters.pop(event.job_id, []):
                waiter.set()
        if event.type == "preview" and event.blob:
            await self._send(event.client_id, preview_frame(
                event.blob, int(event.data.get("image_type", 1))))
        elif event.type not in INTERNAL:
            await self._send(event.client_id, {"type": event.type, "data": event.data})
        if event.type in STATUS_AFTER:
            await self.broadcast_status()

    async def _send(self, client_id: str | None, message: dict | bytes) -> None:
        if client_id is None:
            targets = [ws for group in self.sockets.values() for ws in group]
        else:
            targets = list(self.sockets.get(client_id, ()))
        for ws in targets:
            try:
                if isinstance(message, bytes):
                    await ws.send_bytes(message)
                else:
                    await ws.send_json(message)
            except Exception:  # a client that went away: its handler unregisters it
                log.debug("dropping an event for a closed websocket")

    async def status_message(self, sid: str | None = None) -> dict[str, Any]:
        pending = await run_in_threadpool(self.queue.count_pending)
        running = len(await run_in_threadpool(self.queue.running))
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": pending + running}}}
        if sid is not None:
            data["sid"] = sid
        return {"type": "status", "data": data}

    async def broadcast_status(self) -> None:
        if self.sockets:
            await self._send(None, await self.status_message())


@router.websocket("/ws")
async def websocket(ws: WebSocket) -> None:
    hub: EventHub = ws.app.state.noisecraft.hub
    client_id = ws.query_params.get("clientId") or uuid.uuid4().hex
    await ws.accept()
    hub.sockets.setdefault(client_id, set()).add(ws)
    try:
        await ws.send_json(await hub.status_message(sid=client_id))
        while True:
            await ws.receive_text()  # clients may send feature flags; nothing to answer
    except (WebSocketDisconnect, RuntimeError):
        pass
    finally:
        group = hub.sockets.get(client_id, set())
        group.discard(ws)
        if not group:
            hub.sockets.pop(client_id, None)
