"""The HTTP server: one process serves the APIs, worker processes run the engine.

* :mod:`.config` - frozen configuration (parsed once by ``cli.py``) and the data folders;
* :mod:`.jobqueue` - the durable job queue (SQLite, WAL): claims with leases, idempotent
  completion, history, cancel/interrupt flags and the event log workers write to;
* :mod:`.worker` - a worker: claims jobs and runs them on one long-lived ``Engine``;
* :mod:`.app` - ``create_app(config)``: the FastAPI app (ComfyUI routes, AUTOMATIC1111
  ``/sdapi/v1`` routes, ``/api/generate``, the ``/ws`` websocket);
* :mod:`.supervisor` - starts and restarts the worker processes next to the server.

The request loop never runs diffusion: it validates, enqueues and streams events.
"""
