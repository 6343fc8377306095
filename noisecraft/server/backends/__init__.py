"""Where the job queue lives: ``--queue sqlite`` (the default: one SQLite file in the data
folder, for a server and workers on one machine) or ``--queue redis --redis-url URL`` (a
Redis server, for workers on many machines; :mod:`.redis_queue`, :mod:`.redis_worker`).

Both give the same contract (enqueue with acknowledgement, claim with a lease, progress
events, results, history, cancel, front of queue, interrupt); the server's routes, the
event hub and :class:`~noisecraft.server.worker.Worker` use either through it.  Only
``redis_*`` modules import ``redis`` and ``dramatiq`` (the ``redis`` extra).
"""

from __future__ import annotations

from noisecraft.server.config import ConfigError, Folders, QueueConfig
from noisecraft.server.jobqueue import JobQueue


def open_queue(config: QueueConfig, folders: Folders):
    """The queue ``config`` names: a :class:`JobQueue` on ``folders.db`` or a
    :class:`~.redis_queue.RedisJobQueue` at ``config.redis_url``."""
    config.check()
    if config.backend == "sqlite":
        return JobQueue(folders.db)
    try:
        import dramatiq  # noqa: F401
        import redis  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"--queue redis needs the 'redis' and 'dramatiq' packages ({e}); install them "
            "with: pip install 'noisecraft[redis]'") from None
    from noisecraft.server.backends.redis_queue import RedisJobQueue

    return RedisJobQueue(config.redis_url, lease_seconds=config.lease_seconds)


def on_server_start(queue) -> None:
    """Repairs a server start needs: on Redis, a token for every pending job (a server
    killed between writing a job and announcing it left that job without one)."""
    if not isinstance(queue, JobQueue):
        queue.reannounce_pending()
