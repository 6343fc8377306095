"""The engine's side of the backends: which backend an engine runs, and the wrapped modules
it keeps - one per source module, made the first time that module runs.

:func:`engine_backend` resolves ``Engine(backend=...)`` (a name, a :class:`Backend`, or None
for the default).  :class:`WrappedModules` holds what the backend made of each U-Net, VAE
(as a :class:`BackendVAE`), ControlNet and preview decoder the engine ran, so oneDNN weight
packing, ``torch.compile`` and OpenVINO conversion happen once per module, not once per
request.

The key is the source module's *identity*: a LoRA'd copy (``lora_bundle``) is another
module, so it is wrapped on its own, after the merge; the cached base model keeps its wrapped
form.  A module whose weights were changed in place after wrapping would keep running the
old ones (the backends hold their own packed / compiled view), which is why the engine never
changes a loaded model in place and forgets the wrapped forms of a re-registered bundle.

Lifetime: a record is *bound* when the engine's model cache holds its source (the engine
releases it when that model leaves the cache); other sources (a graph's LoRA'd copies, a VAE
from a VAELoader node) are kept least-recently-used, at most ``max_unbound`` of them, and are
the first to go when the engine's cache is over its memory bound.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from noisecraft.backends import (
    DEFAULT_BACKEND,
    AcceleratedModule,
    Backend,
    TorchKnobs,
    VAEEncode,
    get_backend,
)
from noisecraft.models.vae import DiagonalGaussian


def engine_backend(backend: str | Backend | None, device: torch.device,
                   dtype: torch.dtype) -> Backend:
    """The backend an engine on ``device`` with weights in ``dtype`` runs.

    None: :data:`~noisecraft.backends.DEFAULT_BACKEND` ("onednn", float32-exact) on a CPU
    with float32 weights and a oneDNN-enabled PyTorch, else "eager" (the modules as they are).
    Any backend but "eager" runs on the CPU and takes float32 weights (the ``*_bf16`` ones
    make their own bf16 copy); other combinations are refused, saying what would work.
    """
    if backend is None:
        fast = device.type == "cpu" and dtype == torch.float32 \
            and torch.backends.mkldnn.is_available()
        return get_backend(DEFAULT_BACKEND if fast else "eager")
    if isinstance(backend, str):
        backend = get_backend(backend)  # an unknown name: ValueError listing the valid ones
    elif not isinstance(backend, Backend):
        raise TypeError(f"backend must be a backend name or a Backend from "
                        f"noisecraft.backends.get_backend, got {type(backend).__name__}")
    if backend.name != "eager" and device.type != "cpu":
        raise ValueError(f"backend {backend.name!r} runs on the CPU, and this engine's device "
                         f"is {device}; use backend 'eager' there (the modules as they are)")
    if backend.name != "eager" and dtype != torch.float32:
        raise ValueError(
            f"backend {backend.name!r} takes float32 weights (the *_bf16 backends make their "
            f"own bf16 copy), and this engine's dtype is {dtype}; use dtype float32 with it, "
            "or backend 'eager'")
    return backend


def is_passthrough(backend: Backend) -> bool:
    """Whether the backend would run the module exactly as it is (plain fp32 eager)."""
    return (backend.name == "eager" and backend.precision == "fp32"
            and backend.knobs == TorchKnobs() and not backend.options)


class BackendVAE(nn.Module):
    """A VAE whose ``decode(z)`` (and ``encode(x)``, for an ``AutoencoderKL``) run behind a
    backend; it stands where the VAE stood.  ``parameters()`` are the source VAE's (so callers
    reading the weights' dtype and device see the source's) and any other attribute is the
    source's own (e.g. ``decode_tiled``, which then decodes eagerly)."""

    def __init__(self, vae: nn.Module, backend: Backend):
        super().__init__()
        self.vae = vae
        self.config = getattr(vae, "config", None)
        self.fast_decode = backend.wrap_vae_decoder(vae)
        encodes = hasattr(vae, "_encode_moments")
        self.fast_encode = backend.wrap(VAEEncode(vae)) if encodes else None

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.fast_decode(z)

    def encode(self, x: torch.Tensor):
        if self.fast_encode is None:
            return self.vae.encode(x)
        return DiagonalGaussian.from_moments(self.fast_encode(x))

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "vae":
                raise
            return getattr(super().__getattr__("vae"), name)


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Parameters, buffers and plain tensor attributes (e.g. oneDNN-packed weights)."""
    for m in module.modules():
        yield from (p for p in m._parameters.values() if p is not None)
        yield from (b for b in m._buffers.values() if b is not None)
        yield from (v for v in vars(m).values() if isinstance(v, torch.Tensor))


def _storage(t: torch.Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # opaque (oneDNN-packed) tensors
        return None


def extra_bytes(source: nn.Module, wrapped: nn.Module, backend: Backend) -> int:
    """Memory ``wrapped`` holds beyond ``source``'s own tensors: for the torch backends what
    they made (oneDNN-packed weights, bf16 copies), found by walking it; for compiled and
    openvino, whose copies live in inductor constants or the OpenVINO runtime, an estimate:
    the source's floating-point weights at the precision that runs."""
    if backend.name.startswith(("compiled", "openvino")):
        floats = sum(t.numel() * t.element_size() for t in _tensors(source)
                     if t.is_floating_point())
        return floats // 2 if backend.precision == "bf16" else floats
    seen = {_storage(t) for t in _tensors(source)}
    total = 0
    for t in _tensors(wrapped):
        key = _storage(t)
        if key is None:
            total += t.numel() * t.element_size()
        elif key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@dataclass
