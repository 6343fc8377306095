"""AutoencoderKL: the KL-regularised image autoencoder of latent diffusion (SD 1.x/2.x, SDXL).

Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", sec. 3 and
appendix G. An image ``x`` of shape (B, 3, H, W) in [-1, 1] is encoded to a diagonal Gaussian
posterior over latents ``z`` of shape (B, embed_dim, H/f, W/f), with ``f = 2**(len(ch_mult)-1)``;
the decoder maps ``z`` back to an image in (roughly) [-1, 1].

Module names are the original ``ldm`` names, so ``AutoencoderKL.state_dict()`` keys equal the keys
of a single-file checkpoint after stripping ``first_stage_model.``; diffusers' names are handled
by ``noisecraft.checkpoints.vae_keys``. The latents here are *image latents*; the scaling to the
diffusion model's latent space lives in ``noisecraft.models.latent_formats``.

Not testable on this machine (CPU only): CUDA and fp16 execution. The SDXL VAE is known to
overflow in fp16 (use fp32/bf16 or the fp16-fix weights); bf16 is exercised on CPU in the tests.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "VAEConfig",
    "SD_VAE",
    "SDXL_VAE",
    "TINY_VAE",
    "VAE_PRESETS",
    "DiagonalGaussian",
    "AutoencoderKL",
]


@dataclass(frozen=True)
class VAEConfig:
    """Architecture of an AutoencoderKL (the ``ddconfig`` of the original ldm yaml files).

    ``ch`` is the base width, level ``i`` has width ``ch * ch_mult[i]``; every level but the last
    halves the resolution. ``z_channels`` is the encoder/decoder latent width, ``embed_dim`` the
    width after ``quant_conv`` (the latent the diffusion model sees; equal to ``z_channels`` in all
    released SD VAEs). ``resolution`` is informational (training resolution).
    """

    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    in_channels: int = 3
    out_ch: int = 3
    resolution: int = 256
    double_z: bool = True
    norm_groups: int = 32
    use_quant_conv: bool = True
    mid_attention: bool = True
    dropout: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError(f"VAEConfig.ch_mult must be positive ints, got {self.ch_mult}")
        for name in ("ch", "num_res_blocks", "z_channels", "embed_dim", "in_channels", "out_ch"):
            if getattr(self, name) < 1:
                raise ValueError(f"VAEConfig.{name} must be >= 1, got {getattr(self, name)}")
        bad = [w for w in self.widths if w % self.norm_groups]
        if bad:
            raise ValueError(
                f"VAEConfig: widths {self.widths} must all be divisible by norm_groups="
                f"{self.norm_groups} (GroupNorm); offending widths {bad}"
            )
        if not self.use_quant_conv and self.embed_dim != self.z_channels:
            raise ValueError(
                "VAEConfig: without quant_conv, embed_dim must equal z_channels "
                f"(got embed_dim={self.embed_dim}, z_channels={self.z_channels})"
            )

    @property
    def widths(self) -> tuple[int, ...]:
        """Channel width of each resolution level."""
        return tuple(self.ch * m for m in self.ch_mult)

    @property
    def downscale_factor(self) -> int:
        """Spatial factor between image and latent (8 for SD)."""
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def latent_channels(self) -> int:
        return self.embed_dim


SD_VAE = VAEConfig(resolution=256)
SDXL_VAE = VAEConfig(resolution=1024)  # same architecture as SD's; only the weights differ
# The real block structure (2 levels, downsample, mid attention, nin_shortcut) at tiny width.
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, resolution=32)
VAE_PRESETS = MappingProxyType({"sd": SD_VAE, "sdxl": SDXL_VAE, "tiny": TINY_VAE})


def _norm(channels: int, groups: int, factory: dict) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True, **factory)


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1 ``nin_shortcut`` when widths differ) skip."""

    def __init__(self, c_in: int, c_out: int, groups: int, dropout: float, factory: dict):
        super().__init__()
        self.norm1 = _norm(c_in, groups, factory)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, **factory)
        self.norm2 = _norm(c_out, groups, factory)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, **factory)
        if c_in != c_out:
            self.nin_shortcut = nn.Conv2d(c_in, c_out, 1, **factory)
        else:
            self.nin_shortcut = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


