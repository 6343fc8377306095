"""OpenVINO backend: the same PyTorch module converted by ``openvino.convert_model``.

Optional: needs the ``openvino`` package (``pip install 'noisecraft[openvino]'``).

Conversion traces the module for one input signature (argument names, shapes, dtypes), so
each new signature - another batch size or resolution - is converted once.  Converted models
are cached on disk as OpenVINO IR (``<key>.xml`` + ``.bin``, weights kept float32) under
``cache_dir``; the key hashes the module's class, every weight (name, dtype, shape, bytes -
or the ``weights_hash`` the caller already knows, e.g. the checkpoint's SHA-256), the input
signature, the precision and the OpenVINO version.  A changed weight therefore never reuses a
stale conversion.  OpenVINO's own compiled-blob cache (``CACHE_DIR``) is pointed at the same
folder.

Precision: "fp32" sets ``INFERENCE_PRECISION_HINT=f32`` (results within ~1e-5 of PyTorch
fp32); "bf16" sets ``bf16``, which is what OpenVINO picks by default on CPUs with native bf16.

Calls whose arguments are not all tensors or None (e.g. ControlNet ``down_residuals`` lists)
run the source module eagerly: only the plain ``(x, timesteps, context, y)`` path is converted.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from torch import nn

from noisecraft.backends.base import AcceleratedModule, TorchKnobs
from noisecraft.backends.copies import shared_copy

OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}


def _import_openvino():
    try:
        import openvino
    except ImportError:
        raise ImportError(
            "the 'openvino' backend needs the openvino package: pip install "
            "'noisecraft[openvino]' (or pip install openvino); the other backends "
            "('eager', 'onednn', 'compiled') need nothing extra"
        ) from None
    return openvino


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "noisecraft" / "openvino"


def weights_hash(module: nn.Module) -> str:
    """SHA-256 over the module's class and every state-dict tensor (name, dtype, shape, bytes)."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in module.state_dict().items():
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class _Positional(nn.Module):
    """``module(**dict(zip(names, args)))`` with positional tensors only (what tracing needs)."""

    def __init__(self, module: nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.module, self.names = module, names

    def forward(self, *tensors):
        return self.module(**dict(zip(self.names, tensors, strict=True)))


def _signature(module: nn.Module, args: tuple, kwargs: dict):
    """(names, tensors) of a call with only tensor / None arguments, else None."""
    import inspect

    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(args) > len(params):
        return None
    bound = {p.name: a for p, a in zip(params, args, strict=False)} | kwargs
    bound = {k: v for k, v in bound.items() if v is not None}
    if not all(isinstance(v, torch.Tensor) for v in bound.values()):
        return None
    return tuple(bound), tuple(bound.values())


class OpenVINORunner:
    """Converts (or loads from the disk cache) and runs one compiled model per signature."""

    def __init__(self, module: nn.Module, precision: str, cache_dir: Path,
                 model_hash: str | None, num_threads: int | None):
        self.ov = _import_openvino()
        self.module, self.precision, self.cache_dir = module, precision, Path(cache_dir)
        self._hash = model_hash
        self.config = {"INFERENCE_PRECISION_HINT": OV_PRECISION[precision],
                       "CACHE_DIR": str(self.cache_dir / "blobs")}
        if num_threads:
            self.config["INFERENCE_NUM_THREADS"] = int(num_threads)
        self.core = self.ov.Core()
        self.compiled: dict[str, object] = {}
        self.conversions = 0  # how many times convert_model ran (tests, reports)

    @property
    def model_hash(self) -> str:
        if self._hash is None:
            self._hash = weights_hash(self.module)
        return self._hash

    def key(self, names, tensors) -> str:
        sig = ",".join(f"{n}:{t.dtype}:{tuple(t.shape)}" for n, t in zip(names, tensors,
                                                                       strict=True))
        text = f"{self.model_hash}|{sig}|{self.precision}|{self.ov.__version__}"
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def _load(self, key: str, names, tensors):
        xml = self.cache_dir / f"{key}.xml"
        if xml.exists():
            model = self.core.read_model(xml)
        else:
            wrapper = _Positional(self.module, names).eval()
            with torch.no_grad():
                model = self.ov.convert_model(wrapper, example_input=tensors)
            self.conversions += 1
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f"{key}.tmp.xml"
            self.ov.save_model(model, tmp, compress_to_fp16=False)
            tmp.with_suffix(".bin").replace(xml.with_suffix(".bin"))
            tmp.replace(xml)
        return self.core.compile_model(model, "CPU", self.config)

    def __call__(self, *args, **kwargs):
        sig = _signature(self.module, args, kwargs)
        if sig is None:
            return self.module(*args, **kwargs)
        names, tensors = sig
        key = self.key(names, tensors)
        if key not in self.compiled:
            self.compiled[key] = self._load(key, names, tensors)
        compiled = self.compiled[key]
        result = compiled([t.detach().cpu().numpy() for t in tensors])
        return torch.from_numpy(result[compiled.output(0)].copy())


def wrap_openvino(module: nn.Module, precision: str, knobs: TorchKnobs,
                  options: dict) -> AcceleratedModule:
    """Options: ``cache_dir`` (default ``~/.cache/noisecraft/openvino``), ``weights_hash`` (skip
    hashing the weights when the checkpoint's hash is known), ``num_threads``."""
    cache_dir = options.pop("cache_dir", None) or default_cache_dir()
    model_hash = options.pop("weights_hash", None)
    threads = options.pop("num_threads", None)
    if options:
        raise TypeError(f"backend 'openvino' got unknown option(s) {sorted(options)}; allowed: "
                        "cache_dir, weights_hash, num_threads")
    if knobs != TorchKnobs():
        raise ValueError("the PyTorch knobs (channels_last, mkldnn, sdpa) do not apply to "
                         "the 'openvino' backend; leave them at their defaults")
    runner = OpenVINORunner(shared_copy(module).eval(), precision, cache_dir, model_hash, threads)
    return AcceleratedModule(module, runner, backend="openvino", precision=precision,
                             knobs=knobs, inner=runner.module)