class _Record:
    source: nn.Module
    wrapped: nn.Module
    nbytes: int
    bound: bool


class WrappedModules:
    """Wrapped forms of source modules, made on first use (see the module docstring).

    ``wraps`` counts how many were made (reports, tests).  Not thread-safe on its own: the
    engine calls it under its lock.
    """

    def __init__(self, backend: Backend, max_unbound: int = 4):
        self.backend = backend
        self.passthrough = is_passthrough(backend)
        self.max_unbound = max_unbound
        self.wraps = 0
        self._records: OrderedDict[tuple[int, str], _Record] = OrderedDict()

    def module(self, source: nn.Module, *, bound: bool) -> nn.Module:
        """``source`` (U-Net, ControlNet, any module called through ``forward``) wrapped."""
        return self._get(source, "module", bound)

    def vae(self, source: nn.Module, *, bound: bool) -> nn.Module:
        """``source`` (a VAE) as a :class:`BackendVAE`."""
        return self._get(source, "vae", bound)

    def _get(self, source: nn.Module, kind: str, bound: bool) -> nn.Module:
        if self.passthrough or source is None or isinstance(source, BackendVAE | AcceleratedModule):
            return source
        key = (id(source), kind)
        record = self._records.get(key)
        if record is None:
            wrapped = BackendVAE(source, self.backend) if kind == "vae" \
                else self.backend.wrap(source)
            self.wraps += 1
            record = _Record(source, wrapped, extra_bytes(source, wrapped, self.backend), bound)
            self._records[key] = record
        record.bound = record.bound or bound
        self._records.move_to_end(key)
        self._trim()
        return record.wrapped

    def release(self, live: set[int]) -> None:
        """Forget the bound records whose source (by ``id``) is not in ``live`` any more."""
        for key in [k for k, r in self._records.items() if r.bound and k[0] not in live]:
            del self._records[key]

    def forget(self, sources: Iterable[nn.Module]) -> None:
        """Forget the wrapped forms of ``sources`` (their weights may have changed)."""
        ids = {id(s) for s in sources}
        for key in [k for k in self._records if k[0] in ids]:
            del self._records[key]

    def drop_oldest_unbound(self, keep: set[int] = frozenset()) -> bool:
        """Forget the least recently used unbound record whose source is not in ``keep``
        (ids); False when there is none (the engine's memory bound calls this first)."""
        for key, record in self._records.items():
            if not record.bound and key[0] not in keep:
                del self._records[key]
                return True
        return False

    def _trim(self) -> None:
        unbound = [k for k, r in self._records.items() if not r.bound]
        for key in unbound[:max(0, len(unbound) - self.max_unbound)]:
            del self._records[key]

    @property
    def nbytes(self) -> int:
        """Memory the wrapped forms hold beyond their sources (see :func:`extra_bytes`)."""
        return sum(r.nbytes for r in self._records.values())

    def __len__(self) -> int:
        return len(self._records)

    def __contains__(self, source: nn.Module) -> bool:
        """Whether a wrapped form of ``source`` is kept."""
        return any(k[0] == id(source) for k in self._records)
