"""The model cache: loaded models, LoRA'd copies and ControlNets, bounded by memory.

Models are keyed by file (path, size, mtime) or by registered name; the least recently used
unpinned entry is evicted first when a new one would pass ``max_cache_bytes``.  LoRAs are merged
copy-on-write (:func:`noisecraft.checkpoints.lora.lora_bundle`): the cached base model never
changes, and the LoRA'd copy is cached too, keyed by the base model and the LoRA files and
weights, costing only the layers the LoRAs touch.  The compute backend's wrapped forms of the
U-Net / VAE / ControlNets (:mod:`noisecraft.backends.wrapped`) are bound to the cached modules
and released with them; their packed weights count against the same bound.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from noisecraft.backends import Backend
from noisecraft.backends.wrapped import WrappedModules, engine_backend
from noisecraft.loras import ResolvedLora, lora_short_hash
from noisecraft.models.family import ModelBundle
from noisecraft.request import InputError

DEFAULT_MODEL_PATH = Path(__file__).parent / "weights" / "default.safetensors"


class DefaultModelMissing(InputError):
    """``model=None`` asked for the built-in default model, whose weights are not there."""


class ModelNotFound(InputError):
    """A model path or name that is neither a file nor a registered model."""


def _module_bytes(*modules) -> int:
    seen, total = set(), 0
    for module in modules:
        if not isinstance(module, torch.nn.Module):
            continue
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in seen and t.device.type != "meta":
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def bundle_bytes(bundle: ModelBundle) -> int:
    """Memory held by a bundle's weights (parameters and buffers, counted once)."""
    return _module_bytes(bundle.unet, bundle.vae, bundle.text_encoder, *bundle.extras.values())


def _own_bytes(copy: ModelBundle, base: ModelBundle) -> int:
    """Memory of the weights ``copy`` (a LoRA'd copy of ``base``) does not share with it."""
    shared = {id(t) for m in (base.unet, base.text_encoder)
              for t in (*m.parameters(), *m.buffers())}
    return sum(t.numel() * t.element_size() for m in (copy.unet, copy.text_encoder)
               for t in (*m.parameters(), *m.buffers()) if id(t) not in shared)


def _default_cache_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def _default_loader(path: Path, device: torch.device, dtype: torch.dtype | None) -> ModelBundle:
    try:
        from noisecraft.checkpoints.loader import load_model
    except ImportError as e:
        raise InputError(
            f"cannot load {path}: checkpoint loading (noisecraft.checkpoints.loader) is not "
            f"available in this build ({e})"
        ) from None
    return load_model(path, device=device, dtype=dtype)


@dataclass
class _Entry:
    bundle: ModelBundle
    nbytes: int
    pinned: bool


def _entry_ids(entry: _Entry) -> set[int]:
    """ids of the modules a cache entry holds that the backend wraps."""
    held = entry.bundle
    if isinstance(held, ModelBundle):
        return {id(held.unet), id(held.vae)}
    return {id(held)}  # a ControlNet


Loader = Callable[[Path, torch.device, "torch.dtype | None"], ModelBundle]


