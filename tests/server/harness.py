"""Real server processes for the HTTP tests: `noisecraft serve` on 127.0.0.1, a free port,
a temporary data folder holding a tiny random-weight SD1 checkpoint; always stopped."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny.safetensors"
START_TIMEOUT = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_tiny_model(data_dir: Path, cache: Path) -> Path:
    """Copy (once written) a tiny SD1 single-file checkpoint into models/checkpoints."""
    from tests.fixtures.checkpoints import write_single_file

    source = cache / MODEL
    if not source.exists():
        write_single_file(source, "sd1")
    target = data_dir / "models" / "checkpoints" / MODEL
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid:
            out.append(int(entry.name))
    return out


class Server:
    """``noisecraft serve`` in a subprocess.  Use as a context manager."""

    def __init__(self, data_dir: Path, *args: str, workers: int = 1, lease: float = 5.0,
                 env: dict[str, str] | None = None) -> None:
        """``env``: extra environment variables for the server and its workers (over the
        defaults ``PYTHONPATH`` = the repository and ``OMP_NUM_THREADS=1``)."""
        self.data_dir = Path(data_dir)
        self.env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = [sys.executable, "-m", "noisecraft.cli", "serve", "--host", "127.0.0.1",
                     "--port", str(self.port), "--data-dir", str(self.data_dir),
                     "--workers", str(workers), "--lease-seconds", str(lease), *args]
        self.proc: subprocess.Popen | None = None
        self.log = self.data_dir / f"server-{self.port}.log"

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **self.env}
        self._log = open(self.log, "wb")
        self.proc = subprocess.Popen(self.args, cwd=ROOT, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n"
                                   + self.log.read_text()[-3000:])
            try:
                self.get("/health")
                return self
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server did not answer within {START_TIMEOUT} s")

    def worker_pids(self) -> list[int]:
        return children(self.proc.pid) if self.proc else []

    def kill9(self) -> None:
        """kill -9 the server and its workers, as a power cut would stop them."""
        workers = self.worker_pids()
        for pid in [self.proc.pid, *workers]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(30)
        for pid in workers:
            _wait_gone(pid)
        self._log.close()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        workers = self.worker_pids()
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self._log.close()

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- HTTP -----------------------------------------------------------------------------

    def request(self, method: str, path: str, body=None, headers=None, timeout=120.0):
        data = None
        headers = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, r.read(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read(), dict(e.headers)

    def get(self, path: str, **kw):
        status, raw, _ = self.request("GET", path, **kw)
        return json.loads(raw) if status == 200 else (status, raw)

    def post(self, path: str, body, **kw):
        status, raw, _ = self.request("POST", path, body, **kw)
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw


def _wait_gone(pid: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        try:
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return  # a zombie: dead, waiting for its (killed) parent's reaper
        except OSError:
            return
        time.sleep(0.05)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
