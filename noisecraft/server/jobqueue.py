"""The durable job queue: one SQLite file in WAL mode, shared by the server and its workers.

Guarantees (tested in ``tests/server/test_jobqueue.py`` and ``test_durability.py``):

* **Durable**: :meth:`JobQueue.enqueue` returns after the row is committed with
  ``synchronous=FULL``; a ``kill -9`` of server and workers loses no acknowledged job.
* **Claimed with a lease**: :meth:`claim` hands a job to one worker for ``lease_seconds``, which
  the worker renews while it runs.  A job whose lease expired (its worker died or hung) is
  claimed again, with ``attempt`` incremented; after ``max_attempts`` claims it is recorded as
  an error instead of killing worker after worker.
* **Completed once**: :meth:`finish` succeeds only for the current attempt of a running job,
  in one transaction; a stale worker's late result is refused (it then deletes its files).
* Pending jobs run in ``number`` order; ``front`` puts a job before all others (as ComfyUI's
  ``"front": true`` does, with a negative number).

Rows are plain JSON (payloads, results, events); nothing from the database is unpickled.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    number INTEGER NOT NULL,
    kind TEXT NOT NULL,
    payload TEXT NOT NULL,
    client_id TEXT,
    status TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_expires REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    result TEXT,
    in_history INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, number);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id TEXT,
    client_id TEXT,
    type TEXT NOT NULL,
    data TEXT NOT NULL,
    blob BLOB,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS events_job ON events (job_id, type);
CREATE TABLE IF NOT EXISTS options (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

PENDING, RUNNING = "pending", "running"
SUCCESS, ERROR, INTERRUPTED, CANCELLED = "success", "error", "interrupted", "cancelled"
FINAL = (SUCCESS, ERROR, INTERRUPTED)  # the states recorded in history


@dataclass(frozen=True)
class Job:
    id: str
    number: int
    kind: str
    payload: dict[str, Any]
    client_id: str | None
    status: str
    attempt: int
    created: float
    started: float | None = None
    finished: float | None = None
    result: dict[str, Any] | None = None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> Job:
        return cls(
            id=row["id"], number=row["number"], kind=row["kind"],
            payload=json.loads(row["payload"]), client_id=row["client_id"],
            status=row["status"], attempt=row["attempt"], created=row["created"],
            started=row["started"], finished=row["finished"],
            result=json.loads(row["result"]) if row["result"] else None,
        )


@dataclass(frozen=True)
class Event:
    seq: int
    job_id: str | None
    client_id: str | None
    type: str
    data: dict[str, Any]
    blob: bytes | None


def worker_identity() -> str:
    """``host:pid:random`` - unique per worker process, and tells which host and pid hold a
    lease (so :meth:`JobQueue.release_dead` can free the leases of dead local workers)."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class JobQueue:
    """The queue in ``path`` (created if missing).  One object per process; it keeps one
    connection per thread, so it may be used from a thread pool."""

    def __init__(self, path: str | os.PathLike, *, max_attempts: int = 3) -> None:
        self.path = Path(path)
        self.max_attempts = max_attempts
        self._local = threading.local()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db().executescript(SCHEMA)

    # ---- connection ---------------------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                 check_same_thread=False)
            db.row_factory = sqlite3.Row
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return db

    def _tx(self) -> _Transaction:
        return _Transaction(self._db())

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # ---- producers (the server) ---------------------------------------------------------

    def enqueue(self, kind: str, payload: dict[str, Any], *, client_id: str | None = None,
                front: bool = False, job_id: str | None = None) -> Job:
        """Add a job; committed (durable) when this returns."""
        job_id = job_id or str(uuid.uuid4())
        data = json.dumps(payload)
        with self._tx() as db:
            if front:
                row = db.execute("SELECT MIN(number) FROM jobs WHERE status=?",
                                 (PENDING,)).fetchone()
                number = min(-1, (row[0] or 0) - 1)
            else:
                row = db.execute("SELECT MAX(number) FROM jobs").fetchone()
                number = max(0, (row[0] or 0) + 1) if row[0] is not None else 0
            db.execute(
                "INSERT INTO jobs (id, number, kind, payload, client_id, status, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, number, kind, data, client_id, PENDING, time.time()),
            )
        return self.get(job_id)

    def get(self, job_id: str) -> Job | None:
        row = self._db().execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
        return Job.from_row(row) if row else None

    def pending(self) -> list[Job]:
        rows = self._db().execute(
            "SELECT * FROM jobs WHERE status=? ORDER BY number", (PENDING,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def running(self) -> list[Job]:
        rows = self._db().execute(
            "SELECT * FROM jobs WHERE status=? ORDER BY started", (RUNNING,)).fetchall()
        return [Job.from_row(r) for r in rows]

    def count_pending(self) -> int:
        return self._db().execute("SELECT COUNT(*) FROM jobs WHERE status=?",
                                  (PENDING,)).fetchone()[0]

    def history(self, max_items: int | None = None, job_id: str | None = None) -> list[Job]:
        """Finished jobs (success, error, interrupted), oldest first (ComfyUI's order)."""
        marks = ",".join("?" * len(FINAL))
        sql = f"SELECT * FROM jobs WHERE status IN ({marks}) AND in_history=1"
        args: list[Any] = list(FINAL)
        if job_id is not None:
            sql += " AND id=?"
            args.append(job_id)
        sql += " ORDER BY finished DESC"
        if max_items is not None:
            sql += " LIMIT ?"
            args.append(int(max_items))
        rows = self._db().execute(sql, args).fetchall()
        return [Job.from_row(r) for r in reversed(rows)]

    def cancel(self, job_ids: list[str] | None = None) -> int:
        """Remove pending jobs from the queue (all when ``job_ids`` is None); returns how many.
        A job already running is not touched here: see :meth:`interrupt`."""
        with self._tx() as db:
            if job_ids is None:
                cur = db.execute("UPDATE jobs SET status=?, finished=? WHERE status=?",
                                 (CANCELLED, time.time(), PENDING))
                return cur.rowcount
            n = 0
            for job_id in job_ids:
                n += db.execute("UPDATE jobs SET status=?, finished=? WHERE id=? AND status=?",
                                (CANCELLED, time.time(), job_id, PENDING)).rowcount
            return n

    def interrupt(self, job_id: str | None = None) -> int:
        """Ask the worker(s) running ``job_id`` (all running jobs when None) to stop."""
        with self._tx() as db:
            if job_id is None:
                return db.execute("UPDATE jobs SET cancel_requested=1 WHERE status=?",
                                  (RUNNING,)).rowcount
            return db.execute(
                "UPDATE jobs SET cancel_requested=1 WHERE id=? AND status IN (?, ?)",
                (job_id, RUNNING, PENDING)).rowcount

    def move_to_front(self, job_id: str) -> bool:
        with self._tx() as db:
            row = db.execute("SELECT MIN(number) FROM jobs WHERE status=?",
                             (PENDING,)).fetchone()
            number = min(-1, (row[0] or 0) - 1)
            return db.execute("UPDATE jobs SET number=? WHERE id=? AND status=?",
                              (number, job_id, PENDING)).rowcount == 1

    def delete_history(self, job_ids: list[str] | None = None) -> int:
        marks = ",".join("?" * len(FINAL))
        with self._tx() as db:
            if job_ids is None:
                return db.execute(f"UPDATE jobs SET in_history=0 WHERE status IN ({marks})",
                                  FINAL).rowcount
            return sum(
                db.execute(f"UPDATE jobs SET in_history=0 WHERE id=? AND status IN ({marks})",
                           (job_id, *FINAL)).rowcount
                for job_id in job_ids
            )

    # ---- consumers (workers) ------------------------------------------------------------

    def claim(self, owner: str, lease_seconds: float) -> Job | None:
        """Take the next job: a running job whose lease expired first, else the first pending
        one.  Returns None when there is nothing to do."""
        now = time.time()
        with self._tx() as db:
            row = db.execute(
                "SELECT id, attempt FROM jobs WHERE status=? AND lease_expires < ? "
                "ORDER BY started LIMIT 1", (RUNNING, now)).fetchone()
            if row is None:
                row = db.execute("SELECT id, attempt FROM jobs WHERE status=? "
                                 "ORDER BY number LIMIT 1", (PENDING,)).fetchone()
            if row is None:
                return None
            if row["attempt"] >= self.max_attempts:
                result = {"error": {
                    "type": "worker_lost",
                    "message": f"the worker running this job stopped {row['attempt']} times "
                               "(crash, kill or lost lease); the job is not retried again",
                }}
                db.execute("UPDATE jobs SET status=?, finished=?, result=?, lease_owner=NULL "
                           "WHERE id=?", (ERROR, now, json.dumps(result), row["id"]))
                return None
            db.execute(
                "UPDATE jobs SET status=?, attempt=attempt+1, lease_owner=?, lease_expires=?, "
                "started=? WHERE id=?",
                (RUNNING, owner, now + lease_seconds, now, row["id"]),
            )
        return self.get(row["id"])

    def renew(self, job: Job, owner: str, lease_seconds: float) -> tuple[bool, bool]:
        """Extend the lease; returns (still ours, cancel requested)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET lease_expires=? WHERE id=? AND attempt=? AND lease_owner=? "
                "AND status=?", (time.time() + lease_seconds, job.id, job.attempt, owner, RUNNING))
            row = db.execute("SELECT cancel_requested FROM jobs WHERE id=?", (job.id,)).fetchone()
        return cur.rowcount == 1, bool(row and row[0])

    def finish(self, job: Job, owner: str, status: str, result: dict[str, Any]) -> bool:
        """Record the outcome of this attempt; False (and nothing written) when the attempt is
        no longer the job's current one (its lease expired and another worker took it)."""
        if status not in FINAL:
            raise ValueError(f"status must be one of {FINAL}, got {status!r}")
        with self._tx() as db:
            cur = db.execute(
                "UPDATE jobs SET status=?, result=?, finished=?, lease_owner=NULL "
                "WHERE id=? AND attempt=? AND lease_owner=? AND status=?",
                (status, json.dumps(result), time.time(), job.id, job.attempt, owner, RUNNING))
            return cur.rowcount == 1

    def release(self, job: Job, owner: str) -> bool:
        """Give a claimed job back (a worker shutting down): pending again, attempt undone."""
        with self._tx() as db:
            return db.execute(
                "UPDATE jobs SET status=?, attempt=attempt-1, lease_owner=NULL, "
                "lease_expires=NULL WHERE id=? AND attempt=? AND lease_owner=? AND status=?",
                (PENDING, job.id, job.attempt, owner, RUNNING)).rowcount == 1

    def release_dead(self, host: str | None = None) -> int:
        """Expire the leases of jobs held by dead worker processes of this host right away,
        instead of waiting for their leases to run out."""
        host = host or socket.gethostname()
        freed = 0
        with self._tx() as db:
            rows = db.execute("SELECT id, lease_owner FROM jobs WHERE status=?",
                              (RUNNING,)).fetchall()
            for row in rows:
                owner_host, _, rest = (row["lease_owner"] or "").partition(":")
                pid = rest.partition(":")[0]
                if owner_host == host and pid.isdigit() and not _pid_alive(int(pid)):
                    freed += db.execute("UPDATE jobs SET lease_expires=0 WHERE id=?",
                                        (row["id"],)).rowcount
        return freed

    # ---- events -------------------------------------------------------------------------

    def publish(self, type: str, data: dict[str, Any], *, job_id: str | None = None,
                client_id: str | None = None, blob: bytes | None = None) -> None:
        with self._tx() as db:
            db.execute(
                "INSERT INTO events (job_id, client_id, type, data, blob, created) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, client_id, type, json.dumps(data), blob, time.time()))

    def events_after(self, seq: int, limit: int = 500) -> list[Event]:
        rows = self._db().execute(
            "SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT ?", (seq, limit)).fetchall()
        return [Event(r["seq"], r["job_id"], r["client_id"], r["type"], json.loads(r["data"]),
                      r["blob"]) for r in rows]

    def last_seq(self) -> int:
        return self._db().execute("SELECT COALESCE(MAX(seq), 0) FROM events").fetchone()[0]

    def latest_event(self, job_id: str, type: str) -> Event | None:
        r = self._db().execute(
            "SELECT * FROM events WHERE job_id=? AND type=? ORDER BY seq DESC LIMIT 1",
            (job_id, type)).fetchone()
        if r is None:
            return None
        return Event(r["seq"], r["job_id"], r["client_id"], r["type"], json.loads(r["data"]),
                     r["blob"])

    def prune_events(self, older_than_seconds: float = 600.0) -> int:
        with self._tx() as db:
            return db.execute("DELETE FROM events WHERE created < ?",
                              (time.time() - older_than_seconds,)).rowcount

    # ---- options (A1111 /options) -------------------------------------------------------

    def options(self) -> dict[str, Any]:
        rows = self._db().execute("SELECT key, value FROM options").fetchall()
        return {r["key"]: json.loads(r["value"]) for r in rows}

    def set_options(self, values: dict[str, Any]) -> None:
        with self._tx() as db:
            for key, value in values.items():
                db.execute("INSERT INTO options (key, value) VALUES (?, ?) ON CONFLICT(key) "
                           "DO UPDATE SET value=excluded.value", (key, json.dumps(value)))


class _Transaction:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): one writer at a time."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        self.db.execute("ROLLBACK" if exc_type else "COMMIT")
