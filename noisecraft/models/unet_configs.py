"""Configuration of the Stable Diffusion U-Net (LDM ``openaimodel.UNetModel`` / SGM layout).

A :class:`UNetConfig` describes one architecture; :data:`UNET_PRESETS` names the released
ones (SD 1.x, SD 2.x, SDXL base / refiner, their inpainting variants) plus tiny variants with
the same block structure and small widths, for tests.

:func:`unet_layout` turns a config into the ordered list of blocks that the model, the key
mapping (``noisecraft.checkpoints.unet_keys``) and the detector all share, so that the block
bookkeeping (which ``input_blocks.N`` is a ResBlock, where the Downsample sits, how many
channels each skip connection carries) lives in exactly one place.

Attention heads.  Checkpoint weights do not record how the attention width is split into heads.
The released models follow one of two conventions, and the detector applies them:
* SD 1.x (1x1-conv ``proj_in``): a fixed number of heads, 8, at every level (``num_heads=8``);
* SD 2.x and SDXL (linear ``proj_in``): a fixed head width of 64 (``head_dim=64``).
The tiny presets follow the same conventions, so their state dicts detect back to them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

from noisecraft.models.layers import GROUP_NORM_GROUPS

SD1_NUM_HEADS = 8
LINEAR_PROJ_HEAD_DIM = 64


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of an LDM/SGM U-Net.

    Per-level tuples have one entry per resolution level (``len(channel_mult)``).
    ``transformer_depth[level] == 0`` means that level has no SpatialTransformer.
    Exactly one of ``num_heads`` (fixed head count) and ``head_dim`` (fixed head width) is set.
    ``adm_in_channels`` is the width of SDXL's vector conditioning ``y`` (None: no ``label_emb``).
    """

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: tuple[int, ...] = (2, 2, 2, 2)
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1
    num_heads: int | None = SD1_NUM_HEADS
    head_dim: int | None = None
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None
    dropout: float = 0.0
    norm_groups: int = GROUP_NORM_GROUPS
    """GroupNorm groups (diffusers' ``norm_num_groups``): 32 in every released SD model; small
    models want fewer (see ``training/default_model.py``)."""

    def __post_init__(self) -> None:
        n = len(self.channel_mult)
        if n < 1:
            raise ValueError("UNetConfig.channel_mult must name at least one level.")
        for name in ("channel_mult", "num_res_blocks", "transformer_depth"):
            value = getattr(self, name)
            if isinstance(value, int):
                value = (value,) * n
            value = tuple(int(v) for v in value)
            object.__setattr__(self, name, value)
            if len(value) != n:
                raise ValueError(
                    f"UNetConfig.{name} has {len(value)} entries {value}, but channel_mult "
                    f"{self.channel_mult} defines {n} levels; give one entry per level."
                )
        if any(v < 1 for v in self.num_res_blocks):
            raise ValueError(f"UNetConfig.num_res_blocks must be >= 1, got {self.num_res_blocks}.")
        if any(v < 0 for v in self.transformer_depth) or self.transformer_depth_middle < 1:
            raise ValueError(
                "UNetConfig.transformer_depth entries must be >= 0 and transformer_depth_middle "
                f">= 1, got {self.transformer_depth} and {self.transformer_depth_middle}."
            )
        if (self.num_heads is None) == (self.head_dim is None):
            raise ValueError(
                "UNetConfig needs exactly one of num_heads (fixed head count, SD 1.x: 8) and "
                f"head_dim (fixed head width, SD 2.x/SDXL: 64); got num_heads={self.num_heads}, "
                f"head_dim={self.head_dim}."
            )
        for width in self.attention_widths():
            if width % self.norm_groups:
                raise ValueError(
                    f"UNetConfig: attention width {width} is not divisible by the "
                    f"{self.norm_groups} GroupNorm groups (norm_groups)."
                )
            self.heads_for(width)  # raises when the width does not split into heads
        for mult in self.channel_mult:
            if (self.model_channels * mult) % self.norm_groups:
                raise ValueError(
                    f"UNetConfig: level width {self.model_channels}*{mult} is not divisible by "
                    f"the {self.norm_groups} GroupNorm groups (norm_groups); use multiples of "
                    f"{self.norm_groups}."
                )

    @property
    def num_levels(self) -> int:
        return len(self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    def level_channels(self, level: int) -> int:
        return self.model_channels * self.channel_mult[level]

    def attention_widths(self) -> list[int]:
        widths = [self.level_channels(i) for i, d in enumerate(self.transformer_depth) if d]
        return widths + [self.level_channels(self.num_levels - 1)]

    def heads_for(self, width: int) -> tuple[int, int]:
        """(number of heads, head width) of a SpatialTransformer on ``width`` channels."""
        if self.num_heads is not None:
            heads = self.num_heads
            if width % heads:
                raise ValueError(f"UNetConfig: width {width} does not split into {heads} heads.")
            return heads, width // heads
        if width % self.head_dim:
            raise ValueError(
                f"UNetConfig: width {width} is not a multiple of head_dim {self.head_dim}."
            )
        return width // self.head_dim, self.head_dim


class BlockSpec(NamedTuple):
    """One entry of ``input_blocks`` / ``output_blocks``.

    ``kind`` is "conv_in" (input_blocks.0), "down" (a lone Downsample) or "res" (a ResBlock,
    then a SpatialTransformer when ``depth > 0``, then an Upsample when ``upsample``).
    ``level`` is the resolution level and ``slot`` the index inside the level, which is also
    diffusers' ``resnets.{slot}`` / ``attentions.{slot}`` index.
    """

    kind: Literal["conv_in", "down", "res"]
    level: int
    slot: int
    in_channels: int
    out_channels: int
    depth: int
    upsample: bool


class UNetLayout(NamedTuple):
    input_blocks: tuple[BlockSpec, ...]
    output_blocks: tuple[BlockSpec, ...]
    middle_channels: int


def unet_layout(config: UNetConfig) -> UNetLayout:
    """The block plan of ``config``, in checkpoint order (see :class:`BlockSpec`)."""
    ch = config.model_channels
    inputs = [BlockSpec("conv_in", 0, 0, config.in_channels, ch, 0, False)]
    skip_channels = [ch]
    for level in range(config.num_levels):
        out = config.level_channels(level)
        for slot in range(config.num_res_blocks[level]):
            inputs.append(BlockSpec("res", level, slot, ch, out, config.transformer_depth[level],
                                    False))
            ch = out
            skip_channels.append(ch)
        if level != config.num_levels - 1:
            inputs.append(BlockSpec("down", level, 0, ch, ch, 0, False))
            skip_channels.append(ch)
    middle = ch
    outputs = []
    for level in reversed(range(config.num_levels)):
        out = config.level_channels(level)
        n = config.num_res_blocks[level] + 1
        for slot in range(n):
            skip = skip_channels.pop()
            outputs.append(BlockSpec("res", level, slot, ch + skip, out,
                                     config.transformer_depth[level],
                                     level != 0 and slot == n - 1))
            ch = out
    return UNetLayout(tuple(inputs), tuple(outputs), middle)


_SD15 = UNetConfig()
_SD2 = UNetConfig(num_heads=None, head_dim=LINEAR_PROJ_HEAD_DIM, context_dim=1024,
                  use_linear_in_transformer=True)
_SDXL_BASE = UNetConfig(
    channel_mult=(1, 2, 4), num_res_blocks=(2, 2, 2), transformer_depth=(0, 2, 10),
    transformer_depth_middle=10, num_heads=None, head_dim=LINEAR_PROJ_HEAD_DIM, context_dim=2048,
    use_linear_in_transformer=True, adm_in_channels=2816,
)
_SDXL_REFINER = UNetConfig(
    model_channels=384, transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
    num_heads=None, head_dim=LINEAR_PROJ_HEAD_DIM, context_dim=1280,
    use_linear_in_transformer=True, adm_in_channels=2560,
)

# Tiny variants: same block structure, small widths (tests only; see the module docstring for
# why the head conventions match the released models).  SDXL tiny `y` = 32-wide pooled
# embedding + 6 (base) or 5 (refiner) size/score values embedded to 256 each.
_TINY_SD15 = UNetConfig(model_channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                        transformer_depth=(1, 1, 0), context_dim=48)
_TINY_SD2 = UNetConfig(model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=2,
                       transformer_depth=(1, 1, 0), num_heads=None,
                       head_dim=LINEAR_PROJ_HEAD_DIM, context_dim=64,
                       use_linear_in_transformer=True)
_TINY_SDXL_BASE = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 4), num_res_blocks=2, transformer_depth=(0, 1, 2),
    transformer_depth_middle=2, num_heads=None, head_dim=LINEAR_PROJ_HEAD_DIM, context_dim=64,
    use_linear_in_transformer=True, adm_in_channels=32 + 6 * 256,
)
_TINY_SDXL_REFINER = UNetConfig(
    model_channels=32, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
    transformer_depth=(0, 1, 1, 0), transformer_depth_middle=1, num_heads=None,
    head_dim=LINEAR_PROJ_HEAD_DIM, context_dim=48, use_linear_in_transformer=True,
    adm_in_channels=32 + 5 * 256,
)

