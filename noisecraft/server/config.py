"""Server configuration: frozen dataclasses built once (by ``cli.py``), and the data folders.

Layout of ``data_dir``::

    queue.db             the job queue, history and event log (SQLite, WAL; unused with
                         --queue redis, where they live in Redis)
    input/               uploads (/upload/image) and images sent with A1111 requests
    output/              generated images
    temp/                previews and temporary images
    models/checkpoints/  checkpoints offered by name (/models/checkpoints, sd-models)
    models/loras/        LoRA files
    models/embeddings/   textual-inversion embeddings
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

LOCAL_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
MODEL_FOLDERS = ("checkpoints", "loras", "embeddings", "vae")
MODEL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class ConfigError(ValueError):
    """A server setting that cannot work; the message says which and what to do instead."""


@dataclass(frozen=True)
class Auth:
    """HTTP Basic credentials (``--api-auth user:pass``) and/or an API key (``--api-key``,
    sent as ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``)."""

    basic: tuple[str, str] | None = None
    api_key: str | None = None

    @property
    def enabled(self) -> bool:
        return self.basic is not None or self.api_key is not None

    @classmethod
    def parse(cls, api_auth: str | None = None, api_key: str | None = None) -> Auth:
        basic = None
        if api_auth is not None:
            user, sep, password = api_auth.partition(":")
            if not sep or not user or not password:
                raise ConfigError(
                    f"--api-auth must look like USER:PASSWORD (both non-empty), got {api_auth!r}"
                )
            basic = (user, password)
        if api_key is not None and len(api_key) < 8:
            raise ConfigError("--api-key must be at least 8 characters long")
        return cls(basic=basic, api_key=api_key)


@dataclass(frozen=True)
class Limits:
    """Bounds on what one request may send."""

    max_body_bytes: int = 64 << 20  # a whole request (JSON with base64 images, uploads)
    max_image_pixels: int = 4096 * 4096  # decoded size of any uploaded or embedded image
    max_batch: int = 16  # images per job (A1111 batch_size * n_iter, /api/generate)
    max_steps: int = 500
    max_queue: int = 10_000  # pending jobs before /prompt answers 503


@dataclass(frozen=True)
class Folders:
    """The data folders (see the module docstring); ``create()`` makes them."""

    root: Path

    @property
    def db(self) -> Path:
        return self.root / "queue.db"

    @property
    def input(self) -> Path:
        return self.root / "input"

    @property
    def output(self) -> Path:
        return self.root / "output"

    @property
    def temp(self) -> Path:
        return self.root / "temp"

    def models(self, kind: str) -> Path:
        if kind not in MODEL_FOLDERS:
            raise ConfigError(f"unknown model folder {kind!r}; known: {', '.join(MODEL_FOLDERS)}")
        return self.root / "models" / kind

    def of_type(self, kind: str) -> Path:
        """The folder of a ComfyUI file ``type``: input, output or temp."""
        folders = {"input": self.input, "output": self.output, "temp": self.temp}
        if kind not in folders:
            raise ConfigError(f"unknown folder type {kind!r}; choose one of: input, output, temp")
        return folders[kind]

    def create(self) -> Folders:
        for path in (self.input, self.output, self.temp,
                     *(self.models(k) for k in MODEL_FOLDERS)):
            path.mkdir(parents=True, exist_ok=True)
        return self

    def model_names(self, kind: str) -> list[str]:
        """Model files under ``models/KIND`` (relative POSIX paths, sorted)."""
        root = self.models(kind)
        if not root.is_dir():
            return []
        return sorted(
            p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in MODEL_SUFFIXES
        )


QUEUE_BACKENDS = ("sqlite", "redis")
REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(frozen=True)
class QueueConfig:
    """Where the queue lives and its lease timing.  ``backend`` "sqlite": ``queue.db`` in
    the data folder (one machine); "redis": the Redis server at ``redis_url`` (workers on
    many machines sharing the data folder).  A worker renews its lease every
    ``lease_seconds / 4``; a job whose worker died or hung (lease expired; on Redis: no
    heartbeat for ``lease_seconds``) is run again by another worker."""

    lease_seconds: float = 30.0
    poll_seconds: float = 0.2
    backend: str = "sqlite"
    redis_url: str | None = None

    def check(self) -> QueueConfig:
        if self.backend not in QUEUE_BACKENDS:
            raise ConfigError(f"--queue must be one of {', '.join(QUEUE_BACKENDS)}, "
                              f"got {self.backend!r}")
        if self.backend == "sqlite":
            if self.redis_url:
                raise ConfigError(
                    "--redis-url (or NOISECRAFT_REDIS_URL) is set but --queue is sqlite; "
                    "pass --queue redis to use Redis, or unset the URL")
            return self
        if not self.redis_url:
            raise ConfigError("--queue redis needs --redis-url redis://HOST:PORT/DB "
                              "(or the NOISECRAFT_REDIS_URL environment variable)")
        scheme = self.redis_url.partition("://")[0]
        if scheme not in REDIS_SCHEMES or "://" not in self.redis_url:
            shown = self.redis_url.rpartition("@")[2]  # never print a password
            raise ConfigError(f"--redis-url must start with redis://, rediss:// or unix://, "
                              f"got {shown!r}")
        if self.lease_seconds < 2:
            raise ConfigError(
                f"--lease-seconds must be at least 2 with --queue redis, got "
                f"{self.lease_seconds}: workers send a heartbeat about once a second, and "
                "a shorter lease would give the jobs of living workers to others")
        return self


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8188
    data_dir: Path = Path("noisecraft-data")
    auth: Auth = field(default_factory=Auth)
    insecure: bool = False
    cors_allow: tuple[str, ...] = ()
    workers: int = 1  # worker processes started by `serve` (0: run `noisecraft worker` yourself)
    device: str | None = None
    limits: Limits = field(default_factory=Limits)
    queue: QueueConfig = field(default_factory=QueueConfig)
    web_dir: Path | None = None  # the web UI's static files, mounted at / when given
    compute_backend: str | None = None  # workers' Engine(backend=...); None: its default

    @property
    def folders(self) -> Folders:
        return Folders(Path(self.data_dir))

    def check(self) -> ServerConfig:
        """Refuse settings that would expose the server unsafely; returns self."""
        if not 0 <= self.port < 65536:
            raise ConfigError(f"--port must lie in [0, 65535], got {self.port}")
        if self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")
        self.queue.check()
        check_compute_backend(self.compute_backend, self.device)
        if not is_local(self.host) and not self.auth.enabled and not self.insecure:
            raise ConfigError(
                f"refusing to listen on {self.host!r} without authentication: anyone who can "
                "reach it could run jobs and read your images. Pass --api-auth USER:PASSWORD "
                "or --api-key KEY, or --insecure if the network is trusted, or listen on "
                "127.0.0.1."
            )
        for origin in self.cors_allow:
            if origin != "*" and not origin.startswith(("http://", "https://")):
                raise ConfigError(
                    f"--cors-allow takes origins like https://example.com, got {origin!r}"
                )
        return self


def check_compute_backend(name: str | None, device: str | None) -> None:
    """Refuse a ``--backend`` the workers' engine could not run (an unknown name, or a CPU
    backend on another device) before any worker starts."""
    if name is None:
        return
    import torch

    from noisecraft.backends.wrapped import engine_backend

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        engine_backend(name, torch.device(device), torch.float32)
    except ValueError as e:
        raise ConfigError(f"--backend: {e}") from None


def is_local(host: str) -> bool:
    """Whether ``host`` is a loopback name or address (only this machine can connect)."""
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class WorkerConfig:
    data_dir: Path = Path("noisecraft-data")
    device: str | None = None
    queue: QueueConfig = field(default_factory=QueueConfig)
    max_jobs: int | None = None  # exit after this many jobs (None: run until stopped)
    preview_every: int = 1  # publish a preview image every N sampler steps (0: never)
    compute_backend: str | None = None  # Engine(backend=...); None: the engine's default

    @property
    def folders(self) -> Folders:
        return Folders(Path(self.data_dir))

    def check(self) -> WorkerConfig:
        self.queue.check()
        check_compute_backend(self.compute_backend, self.device)
        return self
