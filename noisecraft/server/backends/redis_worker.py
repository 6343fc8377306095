"""A worker's loop on the Redis queue: Dramatiq delivers tokens, the worker runs jobs.

Why Dramatiq (over RQ and Celery) for "a worker killed mid-job gives its job back to
another worker":

* Dramatiq's Redis broker acknowledges a message only after the actor returned (late ack
  is its only mode), and every worker process sends a heartbeat with each broker command
  (its delay-queue consumer polls every second even while the job runs).  The messages of a
  worker whose heartbeat is older than ``heartbeat_timeout`` are moved back to the queue by
  any other worker.  So a ``kill -9`` or a lost machine gives the job back after one
  timeout, and a slow but living worker keeps its job however long it runs.  (The queue's
  own lease lets the next token take such a job over sooner: :mod:`.redis_queue`.)
* RQ marks a job whose worker died as failed ("abandoned job") and re-runs it only if a
  retry policy was set, at the next registry clean-up (every few minutes); its default
  worker also forks a fresh process for every job, which would reload the models each time.
* Celery on Redis redelivers an unacknowledged message after a fixed visibility timeout
  that knows nothing of worker liveness: a job running longer than the timeout is
  delivered again while its first worker is still alive.

A worker process runs one Dramatiq worker thread with a prefetch of one, so it holds at
most the token of the job it runs and idle workers get the rest.  Models stay loaded in
the process's :class:`~noisecraft.engine.Engine` between jobs.
"""

from __future__ import annotations

import logging
import threading

from noisecraft.server.backends.redis_queue import ACTOR_NAME, QUEUE_NAME, RedisJobQueue

log = logging.getLogger(__name__)

STOP_TIMEOUT_MS = 60_000  # how long stopping waits for the running job to be given back


def consume(worker, stop: threading.Event) -> int:
    """Run jobs of ``worker.queue`` (a :class:`RedisJobQueue`) on ``worker`` until ``stop``
    is set or ``worker.config.max_jobs`` ran; returns the number of jobs run."""
    import dramatiq

    queue: RedisJobQueue = worker.queue
    max_jobs = worker.config.max_jobs
    lease = worker.config.queue.lease_seconds
    done = 0
    lock = threading.Lock()

    def on_token(token: str) -> None:
        nonlocal done
        if stop.is_set():  # stopping: this token belongs to another worker now
            queue.announce()
            return
        job = queue.claim(worker.identity, lease)
        if job is None:
            log.debug("token %s: nothing to run", token)
            return
        log.info("job %s attempt %d (token %s)", job.id, job.attempt, token)
        worker.run_job(job, stop)
        with lock:
            done += 1
            if max_jobs is not None and done >= max_jobs:
                stop.set()

    dramatiq.Actor(on_token, broker=queue.broker, actor_name=ACTOR_NAME,
                   queue_name=QUEUE_NAME, priority=0, options={})
    runner = dramatiq.Worker(queue.broker, worker_threads=1)
    runner.queue_prefetch = 1  # hold no token besides the running job's
    runner.start()
    try:
        stop.wait()
    finally:
        runner.stop(timeout=STOP_TIMEOUT_MS)
    return done
