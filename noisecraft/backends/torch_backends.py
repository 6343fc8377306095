"""The PyTorch backends: eager (fp32 / bf16), oneDNN-packed, and torch.compile with freezing.

Each ``wrap_*`` function takes ``(module, precision, knobs, options)`` and returns an
:class:`~noisecraft.backends.base.AcceleratedModule`.
"""

from __future__ import annotations

import torch
from torch import nn

from noisecraft.backends.base import (
    AcceleratedModule,
    TorchKnobs,
    cast_floats,
    torch_dtype,
)
from noisecraft.backends.copies import cast_params, nhwc_params, shared_copy
from noisecraft.backends.onednn import onednn_copy

BF16_MODES = ("weights", "autocast")


def _memory_format(knobs: TorchKnobs) -> torch.memory_format | None:
    return torch.channels_last if knobs.channels_last else None


def wrap_eager(module: nn.Module, precision: str, knobs: TorchKnobs,
               options: dict) -> AcceleratedModule:
    """The module as it is (fp32), or in bf16: ``bf16_mode="weights"`` (default) runs a bf16
    copy of the weights with bf16 activations (GroupNorm32 and SDPA accumulate in float32);
    ``"autocast"`` keeps fp32 weights and lets ``torch.autocast`` cast per op."""
    mode = options.pop("bf16_mode", "weights")
    if mode not in BF16_MODES:
        raise ValueError(f"bf16_mode={mode!r}; choose one of {', '.join(BF16_MODES)}")
    _no_options("eager", options)
    dtype, fmt = torch_dtype(precision), _memory_format(knobs)
    target = module
    if (precision == "bf16" and mode == "weights") or fmt is not None:
        target = shared_copy(module)
    if precision == "bf16" and mode == "weights":
        target = cast_params(target, dtype)
    if fmt is not None:
        target = nhwc_params(target)
    autocast = precision == "bf16" and mode == "autocast"
    in_dtype = torch.float32 if autocast else dtype

    def run(*args, **kwargs):
        args, kwargs = cast_floats(args, kwargs, in_dtype, fmt)
        if autocast:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return target(*args, **kwargs)
        return target(*args, **kwargs)

    name = "eager" if precision == "fp32" else f"eager_bf16[{mode}]"
    return AcceleratedModule(module, run, backend=name, precision=precision, knobs=knobs,
                             inner=None if target is module else target)


def wrap_onednn(module: nn.Module, precision: str, knobs: TorchKnobs,
                options: dict) -> AcceleratedModule:
    """Linear/Conv2d through oneDNN (see ``noisecraft.backends.onednn``)."""
    _no_options("onednn", options)
    dtype, fmt = torch_dtype(precision), _memory_format(knobs)
    inner = onednn_copy(module, dtype, channels_last=knobs.channels_last)

    def run(*args, **kwargs):
        args, kwargs = cast_floats(args, kwargs, dtype, fmt)
        return inner(*args, **kwargs)

    return AcceleratedModule(module, run, backend="onednn", precision=precision, knobs=knobs,
                             inner=inner)


def wrap_compiled(module: nn.Module, precision: str, knobs: TorchKnobs,
                  options: dict) -> AcceleratedModule:
    """``torch.compile`` (inductor) with freezing: weights become constants, conv/linear weights
    are prepacked for oneDNN (fp32 linears for MKL, which is what inductor picks on x86) and
    pointwise ops are fused.  Compiles on the first call of each new input shape.

    Options: ``dynamic`` (passed to torch.compile; default None = PyTorch's automatic choice),
    ``mode`` (e.g. "max-autotune").  Freezing is set per compile through ``options=``, not by
    flipping ``torch._inductor.config`` for the whole process.
    """
    dynamic = options.pop("dynamic", None)
    mode = options.pop("mode", None)
    _no_options("compiled", options)
    dtype, fmt = torch_dtype(precision), _memory_format(knobs)
    target = shared_copy(module)
    if precision == "bf16":
        target = cast_params(target, dtype)
    if fmt is not None:
        target = nhwc_params(target)
    target.eval()
    inductor_options = {"freezing": True}
    if mode is not None:  # torch.compile refuses mode and options together
        inductor_options = None
    compiled = torch.compile(target, backend="inductor", dynamic=dynamic, mode=mode,
                             options=inductor_options)

    def run(*args, **kwargs):
        args, kwargs = cast_floats(args, kwargs, dtype, fmt)
        return compiled(*args, **kwargs)

    return AcceleratedModule(module, run, backend="compiled", precision=precision, knobs=knobs,
                             inner=target)


def _no_options(backend: str, options: dict) -> None:
    if options:
        raise TypeError(f"backend {backend!r} got unknown option(s) {sorted(options)}")