UNET_PRESETS: dict[str, UNetConfig] = {
    "sd15": _SD15,
    "sd15_inpaint": replace(_SD15, in_channels=9),
    "sd2": _SD2,
    "sd2_inpaint": replace(_SD2, in_channels=9),
    "sdxl_base": _SDXL_BASE,
    "sdxl_refiner": _SDXL_REFINER,
    "sdxl_inpaint": replace(_SDXL_BASE, in_channels=9),
    "tiny_sd15": _TINY_SD15,
    "tiny_sd15_inpaint": replace(_TINY_SD15, in_channels=9),
    "tiny_sd2": _TINY_SD2,
    "tiny_sd2_inpaint": replace(_TINY_SD2, in_channels=9),
    "tiny_sdxl_base": _TINY_SDXL_BASE,
    "tiny_sdxl_refiner": _TINY_SDXL_REFINER,
    "tiny_sdxl_inpaint": replace(_TINY_SDXL_BASE, in_channels=9),
}


def unet_preset(name: str) -> UNetConfig:
    """The preset called ``name``; an unknown name raises a ValueError listing the known ones."""
    try:
        return UNET_PRESETS[name]
    except KeyError:
        raise ValueError(
            f"unknown U-Net preset {name!r}; known presets: {', '.join(UNET_PRESETS)}"
        ) from None


def find_unet_preset(config: UNetConfig) -> str | None:
    """The name of the preset equal to ``config`` (the first, if several are), else None."""
    return next((name for name, preset in UNET_PRESETS.items() if preset == config), None)