def _conv1x1_weight_hook(module, state_dict, prefix, *_args) -> None:
    """Accept q/k/v/proj_out weights stored as linear (C, C) or conv1d (C, C, 1) tensors."""
    for name in ("q", "k", "v", "proj_out"):
        key = f"{prefix}{name}.weight"
        w = state_dict.get(key)
        if w is not None and w.ndim in (2, 3):
            state_dict[key] = w.reshape(*w.shape[:2], 1, 1)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, head width = channels, residual."""

    def __init__(self, channels: int, groups: int, factory: dict):
        super().__init__()
        self.norm = _norm(channels, groups, factory)
        self.q = nn.Conv2d(channels, channels, 1, **factory)
        self.k = nn.Conv2d(channels, channels, 1, **factory)
        self.v = nn.Conv2d(channels, channels, 1, **factory)
        self.proj_out = nn.Conv2d(channels, channels, 1, **factory)
        self.register_load_state_dict_pre_hook(_conv1x1_weight_hook)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.norm(x)

        def tokens(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, 1, HW, C)
            return t.reshape(b, 1, c, h * w).transpose(-1, -2)

        q, k, v = tokens(self.q(hn)), tokens(self.k(hn)), tokens(self.v(hn))
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), one head
        out = out.transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after asymmetric zero padding (right/bottom by one), as in ldm."""

    def __init__(self, channels: int, factory: dict):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int, factory: dict):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    def __init__(self, channels: int, cfg: VAEConfig, factory: dict):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout, factory)
        self.attn_1 = AttnBlock(channels, cfg.norm_groups, factory) if cfg.mid_attention else None
        self.block_2 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout, factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block_1(x)
        if self.attn_1 is not None:
            x = self.attn_1(x)
        return self.block_2(x)


