"""Scale-out on Redis (``--queue redis``): the queue contract on a real ``redis-server``
started here, then a real server and two worker processes sharing one queue, one of them
killed (``kill -9``) mid-job: every job completes exactly once.

Needs ``redis-server`` (``scripts/ci_deps.sh`` installs it) and the ``redis`` extra; without
them the tests skip, except under CI (``CI`` set), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from noisecraft.server.backends.redis_queue import QUEUE_NAME as QUEUE
from noisecraft.server.config import ConfigError, QueueConfig
from tests.server.harness import MODEL, ROOT, Server, free_port, wait_until, write_tiny_model

JOBS = 20
LEASE = 5.0  # seconds without a heartbeat before a worker's job goes to another worker
REDIS_START_TIMEOUT = 30.0
# A worker process as a test starts it: one torch thread (the machine is shared), then the CLI.
WORKER_MAIN = ("import sys, torch; torch.set_num_threads(1); "
               "from noisecraft.cli import app; sys.exit(app(prog_name='noisecraft'))")


def _missing(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is missing under CI: run scripts/ci_deps.sh and install "
                    "'.[test]' (which includes the redis extra)")
    pytest.skip(f"{what} is missing (scripts/ci_deps.sh installs it)")


def need_packages() -> None:
    for module in ("redis", "dramatiq"):
        try:
            __import__(module)
        except ImportError:
            _missing(f"the Python package {module!r}")


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    """A private ``redis-server`` on 127.0.0.1, a free port and a temporary folder."""
    need_packages()
    binary = shutil.which("redis-server")
    if binary is None:
        _missing("redis-server")
    folder = tmp_path_factory.mktemp("redis")
    port = free_port()
    log = open(folder / "redis.log", "wb")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
         "--save", "", "--appendonly", "no", "--protected-mode", "yes"],
        stdout=log, stderr=subprocess.STDOUT)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1)
        deadline = time.monotonic() + REDIS_START_TIMEOUT
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited: {(folder / 'redis.log').read_text()}")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"redis-server silent after {REDIS_START_TIMEOUT} s") from None
                time.sleep(0.1)
        client.close()
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


@pytest.fixture
def queue(redis_url, request):
    from noisecraft.server.backends.redis_queue import RedisJobQueue

    q = RedisJobQueue(redis_url, lease_seconds=3.0, prefix=f"t-{request.node.name}")
    yield q
    q.close()


# ---- the contract, in one process ---------------------------------------------------------

def test_order_front_and_move_to_front(queue):
    a = queue.enqueue("generate", {"prompt": "a"}, client_id="c1")
    b = queue.enqueue("generate", {"prompt": "b"})
    c = queue.enqueue("generate", {"prompt": "c"}, front=True)
    assert c.number < a.number < b.number
    assert [j.id for j in queue.pending()] == [c.id, a.id, b.id]
    assert queue.move_to_front(b.id) and not queue.move_to_front("no-such-job")
    assert [j.id for j in queue.pending()] == [b.id, c.id, a.id]
    assert queue.get(a.id).client_id == "c1" and queue.get(a.id).payload == {"prompt": "a"}
    assert [queue.claim("w", 60).id for _ in range(3)] == [b.id, c.id, a.id]
    assert queue.claim("w", 60) is None
    assert [j.id for j in queue.running()] == [b.id, c.id, a.id]


def test_each_enqueue_release_and_takeover_sends_one_dramatiq_message(queue):
    queue.broker.flush_all()
    for i in range(3):
        queue.enqueue("generate", {"i": i})
    assert queue.broker.do_qsize(QUEUE) == 3
    assert queue.reannounce_pending() == 3
    assert queue.broker.do_qsize(QUEUE) == 6
    queue.broker.flush_all()
    job = queue.claim("w", 60)
    assert queue.broker.do_qsize(QUEUE) == 0  # a pending job took its token
    assert queue.release(job, "w") and queue.broker.do_qsize(QUEUE) == 1
    job = queue.claim("w", 2.0)
    wait_until(lambda: lease_expired(queue, job.id), 30, "the lease to expire", 0.1)
    assert queue.claim("w2", 60).id == job.id  # taken over: a replacement token goes out
    assert queue.broker.do_qsize(QUEUE) == 2


def lease_expired(queue, job_id: str) -> bool:
    seconds, micros = queue.redis.time()
    return queue.redis.zscore(queue.key("leases"), job_id) < seconds + micros / 1e6


def test_expired_lease_first_and_completed_once(queue):
    job = queue.enqueue("generate", {"prompt": "x"})
    other = queue.enqueue("generate", {"prompt": "y"})
    first = queue.claim("worker-a", 2.0)
    assert first.id == job.id and first.attempt == 1 and first.status == "running"
    assert queue.renew(first, "worker-a", 2.0) == (True, False)
    wait_until(lambda: lease_expired(queue, job.id), 30, "the lease to expire", 0.1)
    second = queue.claim("worker-b", 60)  # before the pending job: worker-a is presumed dead
    assert second.id == job.id and second.attempt == 2
    assert queue.renew(first, "worker-a", 60) == (False, False)
    assert not queue.finish(first, "worker-a", "success", {"outputs": {"late": 1}})
    assert queue.finish(second, "worker-b", "success", {"outputs": {}})
    assert not queue.finish(second, "worker-b", "success", {"outputs": {"twice": 1}})
    done = queue.get(job.id)
    assert done.status == "success" and done.result == {"outputs": {}}
    assert [h.id for h in queue.history()] == [job.id]
    assert queue.claim("worker-c", 60).id == other.id  # a finished job is not run again


def test_gives_up_after_max_attempts(queue):
    job = queue.enqueue("generate", {})
    for attempt in range(1, queue.max_attempts + 1):
        claimed = queue.claim(f"w{attempt}", 2.0)
        assert claimed.id == job.id and claimed.attempt == attempt
        wait_until(lambda: lease_expired(queue, job.id), 30, "the lease to expire", 0.1)
    assert queue.claim("w-last", 60) is None
    failed = queue.get(job.id)
    assert failed.status == "error" and failed.result["error"]["type"] == "worker_lost"
    assert queue.history(job_id=job.id)[0].id == job.id
    assert queue.running() == []


def test_cancel_interrupt_release_and_history(queue):
    a, b, c = (queue.enqueue("generate", {"n": n}) for n in range(3))
    assert queue.cancel([b.id, "no-such-job"]) == 1
    assert queue.get(b.id).status == "cancelled"
    running = queue.claim("w", 60)
    assert running.id == a.id
    assert queue.cancel([a.id]) == 0  # running jobs are interrupted, not cancelled
    assert queue.renew(running, "w", 60) == (True, False)
    assert queue.interrupt(a.id) == 1
    assert queue.renew(running, "w", 60) == (True, True)
    assert queue.release(running, "w")
    assert [j.id for j in queue.pending()] == [a.id, c.id]
    assert queue.get(a.id).attempt == 0
    assert queue.cancel() == 2 and queue.count_pending() == 0
    assert queue.claim("w", 60) is None
    job = queue.enqueue("generate", {})
    claimed = queue.claim("w", 60)
    assert queue.finish(claimed, "w", "error", {"error": {"type": "X", "message": "m"}})
    assert [h.id for h in queue.history()] == [job.id]
    assert queue.delete_history([job.id]) == 1 and queue.history() == []
    assert queue.get(job.id).status == "error"


def test_events_options_and_pruning(queue):
    queue.publish("progress", {"value": 1}, job_id="j", client_id="c")
    queue.publish("preview", {"image_type": 1}, job_id="j", blob=b"\xff\xd8jpeg")
    queue.publish("status", {})
    events = queue.events_after(0)
    assert [(e.seq, e.type, e.client_id) for e in events] == [
        (1, "progress", "c"), (2, "preview", None), (3, "status", None)]
    assert events[1].blob == b"\xff\xd8jpeg" and events[0].blob is None
    assert [e.seq for e in queue.events_after(2)] == [3] and queue.last_seq() == 3
    assert queue.latest_event("j", "preview").blob == b"\xff\xd8jpeg"
    assert queue.latest_event("j", "executed") is None
    assert queue.prune_events(3600) == 0 and queue.prune_events(0) == 3
    assert queue.events_after(0) == []
    queue.set_options({"sd_model_checkpoint": "tiny", "CLIP_stop_at_last_layers": 2})
    assert queue.options() == {"sd_model_checkpoint": "tiny", "CLIP_stop_at_last_layers": 2}


def test_config_errors_teach():
    assert QueueConfig().check().backend == "sqlite"
    cases = [
        (QueueConfig(backend="mysql"), "--queue must be one of sqlite, redis"),
        (QueueConfig(backend="redis"), "needs --redis-url"),
        (QueueConfig(backend="redis", redis_url="localhost:6379"), "must start with redis://"),
        (QueueConfig(redis_url="redis://h:1/0"), "pass --queue redis"),
        (QueueConfig(backend="redis", redis_url="redis://h:1/0", lease_seconds=1),
         "at least 2"),
    ]
    for config, message in cases:
        with pytest.raises(ConfigError, match=message):
            config.check()


def test_unreachable_redis_is_a_clear_error():
    from noisecraft.server.backends.redis_queue import RedisJobQueue

    need_packages()
    url = f"redis://:secret@127.0.0.1:{free_port()}/0"
    with pytest.raises(ConfigError, match="cannot reach Redis") as info:
        RedisJobQueue(url)
    assert "secret" not in str(info.value)


# ---- a server and two workers, one killed mid-job -------------------------------------------


def start_worker(data: Path, url: str, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
           "NOISECRAFT_REDIS_URL": url}
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", WORKER_MAIN, "worker", "--queue", "redis", "--data-dir",
             str(data), "--lease-seconds", str(LEASE)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def stop_worker(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def jobs_in_redis(client) -> dict[str, dict[str, str]]:
    out = {}
    for key in client.scan_iter(match="noisecraft:job:*", count=1000):
        out[key.decode().rpartition(":")[2]] = {
            k.decode(): v.decode() for k, v in client.hgetall(key).items()}
    return out


def pid_of(owner: str) -> int | None:
    """The pid in a worker identity ``host:pid:random`` (None for an empty owner)."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def kill_mid_job(client, workers: list[subprocess.Popen]) -> tuple[int, str] | None:
    """SIGSTOP each worker in turn; the first that has finished a job and now runs another is
    killed (-9) right there: returns (its index, that job's id).  None: look again later."""
    for index, worker in enumerate(workers):
        if worker.poll() is not None:
            raise RuntimeError(f"worker {worker.pid} exited with {worker.returncode}")
        os.kill(worker.pid, signal.SIGSTOP)
        jobs = jobs_in_redis(client)
        finished = [j for j in jobs.values() if pid_of(j.get("finished_by", "")) == worker.pid]
        running = [i for i, j in jobs.items()
                   if j["status"] == "running" and pid_of(j.get("owner", "")) == worker.pid]
        if finished and running:
            os.kill(worker.pid, signal.SIGKILL)
            worker.wait(30)
            return index, running[0]
        os.kill(worker.pid, signal.SIGCONT)
    return None


