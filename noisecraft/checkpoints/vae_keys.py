"""VAE key names: original ldm (``first_stage_model.*`` stripped) <-> diffusers ``AutoencoderKL``.

All renaming lives in ``MODULE_MAP`` below, a table of module-path templates read in both
directions. Placeholders: ``{side}`` encoder|decoder, ``{level}``/``{j}`` integers, ``{rlevel}``
the decoder level counted from the other end (ldm ``decoder.up.0`` is the *last* diffusers up
block), ``{res}``/``{attn}`` a resnet/attention leaf from ``RESNET_LEAVES``/``ATTN_LEAVES``.
ldm stores attention q/k/v/proj_out as 1x1 convs (C, C, 1, 1); diffusers as linear (C, C).

Also: ``vae_config_to_diffusers`` (AutoencoderKL kwargs), ``vae_config_from_diffusers`` and
``vae_config_from_state_dict`` (architecture read from tensor shapes).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from functools import cache
from types import MappingProxyType

import torch

from noisecraft.models.vae import VAEConfig

__all__ = [
    "MODULE_MAP",
    "VAE_PREFIXES",
    "strip_vae_prefix",
    "vae_state_dict_from_diffusers",
    "vae_state_dict_to_diffusers",
    "vae_config_to_diffusers",
    "vae_config_from_diffusers",
    "vae_config_from_state_dict",
]

RESNET_LEAVES = MappingProxyType(
    {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
     "nin_shortcut": "conv_shortcut"}
)  # fmt: skip
ATTN_LEAVES = MappingProxyType(
    {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
)

# (original module path, diffusers module path); a parameter key is "<module path>.<weight|bias>".
MODULE_MAP: tuple[tuple[str, str], ...] = (
    ("{side}.conv_in", "{side}.conv_in"),
    ("{side}.norm_out", "{side}.conv_norm_out"),
    ("{side}.conv_out", "{side}.conv_out"),
    ("{side}.mid.block_1.{res}", "{side}.mid_block.resnets.0.{res}"),
    ("{side}.mid.attn_1.{attn}", "{side}.mid_block.attentions.0.{attn}"),
    ("{side}.mid.block_2.{res}", "{side}.mid_block.resnets.1.{res}"),
    ("encoder.down.{level}.block.{j}.{res}", "encoder.down_blocks.{level}.resnets.{j}.{res}"),
    ("encoder.down.{level}.downsample.conv", "encoder.down_blocks.{level}.downsamplers.0.conv"),
    ("decoder.up.{level}.block.{j}.{res}", "decoder.up_blocks.{rlevel}.resnets.{j}.{res}"),
    ("decoder.up.{level}.upsample.conv", "decoder.up_blocks.{rlevel}.upsamplers.0.conv"),
    ("quant_conv", "quant_conv"),
    ("post_quant_conv", "post_quant_conv"),
)

VAE_PREFIXES = ("first_stage_model.", "vae.")

_LEAF_TABLES = {"res": RESNET_LEAVES, "attn": ATTN_LEAVES}


def _alternatives(names) -> str:
    return "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))


@cache
def _compiled(to_diffusers: bool) -> tuple[tuple[re.Pattern, str], ...]:
    """Regexes for the source side of MODULE_MAP, each with the target template."""
    rules = []
    for original, diffusers in MODULE_MAP:
        src, dst = (original, diffusers) if to_diffusers else (diffusers, original)
        pattern = re.escape(src)
        for name in ("side", "level", "rlevel", "j", "res", "attn"):
            if name in _LEAF_TABLES:
                table = _LEAF_TABLES[name]
                group = _alternatives(table.keys() if to_diffusers else table.values())
            else:
                group = "encoder|decoder" if name == "side" else r"\d+"
            pattern = pattern.replace(re.escape("{" + name + "}"), f"(?P<{name}>{group})")
        rules.append((re.compile(pattern + r"\.(?P<param>weight|bias)"), dst))
    return tuple(rules)


def _rename(key: str, to_diffusers: bool, num_levels: int) -> str:
    for pattern, template in _compiled(to_diffusers):
        m = pattern.fullmatch(key)
        if m is None:
            continue
        values = dict(m.groupdict())
        for name, table in _LEAF_TABLES.items():
            if values.get(name) is not None:
                table = table if to_diffusers else {v: k for k, v in table.items()}
                values[name] = table[values[name]]
        # ldm decoder.up.{level} <-> diffusers decoder.up_blocks.{num_levels - 1 - level}
        if values.get("level") is not None and "{rlevel}" in template:
            values["rlevel"] = str(num_levels - 1 - int(values["level"]))
        elif values.get("rlevel") is not None:
            values["level"] = str(num_levels - 1 - int(values["rlevel"]))
        return template.format(**values) + "." + values["param"]
    side = "original (ldm)" if to_diffusers else "diffusers"
    allowed = ", ".join(t[0 if to_diffusers else 1] for t in MODULE_MAP)
    raise KeyError(f"VAE key {key!r} is not a {side} AutoencoderKL key; known modules: {allowed}")


def _num_levels(keys, pattern: str) -> int:
    levels = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    if not levels:
        raise KeyError(f"VAE state dict has no keys matching {pattern!r}; is this a VAE?")
    return max(levels) + 1


# ldm attention projections (1x1 convs); diffusers stores them as linear weights.
_ATTN_PROJ_WEIGHT = re.compile(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v|proj_out)\.weight")


def strip_vae_prefix(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys under ``first_stage_model.`` (or ``vae.``) of a full checkpoint, prefix removed.

    A state dict that is already a bare VAE (has ``encoder.conv_in.weight``) is returned as is.
    """
    if "encoder.conv_in.weight" in state_dict:
        return dict(state_dict)
    for prefix in VAE_PREFIXES:
        if f"{prefix}encoder.conv_in.weight" in state_dict:
            n = len(prefix)
            return {k[n:]: v for k, v in state_dict.items() if k.startswith(prefix)}
    raise KeyError(
        "no VAE found: expected 'encoder.conv_in.weight' with no prefix or one of "
        f"{VAE_PREFIXES}; {len(state_dict)} keys given"
    )


