"""kill -9 of server and worker mid-queue: after a restart every acknowledged job completes,
exactly once."""

from __future__ import annotations

import sqlite3

import pytest

from tests.server.harness import MODEL, Server, wait_until, write_tiny_model

JOBS = 5


@pytest.mark.timeout(600)
def test_kill_9_mid_queue_then_restart(tmp_path, tmp_path_factory):
    data = tmp_path / "data"
    write_tiny_model(data, tmp_path_factory.getbasetemp())
    body = {"prompt": "a red circle", "model": MODEL, "steps": 3, "width": 64, "height": 64,
            "wait": False}
    acknowledged = []
    server = Server(data, lease=3.0).start()
    try:
        for i in range(JOBS):
            status, answer = server.post("/api/generate", {**body, "seed": i})
            assert status == 202, answer
            acknowledged.append(answer["prompt_id"])

        def one_done_and_one_running():
            q = server.get("/queue")
            return len(server.get("/history")) >= 1 and len(q["queue_running"]) == 1

        wait_until(one_done_and_one_running, 300, "a finished job and a running one")
    finally:
        server.kill9()

    with sqlite3.connect(data / "queue.db") as db:  # what survived the kill
        rows = dict(db.execute("SELECT id, status FROM jobs").fetchall())
    assert set(rows) == set(acknowledged)
    assert "running" in rows.values() and "pending" in rows.values()
    interrupted = [k for k, v in rows.items() if v == "running"]

    with Server(data, lease=3.0) as again:
        wait_until(lambda: len(again.get("/history")) == JOBS, 400, "every job in history")
        history = again.get("/history")
        queue = again.get("/queue")
    assert sorted(history) == sorted(acknowledged)
    assert queue == {"queue_running": [], "queue_pending": []}
    images = []
    for entry in history.values():
        assert entry["status"]["status_str"] == "success", entry["status"]
        outs = entry["outputs"]["generate"]["images"]
        assert len(outs) == 1
        images.append(outs[0]["filename"])
        assert (data / "output" / outs[0]["filename"]).is_file()
    assert len(set(images)) == JOBS
    with sqlite3.connect(data / "queue.db") as db:
        attempts = dict(db.execute("SELECT id, attempt FROM jobs").fetchall())
    assert all(attempts[i] >= 2 for i in interrupted)  # the killed job ran again
    produced = sorted(p.name for p in (data / "output").glob("*.png"))
    assert produced == sorted(images)  # no second completed result of any job
