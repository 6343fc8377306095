"""The common shape of every compute backend.

A backend takes a module (a U-Net, a VAE decoder adapter, a text encoder) and returns an
:class:`AcceleratedModule`: an ``nn.Module`` with the *same call signature* whose forward runs
the faster path.  It drops in wherever the module was used - as the ``model`` inside
:class:`noisecraft.diffusion.Denoiser`, so samplers, guidance, LoRA-free callbacks and
cancellation never know which backend runs.

Rules every backend keeps:

* the output comes back in the dtype of the first tensor argument (float32 in, float32 out,
  whatever precision runs inside);
* the source module is left untouched (no in-place rewrites, no global flags flipped): the
  accelerated copy shares or copies its weights, so changing the source's weights afterwards
  (e.g. merging a LoRA) needs a fresh ``wrap`` - the compiled, oneDNN-packed and OpenVINO
  forms all hold their own view of the weights;
* reduced precision (bf16) runs only where the CPU computes it natively
  (:func:`noisecraft.hardware.native_bf16`); elsewhere a bf16 backend warns and runs fp32.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from noisecraft.hardware import native_bf16

PRECISIONS = ("fp32", "bf16")
SDPA_VARIANTS = ("default", "flash", "math")


@dataclass(frozen=True)
class TorchKnobs:
    """PyTorch-level switches measured separately from the backends.

    ``channels_last``: NHWC activations (and conv weights) - oneDNN convolutions skip the
    NCHW<->blocked reorders.  ``mkldnn``: leave PyTorch's oneDNN (mkldnn) kernels on (True,
    the default) or force its reference kernels (False; for measurement only).  ``sdpa``:
    which ``scaled_dot_product_attention`` kernel runs ("default" lets PyTorch choose,
    "flash" the fused CPU flash kernel, "math" the unfused reference).
    """

    channels_last: bool = False
    mkldnn: bool = True
    sdpa: str = "default"

    def __post_init__(self) -> None:
        if self.sdpa not in SDPA_VARIANTS:
            raise ValueError(f"sdpa={self.sdpa!r}; choose one of {', '.join(SDPA_VARIANTS)}")

    def context(self) -> contextlib.ExitStack:
        """The context every call runs in (thread-local or restored on exit; no global flag
        outlives the call)."""
        stack = contextlib.ExitStack()
        if not self.mkldnn:
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
        if self.sdpa != "default":
            from torch.nn.attention import SDPBackend, sdpa_kernel

            kernel = SDPBackend.FLASH_ATTENTION if self.sdpa == "flash" else SDPBackend.MATH
            stack.enter_context(sdpa_kernel([kernel]))
        return stack


def resolve_precision(requested: str, *, bf16_native: bool | None = None) -> str:
    """The precision a backend will run: ``requested`` ("fp32" / "bf16"), except that bf16
    falls back to fp32 (with a warning) on CPUs without native bf16."""
    if requested not in PRECISIONS:
        raise ValueError(f"precision={requested!r}; choose one of {', '.join(PRECISIONS)}")
    if requested == "bf16":
        native = native_bf16() if bf16_native is None else bf16_native
        if not native:
            warnings.warn(
                "bf16 was requested but this CPU has no native bf16 (avx512_bf16 / amx_bf16 "
                "flags); running float32 instead, which is faster here",
                RuntimeWarning, stacklevel=3,
            )
            return "fp32"
    return requested


def torch_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for v in (*args, *kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


def cast_floats(args: tuple, kwargs: dict, dtype: torch.dtype,
                memory_format: torch.memory_format | None = None) -> tuple[tuple, dict]:
    """Floating-point tensors among the arguments, and in lists / tuples among them (e.g. a
    ControlNet's ``down_residuals``), cast to ``dtype`` (4-D ones also to ``memory_format``);
    integer tensors and other values pass through."""

    def cast(v):
        if isinstance(v, list | tuple):
            return type(v)(cast(x) for x in v)
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            v = v.to(dtype)
            if memory_format is not None and v.ndim == 4:
                v = v.contiguous(memory_format=memory_format)
        return v

    return tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}


class AcceleratedModule(nn.Module):
    """``source``'s call signature, computed by ``runner``.

    Attributes: ``backend`` (name), ``precision`` (what actually runs: "fp32" / "bf16"),
    ``source`` (the original module), ``inner`` (the module the runner computes with - a copy
    sharing or casting the source's weights, or the source itself), ``config`` (the source's,
    if any: pipelines read e.g. ``unet.config.in_channels``).
    """

    def __init__(self, source: nn.Module, runner: Callable[..., Any], *, backend: str,
                 precision: str, knobs: TorchKnobs | None = None,
                 inner: nn.Module | None = None):
        super().__init__()
        object.__setattr__(self, "source", source)
        self.runner = runner
        self.backend = backend
        self.precision = precision
        self.knobs = knobs or TorchKnobs()
        self.config = getattr(source, "config", None)
        # registered, so parameters() reports the weights (and dtype) that run; the source
        # itself when the backend made no copy
        self.inner = source if inner is None else inner

    def forward(self, *args, **kwargs):
        ref = first_tensor(args, kwargs)
        with torch.no_grad(), self.knobs.context():
            out = self.runner(*args, **kwargs)
        if ref is not None and isinstance(out, torch.Tensor) and out.dtype != ref.dtype:
            out = out.to(ref.dtype)
        if isinstance(out, torch.Tensor) and out.ndim == 4:
            out = out.contiguous()
        return out

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}, precision={self.precision!r}, knobs={self.knobs}"


class VAEDecode(nn.Module):
    """``vae.decode`` as a module ``forward(z) -> image``, so a backend can wrap it."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(z)


class VAEEncode(nn.Module):
    """``vae.encode(x)``'s moments (mean and log-variance stacked on channels) as a module."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.vae._encode_moments(x)