def vae_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original ldm VAE keys -> diffusers AutoencoderKL keys (attention 1x1 convs -> linear)."""
    n = _num_levels(sd, r"decoder\.up\.(\d+)\.")
    out = {}
    for key, value in sd.items():
        new = _rename(key, True, n)
        if _ATTN_PROJ_WEIGHT.fullmatch(key) and value.ndim > 2:
            value = value.reshape(value.shape[:2])
        out[new] = value
    return out


# diffusers before 0.14 (still found in e.g. sd-vae-ft-mse's .bin) named the attention leaves
# query/key/value/proj_attn; read them as their current names.
_LEGACY_DIFFUSERS_ATTN = re.compile(r"(.*\.attentions\.0\.)(query|key|value|proj_attn)(\.\w+)")
_LEGACY_LEAVES = MappingProxyType(
    {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
)


def _modern_diffusers_key(key: str) -> str:
    m = _LEGACY_DIFFUSERS_ATTN.fullmatch(key)
    return key if m is None else m.group(1) + _LEGACY_LEAVES[m.group(2)] + m.group(3)


def vae_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys (current or pre-0.14 attention names) -> original ldm keys.

    Attention projections become (C, C, 1, 1) 1x1-conv weights.
    """
    n = _num_levels(sd, r"decoder\.up_blocks\.(\d+)\.")
    out = {}
    for key, value in sd.items():
        new = _rename(_modern_diffusers_key(key), False, n)
        if _ATTN_PROJ_WEIGHT.fullmatch(new) and value.ndim == 2:
            value = value.reshape(*value.shape, 1, 1)
        out[new] = value
    return out


def vae_config_to_diffusers(config: VAEConfig, *, scaling_factor: float | None = None) -> dict:
    """Keyword arguments for ``diffusers.AutoencoderKL`` describing the same architecture."""
    if config.embed_dim != config.z_channels or not config.double_z or config.dropout:
        raise ValueError(
            "diffusers' AutoencoderKL needs embed_dim == z_channels, double_z=True and dropout=0; "
            f"got embed_dim={config.embed_dim}, z_channels={config.z_channels}, "
            f"double_z={config.double_z}, dropout={config.dropout}"
        )
    n = len(config.ch_mult)
    kwargs = {
        "in_channels": config.in_channels,
        "out_channels": config.out_ch,
        "down_block_types": ("DownEncoderBlock2D",) * n,
        "up_block_types": ("UpDecoderBlock2D",) * n,
        "block_out_channels": config.widths,
        "layers_per_block": config.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": config.z_channels,
        "norm_num_groups": config.norm_groups,
        "sample_size": config.resolution,
        "use_quant_conv": config.use_quant_conv,
        "use_post_quant_conv": config.use_quant_conv,
        "mid_block_add_attention": config.mid_attention,
    }
    if scaling_factor is not None:
        kwargs["scaling_factor"] = scaling_factor
    return kwargs