class Encoder(nn.Module):
    """(B, in_channels, H, W) -> (B, 2*z_channels or z_channels, H/f, W/f)."""

    def __init__(self, cfg: VAEConfig, factory: dict):
        super().__init__()
        widths = cfg.widths
        self.conv_in = nn.Conv2d(cfg.in_channels, cfg.ch, 3, padding=1, **factory)
        self.down = nn.ModuleList()
        c_in = cfg.ch
        for level, c_out in enumerate(widths):
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(c_in, c_out, cfg.norm_groups, cfg.dropout, factory))
                c_in = c_out
            if level != len(widths) - 1:
                stage.downsample = Downsample(c_out, factory)
            self.down.append(stage)
        self.mid = MidBlock(c_in, cfg, factory)
        self.norm_out = _norm(c_in, cfg.norm_groups, factory)
        z_out = 2 * cfg.z_channels if cfg.double_z else cfg.z_channels
        self.conv_out = nn.Conv2d(c_in, z_out, 3, padding=1, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, out_ch, h*f, w*f). ``up[i]`` is level ``i``, run last first."""

    def __init__(self, cfg: VAEConfig, factory: dict):
        super().__init__()
        widths = cfg.widths
        c_in = widths[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, c_in, 3, padding=1, **factory)
        self.mid = MidBlock(c_in, cfg, factory)
        stages: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            c_out = widths[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(c_in, c_out, cfg.norm_groups, cfg.dropout, factory))
                c_in = c_out
            if level != 0:
                stage.upsample = Upsample(c_out, factory)
            stages.append(stage)
        self.up = nn.ModuleList(reversed(stages))  # key order as in ldm: up.0 is the finest level
        self.norm_out = _norm(c_in, cfg.norm_groups, factory)
        self.conv_out = nn.Conv2d(c_in, cfg.out_ch, 3, padding=1, **factory)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


@dataclass
class DiagonalGaussian:
    """Posterior q(z|x) = N(mean, exp(logvar)), tensors of shape (B, embed_dim, h, w).

    ``logvar`` is clamped to [-30, 20] as in ldm.
    """

    mean: torch.Tensor
    logvar: torch.Tensor
    std: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.logvar = self.logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor) -> DiagonalGaussian:
        """Split (B, 2C, h, w) moments into mean and logvar along channels."""
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * eps, eps ~ N(0, I) drawn from ``generator`` (on the tensors' device)."""
        eps = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) summed over (C, h, w): shape (B,)."""
        return 0.5 * (self.mean.pow(2) + self.std.pow(2) - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    """The SD/SDXL VAE: ``encode(x)`` -> posterior over image latents, ``decode(z)`` -> image.

    Images are (B, 3, H, W) in [-1, 1] with H, W multiples of ``config.downscale_factor``.
    Build on ``device="meta"`` and ``load_state_dict(sd, assign=True)`` to load without a copy.
    """

    def __init__(
        self,
        config: VAEConfig = SD_VAE,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.encoder = Encoder(config, factory)
        self.decoder = Decoder(config, factory)
        z2, e2 = 2 * config.z_channels, 2 * config.embed_dim
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(z2, e2, 1, **factory)
            self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1, **factory)
        else:
            self.quant_conv = None
            self.post_quant_conv = None

    def _encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x, self.config.in_channels, self.config.downscale_factor, "image")
        h = self.encoder(x)
        return h if self.quant_conv is None else self.quant_conv(h)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """x: (B, in_channels, H, W) in [-1, 1] -> posterior over (B, embed_dim, H/f, W/f)."""
        return DiagonalGaussian.from_moments(self._encode_moments(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (B, embed_dim, h, w) image latent -> (B, out_ch, h*f, w*f), roughly in [-1, 1]."""
        self._check_input(z, self.config.embed_dim, 1, "latent")
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Reconstruction with a posterior sample (for training)."""
        return self.decode(self.encode(x).sample(generator))

    def decode_tiled(self, z: torch.Tensor, tile: int = 64, overlap: int = 16) -> torch.Tensor:
        """Decode in overlapping ``tile`` x ``tile`` latent tiles, blended linearly in the overlaps.

        Peak memory is that of one tile. Not bit-identical to ``decode``: GroupNorm statistics and
        mid-block attention see one tile, not the whole image.
        """
        f = self.config.downscale_factor
        return tiled_apply(self.decode, z, tile=tile, overlap=overlap, scale_num=f, scale_den=1)

    def encode_tiled(
        self, x: torch.Tensor, tile: int = 512, overlap: int = 128
    ) -> DiagonalGaussian:
        """Encode in overlapping pixel tiles (multiples of the downscale factor), blend moments."""
        f = self.config.downscale_factor
        if tile % f or overlap % f:
            raise ValueError(
                f"encode_tiled: tile={tile} and overlap={overlap} must be multiples of the "
                f"downscale factor {f}"
            )
        self._check_input(x, self.config.in_channels, f, "image")
        moments = tiled_apply(
            self._encode_moments, x, tile=tile, overlap=overlap, scale_num=1, scale_den=f
        )
        return DiagonalGaussian.from_moments(moments)

    @staticmethod
    def _check_input(t: torch.Tensor, channels: int, multiple: int, what: str) -> None:
        if t.ndim != 4 or t.shape[1] != channels:
            raise ValueError(
                f"AutoencoderKL expected a {what} of shape (B, {channels}, H, W), "
                f"got {tuple(t.shape)}"
            )
        if t.shape[-1] % multiple or t.shape[-2] % multiple:
            raise ValueError(
                f"AutoencoderKL: {what} height and width must be multiples of {multiple}, "
                f"got {tuple(t.shape[-2:])}"
            )


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile origins covering [0, size): regular steps, the last tile flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return starts


def _ramp_weights(starts: list[int], tile: int, size: int, scale: float) -> list[torch.Tensor]:
    """1-D blend weights per tile (output units): linear ramps where neighbouring tiles overlap."""
    out = []
    for n, s in enumerate(starts):
        length = min(tile, size - s)
        w = torch.ones(round(length * scale), dtype=torch.float64)
        if n > 0:  # overlap with the previous tile
            ov = round((starts[n - 1] + tile - s) * scale)
            w[:ov] = torch.minimum(w[:ov], (torch.arange(ov, dtype=torch.float64) + 0.5) / ov)
        if n + 1 < len(starts):  # overlap with the next tile
            ov = round((s + tile - starts[n + 1]) * scale)
            ramp = (torch.arange(ov, 0, -1, dtype=torch.float64) - 0.5) / ov
            w[len(w) - ov :] = torch.minimum(w[len(w) - ov :], ramp)
        out.append(w)
    return out


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    scale_num: int,
    scale_den: int,
) -> torch.Tensor:
    """Apply a spatial map ``fn`` (output size = input size * scale_num / scale_den) tile by tile.

    ``x`` is (B, C, H, W); tiles are ``tile`` x ``tile`` in input units with at least ``overlap``
    shared rows/columns; outputs are averaged with weights that ramp linearly across each overlap
    (a partition of unity, so a map that commutes with cropping is reproduced exactly).
    """
    if tile < 1 or not 0 <= overlap < tile:
        raise ValueError(f"tiled: need tile >= 1 and 0 <= overlap < tile, got {tile=}, {overlap=}")
    scale = scale_num / scale_den
    (H, W), stride = x.shape[-2:], tile - overlap
    ys, xs = _tile_starts(H, tile, stride), _tile_starts(W, tile, stride)
    wy, wx = _ramp_weights(ys, tile, H, scale), _ramp_weights(xs, tile, W, scale)
    out = acc = None
    out_dtype = x.dtype
    for y0, w_y in zip(ys, wy, strict=True):
        for x0, w_x in zip(xs, wx, strict=True):
            piece = fn(x[..., y0 : y0 + tile, x0 : x0 + tile])
            if out is None:
                out_dtype = piece.dtype
                out_hw = (round(H * scale), round(W * scale))
                f32 = {"device": piece.device, "dtype": torch.float32}
                out = torch.zeros(*piece.shape[:2], *out_hw, **f32)
                acc = torch.zeros(out_hw, **f32)
            w = (w_y[:, None] * w_x[None, :]).to(device=piece.device, dtype=torch.float32)
            oy, ox = round(y0 * scale), round(x0 * scale)
            region = (slice(oy, oy + w.shape[0]), slice(ox, ox + w.shape[1]))
            out[(..., *region)] += piece.float() * w
            acc[region] += w
    return (out / acc).to(out_dtype)
