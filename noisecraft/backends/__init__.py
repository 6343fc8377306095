"""Faster compute for the same modules, behind the same call signature.

>>> from noisecraft.backends import get_backend
>>> fast_unet = get_backend("onednn").wrap(unet)          # fp32, same numbers as eager
>>> denoiser = Denoiser(fast_unet, schedule)              # samplers never know

Backends (``backend_names()``):

========================  ============================================================
``eager``                 the module as it is (the reference), fp32
``eager_bf16``            bf16 weights + activations (``bf16_mode="autocast"``: autocast)
``onednn``                Linear/Conv2d through oneDNN (packed conv weights), fp32-exact
``onednn_bf16``           the same in bf16 (packed bf16 copies of both)
``compiled``              ``torch.compile`` (inductor) with freezing, fp32
``compiled_bf16``         the same in bf16
``openvino``              ``openvino.convert_model``, ``INFERENCE_PRECISION_HINT=f32``
``openvino_bf16``         OpenVINO in bf16 (its default on CPUs with native bf16)
========================  ============================================================

``*_bf16`` backends run bf16 only where the CPU has native bf16 (``noisecraft.hardware``);
elsewhere they warn and run fp32.  ``DEFAULT_BACKEND`` is the fastest fp32-exact one (output
within relative L2 1e-4 of eager fp32, asserted in tests/backends).

The generation engine runs them: ``Engine(backend=...)`` (and ``--backend`` on the command
line) wraps each loaded model's U-Net, VAE and ControlNets once and reuses them
(:mod:`noisecraft.backends.wrapped`).

PyTorch knobs for the torch backends: ``channels_last``, ``mkldnn``, ``sdpa`` (see
:class:`~noisecraft.backends.base.TorchKnobs`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from torch import nn

from noisecraft.backends.base import (
    AcceleratedModule,
    TorchKnobs,
    VAEDecode,
    VAEEncode,
    resolve_precision,
)
from noisecraft.backends.torch_backends import wrap_compiled, wrap_eager, wrap_onednn


def _wrap_openvino(*args):
    from noisecraft.backends.openvino import wrap_openvino

    return wrap_openvino(*args)


Wrapper = Callable[[nn.Module, str, TorchKnobs, dict], AcceleratedModule]

# name -> (wrapper, requested precision)
BACKENDS: Mapping[str, tuple[Wrapper, str]] = MappingProxyType({
    "eager": (wrap_eager, "fp32"),
    "eager_bf16": (wrap_eager, "bf16"),
    "onednn": (wrap_onednn, "fp32"),
    "onednn_bf16": (wrap_onednn, "bf16"),
    "compiled": (wrap_compiled, "fp32"),
    "compiled_bf16": (wrap_compiled, "bf16"),
    "openvino": (_wrap_openvino, "fp32"),
    "openvino_bf16": (_wrap_openvino, "bf16"),
})
DEFAULT_BACKEND = "onednn"


def backend_names() -> list[str]:
    return list(BACKENDS)


@dataclass(frozen=True)
class Backend:
    """A backend chosen by name, with its knobs and options; ``wrap(module)`` applies it.

    ``precision`` is what will actually run (bf16 falls back to fp32 without native bf16).
    """

    name: str
    precision: str
    knobs: TorchKnobs = TorchKnobs()
    options: Mapping = field(default_factory=dict)

    def wrap(self, module: nn.Module) -> AcceleratedModule:
        """``module`` (U-Net, ``VAEDecode(vae)``, text encoder ...) behind this backend."""
        wrapper, _ = BACKENDS[self.name]
        return wrapper(module, self.precision, self.knobs, dict(self.options))

    def wrap_vae_decoder(self, vae: nn.Module) -> AcceleratedModule:
        """``z -> image`` of an ``AutoencoderKL`` behind this backend."""
        return self.wrap(VAEDecode(vae))


def get_backend(name: str, *, channels_last: bool = False, mkldnn: bool = True,
                sdpa: str = "default", bf16_native: bool | None = None,
                **options) -> Backend:
    """The backend called ``name`` (see the module docstring); ``options`` go to it (e.g.
    ``bf16_mode`` for eager, ``dynamic`` for compiled, ``cache_dir`` for openvino).
    ``bf16_native`` overrides the CPU detection (tests)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
    precision = resolve_precision(BACKENDS[name][1], bf16_native=bf16_native)
    knobs = TorchKnobs(channels_last=channels_last, mkldnn=mkldnn, sdpa=sdpa)
    return Backend(name, precision, knobs, MappingProxyType(dict(options)))


__all__ = [
    "AcceleratedModule", "BACKENDS", "Backend", "DEFAULT_BACKEND", "TorchKnobs", "VAEDecode",
    "VAEEncode", "backend_names", "get_backend",
]