def vae_config_from_diffusers(cfg: Mapping) -> VAEConfig:
    """VAEConfig from a diffusers AutoencoderKL ``config.json`` dict."""
    widths = tuple(cfg["block_out_channels"])
    ch = widths[0]
    if any(w % ch for w in widths) or cfg.get("act_fn", "silu") != "silu":
        raise ValueError(
            f"unsupported diffusers VAE config: block_out_channels {widths} must be multiples of "
            f"the first, act_fn must be 'silu' (got {cfg.get('act_fn')!r})"
        )
    if cfg.get("use_quant_conv", True) != cfg.get("use_post_quant_conv", True):
        raise ValueError("unsupported diffusers VAE config: use_quant_conv != use_post_quant_conv")
    size = cfg.get("sample_size", 256)
    return VAEConfig(
        ch=ch,
        ch_mult=tuple(w // ch for w in widths),
        num_res_blocks=cfg.get("layers_per_block", 1),
        z_channels=cfg.get("latent_channels", 4),
        embed_dim=cfg.get("latent_channels", 4),
        in_channels=cfg.get("in_channels", 3),
        out_ch=cfg.get("out_channels", 3),
        resolution=size[0] if isinstance(size, list | tuple) else size,
        norm_groups=cfg.get("norm_num_groups", 32),
        use_quant_conv=cfg.get("use_quant_conv", True),
        mid_attention=cfg.get("mid_block_add_attention", True),
    )


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise KeyError(
            f"cannot read the VAE architecture: key {key!r} is missing (expected original ldm "
            "VAE keys such as 'encoder.conv_in.weight', 'encoder.down.0.block.0.conv1.weight')"
        )
    return tuple(sd[key].shape)


def vae_config_from_state_dict(
    sd: Mapping[str, torch.Tensor], *, norm_groups: int = 32, resolution: int = 256
) -> VAEConfig:
    """Read the architecture from tensor shapes of an ldm-keyed (or diffusers-keyed) VAE.

    GroupNorm's group count is not visible in shapes: pass ``norm_groups`` if it is not 32.
    """
    if "encoder.down_blocks.0.resnets.0.conv1.weight" in sd:
        sd = vae_state_dict_from_diffusers(sd)
    ch, in_channels = _shape(sd, "encoder.conv_in.weight")[:2]
    levels = _num_levels(sd, r"encoder\.down\.(\d+)\.")
    num_res_blocks = _num_levels(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    ch_mult = []
    for level in range(levels):
        width = _shape(sd, f"encoder.down.{level}.block.0.conv1.weight")[0]
        if width % ch:
            raise ValueError(f"VAE level {level} width {width} is not a multiple of ch={ch}")
        ch_mult.append(width // ch)
    z_channels = _shape(sd, "decoder.conv_in.weight")[1]
    z_out = _shape(sd, "encoder.conv_out.weight")[0]
    if z_out not in (z_channels, 2 * z_channels):
        raise ValueError(f"encoder.conv_out has {z_out} outputs; expected {2 * z_channels}")
    use_quant_conv = "quant_conv.weight" in sd
    embed_dim = _shape(sd, "post_quant_conv.weight")[1] if use_quant_conv else z_channels
    dec_levels = _num_levels(sd, r"decoder\.up\.(\d+)\.")
    dec_blocks = _num_levels(sd, r"decoder\.up\.0\.block\.(\d+)\.")
    if dec_levels != levels or dec_blocks != num_res_blocks + 1:
        raise ValueError(
            f"inconsistent VAE: encoder has {levels} levels x {num_res_blocks} blocks, decoder "
            f"{dec_levels} levels x {dec_blocks} blocks (expected {num_res_blocks + 1})"
        )
    return VAEConfig(
        ch=ch,
        ch_mult=tuple(ch_mult),
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        embed_dim=embed_dim,
        in_channels=in_channels,
        out_ch=_shape(sd, "decoder.conv_out.weight")[0],
        resolution=resolution,
        double_z=z_out == 2 * z_channels,
        norm_groups=norm_groups,
        use_quant_conv=use_quant_conv,
        mid_attention="encoder.mid.attn_1.q.weight" in sd,
    )