@pytest.mark.timeout(900)
def test_two_workers_share_the_queue_and_a_killed_workers_job_runs_once(
        redis_url, tmp_path, tmp_path_factory):
    import redis

    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    data = tmp_path / "data"
    write_tiny_model(data, tmp_path_factory.getbasetemp())
    body = {"prompt": "a red circle", "model": MODEL, "steps": 2, "width": 64, "height": 64,
            "wait": False}
    server = Server(data, "--queue", "redis", "--redis-url", redis_url, workers=0, lease=LEASE)
    workers: list[subprocess.Popen] = []
    try:
        server.start()
        workers = [start_worker(data, redis_url, tmp_path / f"worker{i}.log") for i in range(2)]
        acknowledged = []
        for i in range(JOBS):
            status, answer = server.post("/api/generate", {**body, "seed": i})
            assert status == 202, answer
            acknowledged.append(answer["prompt_id"])
        index, killed_job = wait_until(lambda: kill_mid_job(client, workers), 600,
                                       "a worker finishing a job and running another",
                                       interval=0.05)
        victim, survivor = workers[index], workers[1 - index]
        wait_until(lambda: len(server.get("/history")) == JOBS, 600, "every job in history")
        history = server.get("/history")
        queue = server.get("/queue")
    finally:
        for proc in workers:
            stop_worker(proc)
        server.stop()
    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("worker*.log"))

    assert sorted(history) == sorted(acknowledged), logs
    assert queue == {"queue_running": [], "queue_pending": []}
    jobs = jobs_in_redis(client)
    assert all(jobs[i]["status"] == "success" for i in acknowledged), logs
    by_worker = Counter(pid_of(jobs[i]["finished_by"]) for i in acknowledged)
    assert set(by_worker) == {victim.pid, survivor.pid}, by_worker  # both took jobs
    assert jobs[killed_job]["attempt"] == "2"  # given back once, run again by the survivor
    assert pid_of(jobs[killed_job]["finished_by"]) == survivor.pid

    # exactly once: one successful finish per job (one job_finished event each) ...
    from noisecraft.server.backends.redis_queue import RedisJobQueue

    events = RedisJobQueue(redis_url).events_after(0, limit=100_000)
    finishes = Counter(e.job_id for e in events if e.type == "job_finished")
    assert finishes == Counter({i: 1 for i in acknowledged})
    # ... and one image each, in the shared output folder, named by the finishing attempt
    images = []
    for entry in history.values():
        assert entry["status"]["status_str"] == "success", entry["status"]
        outs = entry["outputs"]["generate"]["images"]
        assert len(outs) == 1 and (data / "output" / outs[0]["filename"]).is_file()
        images.append(outs[0]["filename"])
    assert len(set(images)) == JOBS
    killed_attempt = f"noisecraft_{killed_job[:8]}_1_"  # the killed worker's unfinished file
    stray = [p.name for p in (data / "output").glob("*.png")
             if p.name not in images and not p.name.startswith(killed_attempt)]
    assert stray == []
    assert json.loads(jobs[killed_job]["result"])["outputs"]["generate"]["images"][0][
        "filename"].startswith(f"noisecraft_{killed_job[:8]}_2_")
