"""Route every Linear and Conv2d through oneDNN with weights packed once.

Why: on this project's machines (AMD EPYC) PyTorch's float32 ``nn.Linear`` and ``matmul`` go
to MKL's sgemm, which runs at well under half the speed oneDNN reaches on the same matrices
(184 vs 447 GFLOP/s measured in issue 11; MKL takes a generic path on non-Intel CPUs).
Convolutions already use oneDNN but reorder their weights into oneDNN's blocked layout on every
call.  Here both are replaced by ``torch.ops.mkldnn._linear_pointwise`` /
``_convolution_pointwise`` on weights reordered once, at wrap time - the same kernels
``torch.compile``'s freezing pass emits for bf16 - and the result is float32-exact (same
arithmetic, different blocking: relative error ~1e-7 per layer).

The source module is not modified: :func:`onednn_copy` deep-copies the module *structure*,
sharing every parameter tensor, and swaps the copy's layers.  Memory: in float32 a Linear keeps
using the source's weight tensor (no copy): ``_linear_pointwise`` on the plain row-major weight
measured within 5-12% of the packed one per layer (Linear is ~31% of an SD U-Net step), while a
packed copy would cost 1.1 GB on SD 1.5 and 8.9 GB on SDXL, whose weights are mostly Linear.
Convolutions keep a packed copy (2.4 GB on SD 1.5): through oneDNN a plain-layout conv weight
ran 1.5-1.8x slower than the packed one (reordered on every call).  In bf16 both are bf16
copies (half the size) and packed, since a copy is made for the cast anyway.

Attention (``scaled_dot_product_attention``) keeps PyTorch's fused flash kernel: computing
QK^T and AV head by head through oneDNN measured ~3x slower than the flash kernel.
"""

from __future__ import annotations

import torch
from torch import nn

from noisecraft.backends.copies import cast_params, nhwc_params, shared_copy

_mkldnn = torch.ops.mkldnn


class OneDNNLinear(nn.Module):
    """``nn.Linear`` through oneDNN; input ``[..., in]`` -> ``[..., out]``.  The weight is the
    source's own float32 tensor, or a packed copy when the dtype changes."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features, self.dtype = (linear.in_features,
                                                           linear.out_features, dtype)
        weight = linear.weight.detach().to(dtype).contiguous()  # no copy when already so
        # float32: the source's own tensor (see the module docstring); bf16: packed once (the
        # cast copy the bf16 clone made is dropped with the nn.Linear this replaces).
        shared = dtype == torch.float32 and weight.data_ptr() == linear.weight.data_ptr()
        self.weight = weight if shared else _mkldnn._reorder_linear_weight(weight, None)
        self.bias = None if linear.bias is None else linear.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mkldnn._linear_pointwise(x.to(self.dtype), self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        layout = "oneDNN packed" if self.weight.is_mkldnn else "shared weight"
        return f"{self.in_features} -> {self.out_features}, {self.dtype}, {layout}"


class OneDNNConv2d(nn.Module):
    """``nn.Conv2d`` (zero padding, integer padding) on a oneDNN-packed weight.

    The output keeps the input's memory format: NHWC (channels_last) in, NHWC out.
    """

    def __init__(self, conv: nn.Conv2d, dtype: torch.dtype):
        super().__init__()
        self.args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        self.dtype = dtype
        self.describe = f"{conv.in_channels} -> {conv.out_channels}, k={conv.kernel_size}"
        weight = conv.weight.detach().to(dtype).contiguous()
        self.packed = torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), *self.args,
                                                                None)
        self.bias = None if conv.bias is None else conv.bias.detach().to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _mkldnn._convolution_pointwise(x.to(self.dtype), self.packed, self.bias,
                                              *self.args, "none", [], "")

    def extra_repr(self) -> str:
        return f"{self.describe}, {self.dtype}, oneDNN packed"


def _convertible_conv(conv: nn.Conv2d) -> bool:
    return conv.padding_mode == "zeros" and not isinstance(conv.padding, str)


def onednn_copy(module: nn.Module, dtype: torch.dtype = torch.float32, *,
                channels_last: bool = False) -> nn.Module:
    """A copy of ``module`` (sharing its other parameters) whose Linear and Conv2d layers run
    on oneDNN-packed weights in ``dtype``; everything else - norms, attention, activations - is
    the original code.  With ``dtype=torch.bfloat16`` the other parameters are bf16 copies (the
    U-Net's GroupNorm32 still computes in float32)."""
    if not torch.backends.mkldnn.is_available():
        raise RuntimeError("the 'onednn' backend needs PyTorch built with oneDNN (mkldnn); this "
                           "build has none - use 'eager' or 'compiled'")
    clone = shared_copy(module)
    if dtype != torch.float32:
        clone = cast_params(clone, dtype)
    _swap_layers(clone, dtype)
    if channels_last:  # layers left as nn.Conv2d (e.g. string padding)
        clone = nhwc_params(clone)
    return clone.eval()


def _swap_layers(module: nn.Module, dtype: torch.dtype) -> None:
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, OneDNNLinear(child, dtype))
        elif type(child) is nn.Conv2d and _convertible_conv(child):
            setattr(module, name, OneDNNConv2d(child, dtype))
        else:
            _swap_layers(child, dtype)


def count_onednn_layers(module: nn.Module) -> dict[str, int]:
    """How many layers of each kind run on oneDNN (for reports and tests)."""
    kinds = {"linear": OneDNNLinear, "conv2d": OneDNNConv2d}
    return {k: sum(isinstance(m, t) for m in module.modules()) for k, t in kinds.items()}

