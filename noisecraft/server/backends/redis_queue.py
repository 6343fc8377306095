"""The job queue on Redis, for workers on several machines: the contract of
:class:`noisecraft.server.jobqueue.JobQueue` (same methods, same :class:`Job` and
:class:`Event` values), with delivery to workers by Dramatiq (see :mod:`.redis_worker` for
why Dramatiq).

How a job travels:

1. :meth:`RedisJobQueue.enqueue` writes the job (hash + ``pending`` sorted set, one Lua
   script: acknowledged when Redis answers), then sends one Dramatiq message carrying a
   *token*.  A token means "one job is waiting"; it names no job.
2. A worker that receives a token runs :meth:`claim`, exactly as on SQLite: a running job
   whose lease expired first (its worker died), else the first pending job in queue order
   (so ComfyUI's ``front``, ``move_to_front`` and ``cancel`` act on the sorted set).  The
   worker renews the job's lease every ``lease_seconds / 4`` while it runs.
3. Dramatiq acknowledges the message only after the job ran (late ack).  If the worker is
   killed, its lease expires and the next token any worker receives takes the job over
   (``attempt`` + 1) before pending jobs; and Dramatiq moves the dead worker's
   unacknowledged token back to the queue once its heartbeat is ``2 * lease_seconds`` old,
   so a token comes even when nothing new is queued.
4. :meth:`finish` records the result only for the current attempt and owner (one script),
   so a worker that was presumed dead but comes back cannot complete the job a second time.

There are always at least as many tokens on their way as jobs waiting: every enqueue and
every release sends one, a takeover (which spends a token on a job that was not pending)
sends a replacement, and surplus tokens claim nothing.  A server that died between writing
a job and sending its token is covered by :meth:`reannounce_pending` at the next start.

Images are not stored here: server and workers share the data folder (a network file
system when workers run on other machines), as they must anyway for uploaded inputs and
model files; Redis carries only JSON and preview JPEGs.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from noisecraft.server.backends import redis_scripts as lua
from noisecraft.server.config import ConfigError
from noisecraft.server.jobqueue import FINAL, Event, Job

QUEUE_NAME = "noisecraft-jobs"  # the Dramatiq queue of tokens
ACTOR_NAME = "noisecraft_job_token"
EVENTS_MAXLEN = 10_000  # events kept at most (approximately); older ones are trimmed
LATEST_TTL = 86_400  # seconds an A1111 "latest preview" pointer lives
# Dramatiq's dead-worker check on every broker command (not its default one in a thousand):
# it costs one ZRANGEBYSCORE on the small heartbeat set, and gives a dead worker's token
# back within a second of its heartbeat timeout.
MAINTENANCE_CHANCE = 1_000_000


def safe_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def _text(value: bytes | str | None) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else value


def _float(value: bytes | None) -> float | None:
    text = _text(value)
    return float(text) if text else None


def job_from_hash(raw: dict[bytes, bytes]) -> Job:
    h = {k.decode(): v for k, v in raw.items()}
    result = _text(h.get("result"))
    return Job(
        id=_text(h["id"]), number=int(h["number"]), kind=_text(h["kind"]),
        payload=json.loads(h["payload"]), client_id=_text(h.get("client_id")) or None,
        status=_text(h["status"]), attempt=int(h["attempt"]), created=float(h["created"]),
        started=_float(h.get("started")), finished=_float(h.get("finished")),
        result=json.loads(result) if result else None,
    )


class RedisJobQueue:
    """The queue at ``url`` (``redis://[:password@]host:port/db``).  ``lease_seconds`` is
    how long a silent worker is presumed alive (Dramatiq's heartbeat timeout)."""

    def __init__(self, url: str, *, lease_seconds: float = 30.0, max_attempts: int = 3,
                 prefix: str = "noisecraft") -> None:
        import redis

        self.url = url
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.prefix = prefix
        self.redis = redis.Redis.from_url(url, socket_connect_timeout=10,
                                          health_check_interval=30)
        try:
            self.redis.ping()
        except redis.RedisError as e:
            raise ConfigError(
                f"cannot reach Redis at {safe_url(url)} ({e}); start redis-server there or "
                "fix --redis-url (redis://HOST:PORT/DB)") from None
        self._scripts = {name: self.redis.register_script(getattr(lua, name)) for name in (
            "ENQUEUE", "CLAIM", "RENEW", "FINISH", "RELEASE", "CANCEL", "INTERRUPT",
            "MOVE_TO_FRONT", "PUBLISH")}
        self._broker = None

    # ---- keys and Dramatiq ----------------------------------------------------------------

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def _job_key(self, job_id: str) -> str:
        return self.key("job", job_id)

    @property
    def broker(self):
        """The Dramatiq Redis broker of this queue (created on first use)."""
        if self._broker is None:
            from dramatiq.brokers.redis import RedisBroker
            from dramatiq.middleware import Retries

            # Retries: a token whose handling raised (Redis unreachable mid-job) is sent
            # again after a pause instead of going to the dead-letter queue.
            self._broker = RedisBroker(
                client=self.redis, namespace=self.key("dramatiq"),
                middleware=[Retries(max_retries=20, min_backoff=1000, max_backoff=60_000)],
                # twice the lease: when the dead worker's token comes back, its job's lease
                # has expired for sure, so that token takes the job over
                heartbeat_timeout=int(2 * self.lease_seconds * 1000),
                maintenance_chance=MAINTENANCE_CHANCE)
            self._broker.declare_queue(QUEUE_NAME)
        return self._broker

    def announce(self, count: int = 1) -> None:
        """Send ``count`` tokens: each lets one worker claim one pending job."""
        from dramatiq import Message

        for _ in range(count):
            self.broker.enqueue(Message(queue_name=QUEUE_NAME, actor_name=ACTOR_NAME,
                                        args=(uuid.uuid4().hex,), kwargs={}, options={}))

    def reannounce_pending(self) -> int:
        """One token per pending job (surplus tokens claim nothing): repairs the loss of
        tokens by a server that died between writing a job and sending its token."""
        n = self.count_pending()
        self.announce(n)
        return n

    def close(self) -> None:
        self.redis.close()

    # ---- producers (the server) -----------------------------------------------------------

    def enqueue(self, kind: str, payload: dict[str, Any], *, client_id: str | None = None,
                front: bool = False, job_id: str | None = None) -> Job:
        """Add a job; in Redis when this returns (then a token tells the workers)."""
        job_id = job_id or str(uuid.uuid4())
        self._scripts["ENQUEUE"](
            keys=[self._job_key(job_id), self.key("pending"), self.key("number")],
            args=[job_id, kind, json.dumps(payload), client_id or "", int(front),
                  repr(time.time())])
        self.announce()
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        raw = self.redis.hgetall(self._job_key(job_id))
        return job_from_hash(raw) if raw else None

    def _jobs(self, ids: list[bytes]) -> list[Job]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id in ids:
            pipe.hgetall(self._job_key(_text(job_id)))
        return [job_from_hash(raw) for raw in pipe.execute() if raw]

    def pending(self) -> list[Job]:
        return self._jobs(self.redis.zrange(self.key("pending"), 0, -1))

    def running(self) -> list[Job]:
        return self._jobs(self.redis.zrange(self.key("running"), 0, -1))

    def count_pending(self) -> int:
        return self.redis.zcard(self.key("pending"))

    def history(self, max_items: int | None = None, job_id: str | None = None) -> list[Job]:
        """Finished jobs (success, error, interrupted), oldest first (ComfyUI's order)."""
        if job_id is not None:
            found = self.redis.zscore(self.key("history"), job_id) is not None
            jobs = self._jobs([job_id.encode()]) if found else []
        else:
            end = -1 if max_items is None else int(max_items) - 1
            if end < -1:
                return []
            jobs = self._jobs(self.redis.zrevrange(self.key("history"), 0, end))[::-1]
        return [j for j in jobs if j.status in FINAL]

    def cancel(self, job_ids: list[str] | None = None) -> int:
        """Remove pending jobs (all when ``job_ids`` is None); returns how many."""
        if job_ids is None:
            job_ids = [_text(i) for i in self.redis.zrange(self.key("pending"), 0, -1)]
        now = repr(time.time())
        return sum(self._scripts["CANCEL"](keys=[self._job_key(i), self.key("pending")],
                                           args=[i, now]) for i in job_ids)

    def interrupt(self, job_id: str | None = None) -> int:
        """Ask the worker(s) running ``job_id`` (all running jobs when None) to stop."""
        ids = [job_id] if job_id is not None else [
            _text(i) for i in self.redis.zrange(self.key("running"), 0, -1)]
        return sum(self._scripts["INTERRUPT"](keys=[self._job_key(i)]) for i in ids)

    def move_to_front(self, job_id: str) -> bool:
        return self._scripts["MOVE_TO_FRONT"](
            keys=[self._job_key(job_id), self.key("pending")], args=[job_id]) == 1

    def delete_history(self, job_ids: list[str] | None = None) -> int:
        if job_ids is None:
            n = self.redis.zcard(self.key("history"))
            self.redis.delete(self.key("history"))
            return n
        return self.redis.zrem(self.key("history"), *job_ids) if job_ids else 0

    # ---- consumers (workers) --------------------------------------------------------------

    def claim(self, owner: str, lease_seconds: float) -> Job | None:
        """Take the next job: a running job whose lease expired first (its worker died or
        hung), else the first pending one.  None when there is nothing to do.

        Called once per Dramatiq token.  Taking over an expired job spends a token that was
        meant for a pending job, so a replacement is sent."""
        now = time.time()
        lost = {"error": {
            "type": "worker_lost",
            "message": f"the worker running this job stopped {self.max_attempts} times "
                       "(crash, kill or lost lease); the job is not retried again"}}
        answer = self._scripts["CLAIM"](
            keys=[self.key("pending"), self.key("running"), self.key("leases"),
                  self.key("history")],
            args=[self.prefix, owner, lease_seconds, repr(now), self.max_attempts,
                  json.dumps(lost)])
        if not answer:
            return None
        job_id, taken_over = _text(answer[0]), int(answer[1])
        if taken_over:
            self.announce()
        return self.get(job_id) if taken_over >= 0 else None

    def renew(self, job: Job, owner: str, lease_seconds: float) -> tuple[bool, bool]:
        """Extend the lease; returns (still ours, cancel requested)."""
        ours, cancel = self._scripts["RENEW"](
            keys=[self._job_key(job.id), self.key("leases")],
            args=[job.id, job.attempt, owner, lease_seconds])
        return ours == 1, cancel == 1

    def finish(self, job: Job, owner: str, status: str, result: dict[str, Any]) -> bool:
        """Record this attempt's outcome; False (nothing written) when the attempt is no
        longer the job's current one (another worker took it over)."""
        if status not in FINAL:
            raise ValueError(f"status must be one of {FINAL}, got {status!r}")
        return self._scripts["FINISH"](
            keys=[self._job_key(job.id), self.key("running"), self.key("history"),
                  self.key("leases")],
            args=[job.id, job.attempt, owner, status, json.dumps(result),
                  repr(time.time())]) == 1

    def release(self, job: Job, owner: str) -> bool:
        """Give a claimed job back (a worker shutting down): pending again, attempt undone,
        and a new token sent first, so that the job is never left without one."""
        self.announce()
        return self._scripts["RELEASE"](
            keys=[self._job_key(job.id), self.key("running"), self.key("pending"),
                  self.key("leases")],
            args=[job.id, job.attempt, owner]) == 1

    def release_dead(self, host: str | None = None) -> int:
        """Nothing to do: a dead worker's job is taken over once its lease expired, by the
        next token delivered (the dead worker's own, which Dramatiq gives back, at the
        latest), wherever the worker ran."""
        return 0

    # ---- events ---------------------------------------------------------------------------

    def publish(self, type: str, data: dict[str, Any], *, job_id: str | None = None,
                client_id: str | None = None, blob: bytes | None = None) -> None:
        event = json.dumps({"job_id": job_id, "client_id": client_id, "type": type,
                            "data": data, "created": time.time()})
        latest = self.key("latest", job_id, type) if job_id else self.key("latest", "-")
        self._scripts["PUBLISH"](
            keys=[self.key("events"), self.key("events", "seq"), latest],
            args=[event, blob or b"", int(blob is not None), EVENTS_MAXLEN,
                  int(job_id is not None), LATEST_TTL])

    @staticmethod
    def _event(entry_id: bytes, fields: dict[bytes, bytes]) -> Event:
        e = json.loads(fields[b"e"])
        return Event(int(entry_id.split(b"-")[0]), e["job_id"], e["client_id"], e["type"],
                     e["data"], fields.get(b"b"))

    def events_after(self, seq: int, limit: int = 500) -> list[Event]:
        entries = self.redis.xrange(self.key("events"), min=f"{int(seq) + 1}-0", count=limit)
        return [self._event(i, f) for i, f in entries]

    def last_seq(self) -> int:
        return int(self.redis.get(self.key("events", "seq")) or 0)

    def latest_event(self, job_id: str, type: str) -> Event | None:
        seq = self.redis.get(self.key("latest", job_id, type))
        if seq is None:
            return None
        entries = self.redis.xrange(self.key("events"), min=f"{int(seq)}-0",
                                    max=f"{int(seq)}-0")
        return self._event(*entries[0]) if entries else None

    def prune_events(self, older_than_seconds: float = 600.0) -> int:
        """Trim events older than ``older_than_seconds`` (the stream is in time order)."""
        cutoff = time.time() - older_than_seconds
        keep_from, start = None, "-"
        while keep_from is None:
            batch = self.redis.xrange(self.key("events"), min=start, count=500)
            if not batch:
                break
            for entry_id, fields in batch:
                if json.loads(fields[b"e"])["created"] >= cutoff:
                    keep_from = entry_id
                    break
            else:
                start = b"(" + batch[-1][0]
        if keep_from is None:
            return self.redis.xtrim(self.key("events"), maxlen=0)
        return self.redis.xtrim(self.key("events"), minid=keep_from)

    # ---- options (A1111 /options) ---------------------------------------------------------

    def options(self) -> dict[str, Any]:
        return {k.decode(): json.loads(v)
                for k, v in self.redis.hgetall(self.key("options")).items()}

    def set_options(self, values: dict[str, Any]) -> None:
        if values:
            self.redis.hset(self.key("options"),
                            mapping={k: json.dumps(v) for k, v in values.items()})

