"""Copies of a module that share what they can with the source and never modify it.

``nn.Module.to(dtype / memory_format)`` rewrites ``param.data`` in place, which would change
the caller's module too when parameters are shared; these helpers replace Parameter objects
in the copy instead.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def shared_copy(module: nn.Module) -> nn.Module:
    """A deep copy of the module structure whose parameters and buffers ARE the source's."""
    memo = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, memo)


def _replace_tensors(module: nn.Module, fn) -> nn.Module:
    for sub in module.modules():
        for name, p in list(sub.named_parameters(recurse=False)):
            sub._parameters[name] = nn.Parameter(fn(p.detach()), requires_grad=False)
        for name, b in list(sub.named_buffers(recurse=False)):
            if b is not None and b.is_floating_point():
                sub._buffers[name] = fn(b)
    return module


def cast_params(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Floating parameters/buffers of ``module`` replaced by ``dtype`` copies (in place on
    ``module``, which should be a :func:`shared_copy`: the source's tensors stay as they are)."""
    return _replace_tensors(module, lambda t: t.to(dtype) if t.is_floating_point() else t)


def nhwc_params(module: nn.Module) -> nn.Module:
    """4-D parameters (conv weights) of ``module`` replaced by channels_last copies (in place
    on ``module``, a :func:`shared_copy`)."""
    return _replace_tensors(
        module, lambda t: t.contiguous(memory_format=torch.channels_last) if t.ndim == 4 else t)
