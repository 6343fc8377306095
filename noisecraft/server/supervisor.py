"""Worker processes started next to the server (``serve --workers N``).

Each worker is ``python -m noisecraft.cli worker --data-dir DIR`` (plus ``--queue redis``,
with the URL in ``NOISECRAFT_REDIS_URL`` so that no password shows in the process list): the
same command one runs on another machine sharing the data folder.  A worker that dies is
started again (after a short pause that grows while it keeps dying); its job runs again:
on SQLite the new worker frees the dead one's lease at once (``JobQueue.release_dead``), on
Redis another worker takes it when the dead one's heartbeat is ``lease_seconds`` old.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

from noisecraft.server.config import ServerConfig

log = logging.getLogger(__name__)
REDIS_URL_ENV = "NOISECRAFT_REDIS_URL"  # read by `noisecraft serve/worker --redis-url`


def worker_command(config: ServerConfig) -> list[str]:
    cmd = [sys.executable, "-m", "noisecraft.cli", "worker", "--data-dir", str(config.data_dir),
           "--lease-seconds", str(config.queue.lease_seconds),
           "--poll-seconds", str(config.queue.poll_seconds)]
    if config.device:
        cmd += ["--device", config.device]
    if config.compute_backend:
        cmd += ["--backend", config.compute_backend]
    if config.queue.backend != "sqlite":
        cmd += ["--queue", config.queue.backend]
    return cmd


def worker_env(config: ServerConfig) -> dict[str, str]:
    env = os.environ.copy()
    if config.queue.redis_url:
        env[REDIS_URL_ENV] = config.queue.redis_url
    return env


class Supervisor:
    """Keeps ``config.workers`` worker processes running until :meth:`stop`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.procs: list[subprocess.Popen | None] = [None] * config.workers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="worker-supervisor",
                                        daemon=True)

    def start(self) -> Supervisor:
        for i in range(len(self.procs)):
            self.procs[i] = self._spawn()
        self._thread.start()
        return self

    def _spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(worker_command(self.config), env=worker_env(self.config))
        log.info("started worker pid %d", proc.pid)
        return proc

    def _watch(self) -> None:
        delay = 0.5
        while not self._stop.wait(delay):
            restarted = False
            for i, proc in enumerate(self.procs):
                if proc is not None and proc.poll() is not None and not self._stop.is_set():
                    log.warning("worker pid %d exited with %s; starting another", proc.pid,
                                proc.returncode)
                    self.procs[i] = self._spawn()
                    restarted = True
            delay = min(10.0, delay * 2) if restarted else 0.5

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p is not None and p.poll() is None]

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every worker (each gives its running job back), then SIGKILL stragglers."""
        self._stop.set()
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            if proc is None:
                continue
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._thread.is_alive():
            self._thread.join(timeout)
