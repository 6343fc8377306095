"""ControlNet files: key naming, architecture detection and loading.

Three layouts exist and all load into :class:`~noisecraft.models.controlnet.ControlNet`, whose
own keys are the original single-file ones:

* original single files (lllyasviel's ``control_*.pth`` / ``.safetensors``, thibaud's SD 2.1
  ones): keys ``control_model.<key>`` or bare ``<key>``;
* diffusers folders: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (``ControlNetModel``
  names; a pipeline folder's ``controlnet/`` subfolder works too);
* single files in diffusers naming (``controlnet_cond_embedding.conv_in.weight`` present).

Naming is one declarative table: the encoder half is the U-Net's
(:func:`noisecraft.checkpoints.unet_keys.unet_module_map`, whose ``input_blocks`` /
``middle_block`` / ``time_embed`` / ``label_emb`` entries are reused as they are), and
:func:`control_parts` names the ControlNet-only modules.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from noisecraft.checkpoints.files import CheckpointError, open_state_dict
from noisecraft.checkpoints.unet_detect import _count, _input_levels, _proj_layouts_agree
from noisecraft.checkpoints.unet_keys import (
    _fit_proj,
    unet_config_to_diffusers,
    unet_module_map,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from noisecraft.models.controlnet import ControlNet, ControlNetConfig
from noisecraft.models.unet_configs import (
    LINEAR_PROJ_HEAD_DIM,
    SD1_NUM_HEADS,
    UNetConfig,
    unet_layout,
)

CONTROLNET_PREFIX = "control_model."
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors",
                     "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.bin")
_ENCODER_ROOTS = ("input_blocks.", "middle_block.", "time_embed.", "label_emb.")
_CONTROL_ROOTS = ("input_hint_block.", "zero_convs.", "middle_block_out.")
_DIFFUSERS_CONTROL_ROOTS = ("controlnet_cond_embedding.", "controlnet_down_blocks.",
                            "controlnet_mid_block.")
_MAX_LISTED = 5


def control_parts(config: ControlNetConfig) -> dict[str, str]:
    """``{diffusers module: original module}`` for the ControlNet-only modules.

    ``input_hint_block`` keeps its convs at even indices (SiLUs between them), diffusers names
    them ``conv_in``, ``blocks.0 ..`` and ``conv_out``; ``zero_convs.N.0`` are
    ``controlnet_down_blocks.N`` and ``middle_block_out.0`` is ``controlnet_mid_block``.
    """
    n_blocks = 2 * (len(config.hint_block_channels) - 1)
    table = {"controlnet_cond_embedding.conv_in": "input_hint_block.0",
             "controlnet_cond_embedding.conv_out": f"input_hint_block.{2 * (n_blocks + 1)}",
             "controlnet_mid_block": "middle_block_out.0"}
    table.update({f"controlnet_cond_embedding.blocks.{j}": f"input_hint_block.{2 * (j + 1)}"
                  for j in range(n_blocks)})
    table.update({f"controlnet_down_blocks.{n}": f"zero_convs.{n}.0"
                  for n in range(len(unet_layout(config.unet).input_blocks))})
    return table


def controlnet_module_map(config: ControlNetConfig) -> dict[str, str]:
    """``{diffusers module path: original module path}`` for every ControlNet module with
    parameters: the U-Net's encoder entries plus :func:`control_parts`."""
    shared = {d: o for d, o in unet_module_map(config.unet).items()
              if o.startswith(_ENCODER_ROOTS)}
    return {**shared, **control_parts(config)}


def _split(sd: Mapping[str, torch.Tensor], roots: tuple[str, ...]):
    own = {k: v for k, v in sd.items() if k.startswith(roots)}
    return own, {k: v for k, v in sd.items() if k not in own}


