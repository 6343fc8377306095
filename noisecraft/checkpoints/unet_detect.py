"""Detect a :class:`UNetConfig` from an original-layout (LDM/SGM) U-Net state dict.

Everything is read from key names and tensor shapes, so any width is recognised (tiny test
checkpoints too).  Head counts are not stored in weights; the released models' conventions are
applied (see ``noisecraft.models.unet_configs``).  The detected config is then checked against
the full key set and shapes a :class:`UNetModel` of that config would have, so a missing,
alien or mis-shaped key is reported by name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from noisecraft.models.unet import UNetModel
from noisecraft.models.unet_configs import LINEAR_PROJ_HEAD_DIM, SD1_NUM_HEADS, UNetConfig

UNET_PREFIX = "model.diffusion_model."
_MAX_LISTED = 5


def _require(sd: Mapping[str, torch.Tensor], key: str, prefix: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(
            f"not a recognised SD U-Net state dict: missing {prefix + key!r} ({what}). "
            "Expected the original LDM/SGM layout (input_blocks.N / middle_block / "
            "output_blocks.N / time_embed / out)."
        )
    return sd[key]


def _count(keys, pattern: str) -> int:
    regex = re.compile(pattern)
    return len({m.group(1) for k in keys if (m := regex.match(k))})


def _input_levels(sd, prefix: str, model_channels: int):
    """Walk input_blocks.1.. and return per-level lists of (out_channels, depth)."""
    indices = sorted({int(m.group(1)) for k in sd if (m := re.match(r"input_blocks\.(\d+)\.", k))})
    levels: list[list[tuple[int, int]]] = [[]]
    for n in indices[1:]:
        if f"input_blocks.{n}.0.op.weight" in sd:
            levels.append([])
            continue
        w = _require(sd, f"input_blocks.{n}.0.in_layers.2.weight", prefix,
                     f"input_blocks.{n} is neither a ResBlock nor a Downsample")
        depth = _count(sd, rf"input_blocks\.{n}\.1\.transformer_blocks\.(\d+)\.")
        levels[-1].append((w.shape[0], depth))
    if any(not level for level in levels):
        raise ValueError(
            f"U-Net input_blocks {indices} have a resolution level without ResBlocks (two "
            "Downsamples in a row, or a Downsample last); not an SD U-Net layout."
        )
    per_level = []
    for i, level in enumerate(levels):
        if len(set(level)) != 1:
            raise ValueError(
                f"U-Net level {i} mixes ResBlock widths/transformer depths {level}; the SD "
                "layout keeps them equal within a level."
            )
        width, depth = level[0]
        if width % model_channels:
            raise ValueError(f"U-Net level {i} width {width} is not a multiple of model_channels "
                             f"{model_channels}.")
        per_level.append((width // model_channels, len(level), depth))
    return per_level


def unet_config_from_state_dict(sd: Mapping[str, torch.Tensor],
                                prefix: str = UNET_PREFIX) -> UNetConfig:
    """Detect the U-Net architecture of ``sd`` (keys ``prefix + original key``).

    Pass ``prefix=""`` for a bare U-Net state dict.  Raises ValueError naming what was found
    and what was expected when the keys do not form an SD U-Net.
    """
    unet = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    if not unet:
        roots = sorted({k.split(".")[0] for k in sd})[:_MAX_LISTED]
        raise ValueError(f"no keys start with {prefix!r}; the top-level names are {roots}. "
                         "Pass the prefix under which the U-Net is stored (\"\" for none).")
    conv_in = _require(unet, "input_blocks.0.0.weight", prefix, "the input convolution")
    model_channels = conv_in.shape[0]
    levels = _input_levels(unet, prefix, model_channels)
    proj = next((v for k, v in unet.items() if k.endswith(".proj_in.weight")), None)
    to_k = next((v for k, v in unet.items() if k.endswith(".attn2.to_k.weight")), None)
    if proj is None or to_k is None:
        raise ValueError(f"no SpatialTransformer found under {prefix!r} (no proj_in / attn2.to_k "
                         "weights); SD U-Nets have cross-attention at least in the middle block.")
    use_linear = proj.ndim == 2
    label = unet.get("label_emb.0.0.weight")
    heads = ({"num_heads": None, "head_dim": LINEAR_PROJ_HEAD_DIM} if use_linear
             else {"num_heads": SD1_NUM_HEADS, "head_dim": None})
    try:
        config = UNetConfig(
            in_channels=conv_in.shape[1],
            out_channels=_require(unet, "out.2.weight", prefix, "the output convolution").shape[0],
            model_channels=model_channels,
            channel_mult=tuple(m for m, _, _ in levels),
            num_res_blocks=tuple(n for _, n, _ in levels),
            transformer_depth=tuple(d for _, _, d in levels),
            transformer_depth_middle=_count(unet, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
            context_dim=to_k.shape[1],
            use_linear_in_transformer=use_linear,
            adm_in_channels=None if label is None else label.shape[1],
            **heads,
        )
    except ValueError as err:
        raise ValueError(
            f"U-Net state dict under {prefix!r} gives an invalid config: {err}"
        ) from err
    check_unet_state_dict(unet, config, prefix=prefix)
    return config


def check_unet_state_dict(sd: Mapping[str, torch.Tensor], config: UNetConfig, *,
                          prefix: str = "") -> None:
    """Raise ValueError naming missing, unexpected and mis-shaped keys of a bare original-layout
    state dict ``sd`` for ``config`` (``prefix`` is only used in the message)."""
    model = UNetModel(config, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & sd.keys()
                    if tuple(sd[k].shape) != expected[k]
                    and not _proj_layouts_agree(k, tuple(sd[k].shape), expected[k]))
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            listed = ", ".join(prefix + k for k in keys[:_MAX_LISTED])
            problems.append(f"{len(keys)} {label} key(s): {listed}")
    if shapes:
        listed = ", ".join(f"{prefix + k} {tuple(sd[k].shape)} (expected {expected[k]})"
                           for k in shapes[:_MAX_LISTED])
        problems.append(f"{len(shapes)} mis-shaped tensor(s): {listed}")
    if problems:
        raise ValueError(f"U-Net state dict does not match the detected architecture {config}: "
                         + "; ".join(problems))


def _proj_layouts_agree(key: str, got: tuple, want: tuple) -> bool:
    """proj_in/proj_out stored as 1x1 conv where linear is expected (or back) is fine."""
    if not (key.endswith(".proj_in.weight") or key.endswith(".proj_out.weight")):
        return False
    return got[:2] == want[:2] and all(s == 1 for s in got[2:] + want[2:])
