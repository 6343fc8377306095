"""Building blocks of the LDM U-Net, shared with ControlNet.

Module and parameter names follow the original CompVis/Stability checkpoints
(``ldm/modules/diffusionmodules/openaimodel.py`` and ``ldm/modules/attention.py``), so a state
dict loads without renaming: ``in_layers.0`` / ``in_layers.2`` / ``emb_layers.1`` /
``out_layers.0`` / ``out_layers.3`` / ``skip_connection`` for a ResBlock, ``norm`` /
``proj_in`` / ``transformer_blocks.K`` / ``proj_out`` for a SpatialTransformer, ``op`` for a
Downsample and ``conv`` for an Upsample.

Tensor layout: feature maps are ``[B, C, H, W]``, token sequences ``[B, L, C]``.

Not tested here (CPU-only machine): CUDA execution and float16.  The GroupNorm upcast to
float32 below is what the original code does for half precision; attention runs through
``scaled_dot_product_attention`` in the input dtype (SD 2.1-v was trained with fp32-upcast
attention, which SDPA's fused kernels approximate in fp16).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUP_NORM_GROUPS = 32


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0):
    """Sinusoidal embedding of (possibly fractional) timesteps, ``[N] -> [N, dim]`` float32.

    ``[cos(t * f_i), sin(t * f_i)]`` with ``f_i = max_period^(-i / (dim // 2))`` (Vaswani et
    al. 2017, as used by DDPM / LDM; diffusers' ``flip_sin_to_cos=True, freq_shift=0``).
    """
    if timesteps.ndim != 1:
        raise ValueError(
            f"timestep_embedding expects a 1-D tensor, got shape {tuple(timesteps.shape)}"
        )
    half = dim // 2
    exponent = torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    freqs = torch.exp(-math.log(max_period) * exponent)
    args = timesteps.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm (32 groups unless ``groups`` says otherwise) that computes in float32 and
    returns the input dtype."""

    def __init__(self, channels: int, eps: float = 1e-5, *, groups: int = GROUP_NORM_GROUPS,
                 device=None, dtype=None):
        super().__init__(groups, channels, eps=eps, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return super().forward(x)
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """Residual block conditioned on the timestep embedding (Ho et al. 2020, LDM variant).

    ``forward(x [B, C_in, H, W], emb [B, E]) -> [B, C_out, H, W]``.
    """

    def __init__(self, channels: int, emb_channels: int, out_channels: int, *,
                 dropout: float = 0.0, groups: int = GROUP_NORM_GROUPS, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.in_layers = nn.Sequential(
            GroupNorm32(channels, groups=groups, **fk), nn.SiLU(),
            nn.Conv2d(channels, out_channels, 3, padding=1, **fk),
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels, **fk))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels, groups=groups, **fk), nn.SiLU(), nn.Dropout(dropout),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, **fk),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = nn.Conv2d(channels, out_channels, 1, **fk)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class CrossAttention(nn.Module):
    """Multi-head (cross-)attention through ``F.scaled_dot_product_attention``.

    ``forward(x [B, L, query_dim], context [B, M, context_dim] | None) -> [B, L, query_dim]``;
    without ``context`` it is self-attention.
    """

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, dim_head: int, *,
                 device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        inner = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False, **fk)
        self.to_k = nn.Linear(context_dim, inner, bias=False, **fk)
        self.to_v = nn.Linear(context_dim, inner, bias=False, **fk)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim, **fk))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, _ = x.shape
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class GEGLU(nn.Module):
    """``a * gelu(b)`` with ``[a, b] = proj(x)`` (Shazeer 2020, "GLU Variants")."""

    def __init__(self, dim_in: int, dim_out: int, *, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward, 4x wide: keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim: int, *, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        inner = 4 * dim
        self.net = nn.Sequential(
            GEGLU(dim, inner, device=device, dtype=dtype), nn.Dropout(dropout),
            nn.Linear(inner, dim, device=device, dtype=dtype),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, *,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.attn1 = CrossAttention(dim, None, heads, dim_head, **fk)
        self.ff = FeedForward(dim, dropout=dropout, **fk)
        self.attn2 = CrossAttention(dim, context_dim, heads, dim_head, **fk)
        self.norm1 = nn.LayerNorm(dim, **fk)
        self.norm2 = nn.LayerNorm(dim, **fk)
        self.norm3 = nn.LayerNorm(dim, **fk)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map, cross-attending to ``context``.

    ``forward(x [B, C, H, W], context [B, M, context_dim]) -> [B, C, H, W]``.
    ``use_linear`` selects ``nn.Linear`` projections (SD 2.x, SDXL) instead of 1x1 convs
    (SD 1.x); the projection is applied after (linear) or before (conv) flattening.
    """

    def __init__(self, channels: int, heads: int, dim_head: int, depth: int, context_dim: int,
                 *, use_linear: bool, dropout: float = 0.0, groups: int = GROUP_NORM_GROUPS,
                 device=None, dtype=None):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = GroupNorm32(channels, eps=1e-6, groups=groups, **fk)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner, **fk)
            self.proj_out = nn.Linear(inner, channels, **fk)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1, **fk)
            self.proj_out = nn.Conv2d(inner, channels, 1, **fk)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, context_dim, dropout=dropout, **fk)
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in


class Downsample(nn.Module):
    """Stride-2 3x3 convolution: ``[B, C, H, W] -> [B, C, ceil(H/2), ceil(W/2)]``."""

    def __init__(self, channels: int, *, device=None, dtype=None):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling (or to ``size``), then a 3x3 convolution."""

    def __init__(self, channels: int, *, device=None, dtype=None):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(size), mode="nearest")
        return self.conv(x)


class EmbedSequential(nn.Sequential):
    """A ``TimestepEmbedSequential``: passes ``emb`` to ResBlocks, ``context`` to
    SpatialTransformers and the skip's spatial size to an Upsample."""

    def forward(self, x, emb, context=None, upsample_size=None):  # noqa: D102
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, upsample_size)
            else:
                x = layer(x)
        return x