def _rename_parts(sd, table: dict[str, str], source: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module not in table:
            unknown.append(key)
        else:
            out[f"{table[module]}.{param}"] = value
    if unknown:
        raise ValueError(f"{len(unknown)} {source} ControlNet key(s) do not fit this "
                         f"architecture, e.g. {', '.join(sorted(unknown)[:_MAX_LISTED])}; "
                         f"expected modules such as {', '.join(list(table)[:3])}")
    return out


def controlnet_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor],
                                         config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``ControlNetModel`` state dict to original keys (no prefix)."""
    own, shared = _split(sd, _DIFFUSERS_CONTROL_ROOTS)
    out = _rename_parts(own, control_parts(config), "diffusers")
    out.update(unet_state_dict_from_diffusers(shared, config.unet))
    return out


def controlnet_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor],
                                       config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """Rename an original-layout ControlNet state dict (no prefix) to diffusers keys."""
    own, shared = _split(sd, _CONTROL_ROOTS)
    inverse = {o: d for d, o in control_parts(config).items()}
    out = _rename_parts(own, inverse, "original")
    out.update(unet_state_dict_to_diffusers(shared, config.unet))
    return out


# ---------------------------------------------------------------------------------------------
# diffusers config.json <-> ControlNetConfig
# ---------------------------------------------------------------------------------------------

_UNET_KWARGS = ("in_channels", "down_block_types", "block_out_channels",
                "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim",
                "use_linear_projection", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
                "freq_shift", "downsample_padding", "act_fn", "addition_embed_type",
                "addition_time_embed_dim", "projection_class_embeddings_input_dim")


def controlnet_config_to_diffusers(config: ControlNetConfig) -> dict:
    """Keyword arguments for diffusers' ``ControlNetModel`` with this architecture (which
    needs the same number of ResBlocks at every level)."""
    if len(set(config.unet.num_res_blocks)) != 1:
        raise ValueError(f"diffusers' ControlNetModel needs one num_res_blocks for all levels, "
                         f"got {config.unet.num_res_blocks}")
    unet = unet_config_to_diffusers(config.unet)
    kwargs = {k: unet[k] for k in _UNET_KWARGS if k in unet}
    kwargs.update(layers_per_block=config.unet.num_res_blocks[0],
                  mid_block_type="UNetMidBlock2DCrossAttn",
                  conditioning_channels=config.hint_channels,
                  conditioning_embedding_out_channels=config.hint_block_channels,
                  global_pool_conditions=config.global_average_pooling)
    return kwargs


def _per_level(value, n: int, name: str) -> list[int]:
    values = [value] * n if isinstance(value, int) else list(value)
    if len(values) != n:
        raise ValueError(f"diffusers ControlNet config: {name} has {len(values)} entries for "
                         f"{n} levels")
    return values


def _heads(widths: list[int], heads: list[int], levels: list[int], use_linear: bool) -> dict:
    """Head convention from diffusers' per-level head counts at the attention levels."""
    counts = {heads[i] for i in levels}
    dims = {widths[i] // heads[i] for i in levels if widths[i] % heads[i] == 0}
    if len(counts) == 1 and (not use_linear or len(dims) != 1):
        return {"num_heads": counts.pop(), "head_dim": None}
    if len(dims) == 1 and all(widths[i] % heads[i] == 0 for i in levels):
        return {"num_heads": None, "head_dim": dims.pop()}
    raise ValueError(f"diffusers ControlNet config: head counts {heads} over widths {widths} "
                     "follow neither a fixed head count nor a fixed head width")


def controlnet_config_from_diffusers(cfg: Mapping) -> ControlNetConfig:
    """A :class:`ControlNetConfig` from a diffusers ``ControlNetModel`` ``config.json``."""
    unsupported = {k: cfg.get(k) for k in ("class_embed_type", "encoder_hid_dim",
                                           "num_class_embeds") if cfg.get(k) is not None}
    mid = cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    add = cfg.get("addition_embed_type")
    if unsupported or mid != "UNetMidBlock2DCrossAttn" or add not in (None, "text_time"):
        raise ValueError(
            f"unsupported diffusers ControlNet variant ({unsupported}, mid_block_type={mid!r}, "
            f"addition_embed_type={add!r}); supported: SD 1.x / SD 2.x / SDXL ControlNets with "
            "a cross-attention middle block"
        )
    widths = list(cfg["block_out_channels"])
    n, mc = len(widths), widths[0]
    types = list(cfg["down_block_types"])
    layers = _per_level(cfg.get("transformer_layers_per_block", 1), n,
                        "transformer_layers_per_block")
    depth = [layers[i] if "CrossAttn" in types[i] else 0 for i in range(n)]
    heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), n,
                       "attention_head_dim")
    use_linear = bool(cfg.get("use_linear_projection", False))
    attn_levels = sorted({i for i in range(n) if depth[i]} | {n - 1})
    unet = UNetConfig(
        in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("in_channels", 4),
        model_channels=mc, channel_mult=tuple(w // mc for w in widths),
        num_res_blocks=cfg.get("layers_per_block", 2), transformer_depth=tuple(depth),
        transformer_depth_middle=layers[-1], context_dim=cfg["cross_attention_dim"],
        use_linear_in_transformer=use_linear,
        adm_in_channels=cfg.get("projection_class_embeddings_input_dim") if add else None,
        **_heads(widths, heads, attn_levels, use_linear),
    )
    return ControlNetConfig(
        unet, hint_channels=cfg.get("conditioning_channels", 3),
        hint_block_channels=tuple(cfg.get("conditioning_embedding_out_channels")
                                  or (16, 32, 96, 256)),
        global_average_pooling=bool(cfg.get("global_pool_conditions", False)),
    )


def _diffusers_config_from_keys(sd: Mapping[str, torch.Tensor]) -> dict:
    """A diffusers-style config read from the shapes of a diffusers-named state dict."""
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.(\d+)\.", k))})
    widths = [sd[f"down_blocks.{i}.resnets.0.conv1.weight"].shape[0] for i in levels]
    depth = [_count(sd, rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.")
             for i in levels]
    to_k = next(v for k, v in sd.items() if k.endswith("attn2.to_k.weight"))
    proj = next(v for k, v in sd.items() if k.endswith(".proj_in.weight"))
    add = sd.get("add_embedding.linear_1.weight")
    hint = [sd["controlnet_cond_embedding.conv_in.weight"].shape[0]]
    hint += [sd[f"controlnet_cond_embedding.blocks.{j}.weight"].shape[0]
             for j in range(1, 2 * 8, 2) if f"controlnet_cond_embedding.blocks.{j}.weight" in sd]
    use_linear = proj.ndim == 2
    heads = [w // LINEAR_PROJ_HEAD_DIM if use_linear else SD1_NUM_HEADS for w in widths]
    return {
        "in_channels": sd["conv_in.weight"].shape[1], "block_out_channels": widths,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth],
        "layers_per_block": _count(sd, r"down_blocks\.0\.resnets\.(\d+)\."),
        "transformer_layers_per_block": [d or 1 for d in depth[:-1]]
        + [_count(sd, r"mid_block\.attentions\.0\.transformer_blocks\.(\d+)\.")],
        "attention_head_dim": heads, "cross_attention_dim": to_k.shape[1],
        "use_linear_projection": use_linear,
        "addition_embed_type": None if add is None else "text_time",
        "projection_class_embeddings_input_dim": None if add is None else add.shape[1],
        "conditioning_channels": sd["controlnet_cond_embedding.conv_in.weight"].shape[1],
        "conditioning_embedding_out_channels": hint,
    }


# ---------------------------------------------------------------------------------------------
# Detection from original keys, and the full-key check
# ---------------------------------------------------------------------------------------------


def _require(sd, key: str, what: str) -> torch.Tensor:
    if key not in sd:
        raise ValueError(f"not a ControlNet state dict: missing {key!r} ({what}); expected the "
                         "original layout (input_hint_block.N, zero_convs.N.0, input_blocks.N, "
                         "middle_block, middle_block_out.0, time_embed)")
    return sd[key]


def controlnet_config_from_state_dict(sd: Mapping[str, torch.Tensor]) -> ControlNetConfig:
    """Detect the architecture of a bare original-layout ControlNet state dict from key names
    and shapes (head counts by the released models' conventions, as for the U-Net), then check
    every key and shape against it."""
    conv_in = _require(sd, "input_blocks.0.0.weight", "the input convolution")
    hint0 = _require(sd, "input_hint_block.0.weight", "the control-image encoder")
    mc = conv_in.shape[0]
    levels = _input_levels(sd, "", mc)
    to_k = _require(sd, "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                    "the middle block's cross-attention")
    proj = _require(sd, "middle_block.1.proj_in.weight", "the middle block's proj_in")
    use_linear = proj.ndim == 2
    label = sd.get("label_emb.0.0.weight")
    convs = sorted(int(m.group(1)) for k in sd
                   if (m := re.fullmatch(r"input_hint_block\.(\d+)\.weight", k)))
    hint_widths = tuple(sd[f"input_hint_block.{i}.weight"].shape[0] for i in convs[:-1:2])
    heads = ({"num_heads": None, "head_dim": LINEAR_PROJ_HEAD_DIM} if use_linear
             else {"num_heads": SD1_NUM_HEADS, "head_dim": None})
    try:
        unet = UNetConfig(
            in_channels=conv_in.shape[1], out_channels=conv_in.shape[1], model_channels=mc,
            channel_mult=tuple(m for m, _, _ in levels),
            num_res_blocks=tuple(r for _, r, _ in levels),
            transformer_depth=tuple(d for _, _, d in levels),
            transformer_depth_middle=_count(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."),
            context_dim=to_k.shape[1], use_linear_in_transformer=use_linear,
            adm_in_channels=None if label is None else label.shape[1], **heads,
        )
        config = ControlNetConfig(unet, hint_channels=hint0.shape[1],
                                  hint_block_channels=hint_widths)
    except ValueError as err:
        raise ValueError(f"ControlNet state dict gives an invalid architecture: {err}") from err
    check_controlnet_state_dict(sd, config)
    return config


def check_controlnet_state_dict(sd: Mapping[str, torch.Tensor], config: ControlNetConfig) -> None:
    """Raise ValueError naming missing, unexpected and mis-shaped keys of a bare original-layout
    ControlNet state dict for ``config``."""
    model = ControlNet(config, device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - sd.keys())
    unexpected = sorted(sd.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & sd.keys()
                    if tuple(sd[k].shape) != expected[k]
                    and not _proj_layouts_agree(k, tuple(sd[k].shape), expected[k]))
    problems = [f"{len(keys)} {label} key(s): {', '.join(keys[:_MAX_LISTED])}"
                for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if shapes:
        problems.append(f"{len(shapes)} mis-shaped tensor(s): " + ", ".join(
            f"{k} {tuple(sd[k].shape)} (expected {expected[k]})" for k in shapes[:_MAX_LISTED]))
    if problems:
        raise ValueError(f"ControlNet state dict does not match the detected {config.family} "
                         "architecture: " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _diffusers_folder(path: Path) -> tuple[dict, ControlNetConfig]:
    if not (path / "config.json").is_file() and (path / "controlnet" / "config.json").is_file():
        path = path / "controlnet"
    if not (path / "config.json").is_file():
        raise CheckpointError(path, "a ControlNet folder needs diffusers' config.json next to "
                                    f"one of {', '.join(DIFFUSERS_WEIGHTS)}")
    weights = next((path / n for n in DIFFUSERS_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(path, f"no weights file; expected one of {DIFFUSERS_WEIGHTS}")
    try:
        config = controlnet_config_from_diffusers(json.loads((path / "config.json").read_text()))
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(path / "config.json", f"not a usable ControlNet config: {e}") \
            from None
    with open_state_dict(weights) as f:
        sd = dict(f.items())
    try:
        return controlnet_state_dict_from_diffusers(sd, config), config
    except ValueError as e:
        raise CheckpointError(weights, str(e)) from None


def _single_file(path: Path) -> tuple[dict, ControlNetConfig]:
    with open_state_dict(path) as f:
        keys = f.keys()
        if any(k.startswith(CONTROLNET_PREFIX) for k in keys):
            sd = f.with_prefix(CONTROLNET_PREFIX)
        else:
            sd = dict(f.items())
    try:
        if "controlnet_cond_embedding.conv_in.weight" in sd:
            config = controlnet_config_from_diffusers(_diffusers_config_from_keys(sd))
            sd = controlnet_state_dict_from_diffusers(sd, config)
        config = controlnet_config_from_state_dict(sd)
    except (ValueError, KeyError, StopIteration) as e:
        raise CheckpointError(path, f"not a loadable ControlNet: {e}") from None
    if path.stem.endswith(("_shuffle", "_shuffle_fp16")):  # as ComfyUI: not visible in weights
        config = ControlNetConfig(config.unet, config.hint_channels, config.hint_block_channels,
                                  global_average_pooling=True)
    return sd, config


def load_controlnet(path: str | os.PathLike, *, device=None,
                    dtype: torch.dtype | None = None) -> ControlNet:
    """Load a ControlNet from an original single file, a single file in diffusers naming, or a
    diffusers folder (see the module docstring); architecture detected from the weights.

    Returns the model in eval mode, on ``device`` in ``dtype`` (default: the file's dtype).
    Raises :class:`CheckpointError` naming the file and what did not fit.
    """
    path = Path(path)
    sd, config = _diffusers_folder(path) if path.is_dir() else _single_file(path)
    linear = config.unet.use_linear_in_transformer  # proj_in/out as 1x1 conv or linear
    sd = {k: _fit_proj(k, v, linear) for k, v in sd.items()}
    try:
        check_controlnet_state_dict(sd, config)
    except ValueError as e:
        raise CheckpointError(path, str(e)) from None
    model = ControlNet(config, device="meta")
    model.load_state_dict(sd, assign=True)
    return model.to(device=device, dtype=dtype).eval()