class ModelCache:
    """Loaded models + device + dtype + the compute backend's wrapped forms of them.

    The model half of :class:`noisecraft.engine.Engine` (which adds ``generate`` and
    ``preview``); the generation code reaches models only through these methods.

    Args:
        device: ``"cpu"``, ``"cuda"``, ...; default CUDA when available, else CPU.
        dtype: weights' dtype; default float32 (latents stay float32 whatever it is).
        max_cache_bytes: bound on the memory of cached models (default: half the machine's
            RAM).  Registered models are pinned and count against it but are never evicted.
        loader: ``(path, device, dtype) -> ModelBundle``; default
            ``noisecraft.checkpoints.loader.load_model``.
        default_model: the file ``model=None`` loads; default :data:`DEFAULT_MODEL_PATH`
            (the shipped built-in model).
        backend: the compute backend (a name from ``noisecraft.backends.backend_names()`` or a
            ``Backend`` from ``get_backend``); default "onednn" on a CPU with float32 weights,
            else "eager" (see the module docstring).  Non-eager backends need the CPU and
            float32 weights.
    """

    def __init__(
        self,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        max_cache_bytes: int | None = None,
        loader: Loader | None = None,
        default_model: str | os.PathLike | None = None,
        backend: str | Backend | None = None,
    ) -> None:
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.dtype = dtype or torch.float32
        self.backend = engine_backend(backend, self.device, self.dtype)
        self._wrapped = WrappedModules(self.backend)
        self.max_cache_bytes = max_cache_bytes or _default_cache_bytes()
        self._loader = loader or _default_loader
        self.default_model = Path(default_model) if default_model is not None \
            else DEFAULT_MODEL_PATH
        self._cache: OrderedDict[tuple, _Entry] = OrderedDict()
        self._names: dict[str, tuple] = {}
        self._lora_hashes: dict[tuple, str] = {}
        self._preview_decoders: dict[str, torch.nn.Module] = {}
        self._lock = threading.RLock()

    # ---- models -------------------------------------------------------------------------

    def register(self, name: str, bundle: ModelBundle) -> ModelBundle:
        """Make an in-memory bundle available as ``model=name`` (pinned in the cache)."""
        bundle = self._place(bundle)
        key = ("registered", name, bundle.sha256)
        with self._lock:
            self._drop_loras_of(key)  # a LoRA'd copy of an earlier bundle of this name
            self._forget_new(self._cache.get(self._names.get(name)), bundle.unet, bundle.vae)
            self._cache[key] = _Entry(bundle, bundle_bytes(bundle), pinned=True)
            self._names[name] = key
            self._wrapped.release(self._live_ids())
        return bundle

    def _place(self, bundle: ModelBundle) -> ModelBundle:
        for module in (bundle.unet, bundle.vae, bundle.text_encoder):
            module.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        return bundle

    def model(self, ref: str | os.PathLike | None) -> ModelBundle:
        """The bundle for a registered name or a checkpoint path (loaded once, then cached);
        None means the built-in default model."""
        return self._model(ref)[1]

    def _model(self, ref: str | os.PathLike | None) -> tuple[tuple, ModelBundle]:
        with self._lock:
            if ref is not None and str(ref) in self._names:
                key = self._names[str(ref)]
                self._cache.move_to_end(key)
                return key, self._cache[key].bundle
            path = self._resolve(ref)
            stat = path.stat()
            key = ("file", str(path), stat.st_size, stat.st_mtime_ns)
            if key in self._cache:
                self._cache.move_to_end(key)
                return key, self._cache[key].bundle
            bundle = self._place(self._loader(path, self.device, self.dtype))
            nbytes = bundle_bytes(bundle)
            self._evict(nbytes)
            self._cache[key] = _Entry(bundle, nbytes, pinned=False)
            return key, bundle

    def model_with_loras(self, ref: str | os.PathLike | None,
                         loras: tuple[ResolvedLora, ...]) -> ModelBundle:
        """The model ``ref`` with ``loras`` merged into a copy (the cached model itself never
        changes); the copy is cached by (model, LoRA files, weights) and costs the memory of
        the layers the LoRAs touch.  No LoRAs: the model itself."""
        from noisecraft.checkpoints.files import CheckpointError
        from noisecraft.checkpoints.lora import lora_bundle

        with self._lock:
            base_key, base = self._model(ref)
            if not loras:
                return base
            files = []
            for lo in loras:
                stat = lo.path.stat()
                files.append((str(lo.path), stat.st_size, stat.st_mtime_ns,
                              lo.unet_weight, lo.text_encoder_weight))
            key = ("lora", base_key, tuple(files))
            if key not in self._cache:
                try:
                    bundle = lora_bundle(base, [(lo.path, lo.unet_weight,
                                                 lo.text_encoder_weight) for lo in loras])
                except CheckpointError as e:
                    raise InputError(str(e)) from None
                nbytes = _own_bytes(bundle, base)
                self._evict(nbytes, keep={base_key})
                self._cache[key] = _Entry(bundle, nbytes, pinned=False)
            self._cache.move_to_end(key)
            return self._cache[key].bundle

    def lora_hash(self, path: Path) -> str:
        """A1111's short hash of a LoRA file (computed once per file version)."""
        stat = path.stat()
        key = (str(path), stat.st_size, stat.st_mtime_ns)
        with self._lock:
            known = self._lora_hashes.get(key)
        if known is None:  # hashed outside the lock: other requests need not wait for it
            known = lora_short_hash(path)
            with self._lock:
                self._lora_hashes[key] = known
        return known

    def _resolve(self, ref) -> Path:
        if ref is None:
            if not self.default_model.is_file():
                raise DefaultModelMissing(
                    f"the built-in default model ({self.default_model}) is not there: its "
                    "weights have not been trained and shipped yet. Pass model=PATH (a Stable "
                    "Diffusion checkpoint, or a file written by noisecraft.training."
                    "default_model.export_default_model()) instead."
                )
            return self.default_model
        path = Path(os.fspath(ref)).expanduser().resolve()
        if not path.exists():
            raise ModelNotFound(
                f"model {os.fspath(ref)!r} is neither a registered model name nor an existing "
                "file or folder"
            )
        return path

    def _evict(self, incoming: int, keep: set[tuple] = frozenset(),
               keep_ids: set[int] = frozenset()) -> None:
        """Make room for ``incoming`` bytes: wrapped forms of modules no cached model holds
        first (but those in ``keep_ids``), then models least recently used (but ``keep``)."""
        while self.cache_bytes + incoming > self.max_cache_bytes \
                and self._wrapped.drop_oldest_unbound(keep_ids):
            pass
        for key in [k for k, e in self._cache.items() if not e.pinned and k not in keep]:
            if self.cache_bytes + incoming <= self.max_cache_bytes:
                break
            if key in self._cache:
                del self._cache[key]
                self._drop_loras_of(key)
                self._wrapped.release(self._live_ids())

    def _drop_loras_of(self, base_key: tuple) -> int:
        """Forget the LoRA'd copies of the model ``base_key`` (they share its weights)."""
        freed = 0
        for key in [k for k in self._cache if k[0] == "lora" and k[1] == base_key]:
            freed += self._cache.pop(key).nbytes
        return freed

    @property
    def cached_models(self) -> list[str]:
        """Names (registered) or paths of the models in the cache, least recently used first
        (ControlNets and LoRA'd copies not included: see :attr:`cached_controlnets` and
        :attr:`cached_loras`)."""
        return [k[1] for k in self._cache if k[0] not in ("controlnet", "lora")]

    @property
    def cached_loras(self) -> list[tuple[str, tuple[tuple[str, float, float], ...]]]:
        """The cached LoRA'd models: (model name or path, ((LoRA file, U-Net weight,
        text-encoder weight), ...)), least recently used first."""
        return [(k[1][1], tuple((f[0], f[3], f[4]) for f in k[2]))
                for k in self._cache if k[0] == "lora"]

    @property
    def cached_controlnets(self) -> list[str]:
        return [k[1] for k in self._cache if k[0] == "controlnet"]

    def register_controlnet(self, name: str, controlnet: torch.nn.Module) -> str:
        """Make an in-memory ControlNet available as ``ControlNetUnit(model=name)`` (pinned)."""
        controlnet = controlnet.to(device=self.device, dtype=self.dtype).eval()
        with self._lock:
            self._forget_new(self._cache.get(("controlnet", name)), controlnet)
            self._cache[("controlnet", name)] = _Entry(controlnet, _module_bytes(controlnet),
                                                       pinned=True)
            self._wrapped.release(self._live_ids())
        return name

    def controlnet(self, ref: str | os.PathLike) -> torch.nn.Module:
        """The ControlNet for a registered name or a file/folder path (loaded once, cached with
        the models and evicted by the same memory bound)."""
        with self._lock:
            if ("controlnet", str(ref)) in self._cache:
                self._cache.move_to_end(("controlnet", str(ref)))
                return self._cache[("controlnet", str(ref))].bundle
            path = Path(os.fspath(ref)).expanduser().resolve()
            if not path.exists():
                raise ModelNotFound(f"ControlNet {os.fspath(ref)!r} is neither a registered "
                                    "ControlNet name nor an existing file or folder")
            stat = path.stat()
            key = ("controlnet", str(path), stat.st_size, stat.st_mtime_ns)
            if key not in self._cache:
                from noisecraft.checkpoints.controlnet_keys import load_controlnet
                from noisecraft.checkpoints.files import CheckpointError

                try:
                    net = load_controlnet(path, device=self.device, dtype=self.dtype)
                except CheckpointError as e:
                    raise InputError(str(e)) from None
                nbytes = _module_bytes(net)
                self._evict(nbytes)
                self._cache[key] = _Entry(net, nbytes, pinned=False)
            self._cache.move_to_end(key)
            return self._cache[key].bundle

    @property
    def cache_bytes(self) -> int:
        """Memory of the cached models plus what the backend made of them (packed weights)."""
        return sum(e.nbytes for e in self._cache.values()) + self._wrapped.nbytes

    def clear(self) -> None:
        """Drop every unpinned model (and the backend's wrapped forms of them)."""
        with self._lock:
            for key in [k for k, e in self._cache.items() if not e.pinned]:
                del self._cache[key]
            self._wrapped.release(self._live_ids())

    # ---- the compute backend ------------------------------------------------------------

    def runnable(self, bundle: ModelBundle) -> ModelBundle:
        """``bundle`` as it runs on this engine's backend: a copy whose U-Net and VAE are
        wrapped (each once, then reused while the model stays cached), the text encoder as it
        is; ``bundle`` itself with the plain "eager" backend."""
        if self._wrapped.passthrough:
            return bundle
        with self._lock:
            live = self._live_ids()
            unet = self._wrapped.module(bundle.unet, bound=id(bundle.unet) in live)
            vae = self._wrapped.vae(bundle.vae, bound=id(bundle.vae) in live)
            self._evict(0, keep=self._keys_holding((bundle.unet, bundle.vae)),
                        keep_ids={id(bundle.unet), id(bundle.vae)})
        return replace(bundle, unet=unet, vae=vae)

    def runnable_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` (a ControlNet, or any module called through ``forward``) behind this
        engine's backend, wrapped once."""
        with self._lock:
            return self._wrapped.module(module, bound=id(module) in self._live_ids())

    def runnable_vae(self, vae: torch.nn.Module) -> torch.nn.Module:
        """``vae`` with ``decode`` / ``encode`` behind this engine's backend, wrapped once."""
        with self._lock:
            return self._wrapped.vae(vae, bound=id(vae) in self._live_ids())

    @property
    def wrapped_modules(self) -> WrappedModules:
        return self._wrapped

    def _forget_new(self, old: _Entry | None, *modules: torch.nn.Module) -> None:
        """Forget wrapped forms of ``modules`` being registered (``_place`` may have changed
        their weights), except those already registered under the name (``old``), which
        ``_place`` left as they were: registering the same module again keeps its wrap."""
        held = _entry_ids(old) if old is not None else set()
        self._wrapped.forget([m for m in modules if id(m) not in held])

    def _live_ids(self) -> set[int]:
        """ids of the modules the model cache holds (the wrapped forms bound to them)."""
        return {i for e in self._cache.values() for i in _entry_ids(e)}

    def _keys_holding(self, modules) -> set[tuple]:
        ids = {id(m) for m in modules}
        keys = {k for k, e in self._cache.items() if ids & _entry_ids(e)}
        return keys | {k[1] for k in keys if k[0] == "lora"}

    # ---- preview decoders ---------------------------------------------------------------

    def preview_decoder(self, path: str | os.PathLike) -> torch.nn.Module:
        """A TAESD decoder from ``path`` (cached), for :meth:`noisecraft.engine.Engine.preview`."""
        from noisecraft.models.taesd import TAESD

        key = str(Path(path).resolve())
        with self._lock:
            if key not in self._preview_decoders:
                if not Path(path).is_file():
                    raise InputError(f"preview decoder {path} does not exist")
                taesd = TAESD.from_files(decoder=path, device=self.device)
                if not self._wrapped.passthrough:  # this engine's own copy: wrapped in place
                    taesd.decoder = self.backend.wrap(taesd.decoder)
                self._preview_decoders[key] = taesd
            return self._preview_decoders[key]
