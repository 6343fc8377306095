"""The durable queue's contract, in one process: order, front, leases, once-only completion."""

from __future__ import annotations

import sqlite3

import pytest

from noisecraft.server.jobqueue import (
    CANCELLED,
    ERROR,
    PENDING,
    RUNNING,
    SUCCESS,
    JobQueue,
)


@pytest.fixture
def queue(tmp_path):
    q = JobQueue(tmp_path / "queue.db")
    yield q
    q.close()


def test_wal_mode_and_fifo_order(queue):
    ids = [queue.enqueue("generate", {"prompt": f"p{i}"}).id for i in range(3)]
    mode = sqlite3.connect(queue.path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    assert [j.id for j in queue.pending()] == ids
    numbers = [j.number for j in queue.pending()]
    assert numbers == sorted(numbers) and len(set(numbers)) == 3
    claimed = [queue.claim("w", 60).id for _ in range(3)]
    assert claimed == ids
    assert queue.claim("w", 60) is None


def test_front_and_move_to_front(queue):
    a = queue.enqueue("generate", {"prompt": "a"})
    b = queue.enqueue("generate", {"prompt": "b"})
    c = queue.enqueue("generate", {"prompt": "c"}, front=True)
    assert c.number < a.number
    assert [j.id for j in queue.pending()] == [c.id, a.id, b.id]
    assert queue.move_to_front(b.id)
    assert [j.id for j in queue.pending()] == [b.id, c.id, a.id]
    assert not queue.move_to_front("no-such-job")


def test_payload_survives_reopening(tmp_path):
    q = JobQueue(tmp_path / "q.db")
    job = q.enqueue("workflow", {"prompt": {"1": {"class_type": "X", "inputs": {}}}},
                    client_id="c1")
    q.close()
    q2 = JobQueue(tmp_path / "q.db")
    again = q2.get(job.id)
    assert again.payload == job.payload and again.client_id == "c1"
    assert again.status == PENDING
    q2.close()


def test_expired_lease_is_reclaimed_and_stale_attempt_cannot_complete(queue):
    job = queue.enqueue("generate", {"prompt": "x"})
    first = queue.claim("worker-1", lease_seconds=-1)  # lease already expired
    assert first.attempt == 1 and first.status == RUNNING
    second = queue.claim("worker-2", lease_seconds=60)
    assert second.id == job.id and second.attempt == 2
    assert queue.renew(first, "worker-1", 60) == (False, False)
    assert not queue.finish(first, "worker-1", SUCCESS, {"outputs": {"stale": 1}})
    assert queue.finish(second, "worker-2", SUCCESS, {"outputs": {"ok": 1}})
    assert not queue.finish(second, "worker-2", SUCCESS, {"outputs": {"again": 1}})
    history = queue.history()
    assert [h.id for h in history] == [job.id]
    assert history[0].result == {"outputs": {"ok": 1}}


def test_job_that_keeps_killing_workers_becomes_an_error(tmp_path):
    q = JobQueue(tmp_path / "q.db", max_attempts=2)
    job = q.enqueue("generate", {"prompt": "x"})
    assert q.claim("a", -1).attempt == 1
    assert q.claim("b", -1).attempt == 2
    assert q.claim("c", 60) is None
    done = q.get(job.id)
    assert done.status == ERROR and "not retried" in done.result["error"]["message"]
    q.close()


def test_cancel_interrupt_release(queue):
    a = queue.enqueue("generate", {"prompt": "a"})
    b = queue.enqueue("generate", {"prompt": "b"})
    c = queue.enqueue("generate", {"prompt": "c"})
    running = queue.claim("w", 60)
    assert running.id == a.id
    assert queue.cancel([b.id, a.id]) == 1  # only the pending one
    assert queue.get(b.id).status == CANCELLED
    assert queue.renew(running, "w", 60) == (True, False)
    assert queue.interrupt() == 1
    assert queue.renew(running, "w", 60) == (True, True)
    assert queue.release(running, "w")
    assert queue.get(a.id).status == PENDING and queue.get(a.id).attempt == 0
    assert queue.cancel() == 2
    assert queue.pending() == [] and queue.get(c.id).status == CANCELLED
    assert queue.history() == []


def test_release_dead_frees_leases_of_dead_local_pids(queue):
    import socket
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    job = queue.enqueue("generate", {"prompt": "x"})
    queue.claim(f"{socket.gethostname()}:{proc.pid}:dead", lease_seconds=3600)
    assert queue.claim("other", 60) is None
    assert queue.release_dead() == 1
    again = queue.claim("other", 60)
    assert again.id == job.id and again.attempt == 2


def test_history_delete_and_events(queue):
    job = queue.enqueue("generate", {"prompt": "x"}, client_id="c")
    claimed = queue.claim("w", 60)
    queue.publish("progress", {"value": 1, "max": 2}, job_id=job.id, client_id="c")
    queue.publish("preview", {}, job_id=job.id, client_id="c", blob=b"\x89PNG")
    assert queue.finish(claimed, "w", SUCCESS, {"outputs": {}})
    events = queue.events_after(0)
    assert [e.type for e in events] == ["progress", "preview"]
    assert events[1].blob == b"\x89PNG" and events[0].data == {"value": 1, "max": 2}
    assert queue.events_after(events[-1].seq) == []
    assert queue.latest_event(job.id, "preview").blob == b"\x89PNG"
    assert queue.delete_history([job.id]) == 1
    assert queue.history() == []


def test_options_round_trip(queue):
    queue.set_options({"sd_model_checkpoint": "a.safetensors", "n": 3})
    queue.set_options({"n": 4})
    assert queue.options() == {"sd_model_checkpoint": "a.safetensors", "n": 4}
