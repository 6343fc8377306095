"""U-Net naming: diffusers' ``UNet2DConditionModel`` <-> original LDM/SGM checkpoint names.

This module is the one place that knows both naming schemes.  Everything derives from
:func:`unet_module_map`, a table ``{diffusers module path: original module path}`` over every
module that owns parameters (``down_blocks.1.attentions.0.proj_in`` ->
``input_blocks.4.1.proj_in``), computed from a :class:`UNetConfig` through the shared block
plan :func:`noisecraft.models.unet_configs.unet_layout`.

* :func:`unet_state_dict_from_diffusers` / :func:`unet_state_dict_to_diffusers` rename state
  dicts (keys without the ``model.diffusion_model.`` / ``unet.`` prefixes);
* :func:`unet_kohya_module_map` gives the module names kohya LoRA files use;
* :func:`unet_config_to_diffusers` gives the ``UNet2DConditionModel`` constructor kwargs.

Detecting the config of a state dict lives in ``noisecraft.checkpoints.unet_detect``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from noisecraft.models.unet import SDXL_SIZE_EMBED_DIM
from noisecraft.models.unet_configs import UNetConfig, unet_layout

# diffusers ResnetBlock2D sub-module -> LDM ResBlock sub-module
_RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
# modules of one BasicTransformerBlock (same names in both schemes)
_TRANSFORMER_BLOCK_PARTS = (
    "norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2",
    *(f"{attn}.{p}" for attn in ("attn1", "attn2") for p in ("to_q", "to_k", "to_v", "to_out.0")),
)
_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_LABEL_EMB = {
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
}


def _resnet(d: str, o: str, in_ch: int, out_ch: int) -> dict[str, str]:
    return {f"{d}.{dp}": f"{o}.{op}" for dp, op in _RESNET_PARTS.items()
            if dp != "conv_shortcut" or in_ch != out_ch}


def _transformer(d: str, o: str, depth: int) -> dict[str, str]:
    names = ["norm", "proj_in", "proj_out"]
    names += [f"transformer_blocks.{k}.{p}" for k in range(depth) for p in _TRANSFORMER_BLOCK_PARTS]
    return {f"{d}.{n}": f"{o}.{n}" for n in names}


def unet_block_map(config: UNetConfig) -> dict[str, str]:
    """Coarse map ``{diffusers block path: original block path}``: one entry per resnet,
    attention (transformer), down/upsampler conv and fixed module; sub-module names inside a
    resnet differ (see ``_RESNET_PARTS``), inside an attention they are the same."""
    layout = unet_layout(config)
    m = {"conv_in": "input_blocks.0.0", **_FIXED}
    if config.adm_in_channels is not None:
        m.update(_LABEL_EMB)
    for n, spec in enumerate(layout.input_blocks):
        d = f"down_blocks.{spec.level}"
        if spec.kind == "down":
            m[f"{d}.downsamplers.0.conv"] = f"input_blocks.{n}.0.op"
        elif spec.kind == "res":
            m[f"{d}.resnets.{spec.slot}"] = f"input_blocks.{n}.0"
            if spec.depth:
                m[f"{d}.attentions.{spec.slot}"] = f"input_blocks.{n}.1"
    m.update({"mid_block.resnets.0": "middle_block.0", "mid_block.attentions.0": "middle_block.1",
              "mid_block.resnets.1": "middle_block.2"})
    for n, spec in enumerate(layout.output_blocks):
        d = f"up_blocks.{config.num_levels - 1 - spec.level}"
        m[f"{d}.resnets.{spec.slot}"] = f"output_blocks.{n}.0"
        if spec.depth:
            m[f"{d}.attentions.{spec.slot}"] = f"output_blocks.{n}.1"
        if spec.upsample:
            m[f"{d}.upsamplers.0.conv"] = f"output_blocks.{n}.{2 if spec.depth else 1}.conv"
    return m


def unet_module_map(config: UNetConfig) -> dict[str, str]:
    """``{diffusers module path: original module path}`` for every module with parameters.

    Example (SD 1.5): ``"down_blocks.0.resnets.1.conv1" -> "input_blocks.2.0.in_layers.2"``,
    ``"up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k" ->
    "output_blocks.5.1.transformer_blocks.0.attn2.to_k"``.
    """
    layout = unet_layout(config)
    res_channels = {}
    for prefix, specs in (("input_blocks", layout.input_blocks),
                          ("output_blocks", layout.output_blocks)):
        for n, spec in enumerate(specs):
            res_channels[f"{prefix}.{n}.0"] = (spec.in_channels, spec.out_channels)
    mid = layout.middle_channels
    res_channels["middle_block.0"] = res_channels["middle_block.2"] = (mid, mid)
    depth_of = {"middle_block.1": config.transformer_depth_middle}
    for prefix, specs in (("input_blocks", layout.input_blocks),
                          ("output_blocks", layout.output_blocks)):
        for n, spec in enumerate(specs):
            depth_of[f"{prefix}.{n}.1"] = spec.depth
    leaves: dict[str, str] = {}
    for d, o in unet_block_map(config).items():
        if ".resnets." in d:
            leaves.update(_resnet(d, o, *res_channels[o]))
        elif ".attentions." in d:
            leaves.update(_transformer(d, o, depth_of[o]))
        else:
            leaves[d] = o
    return leaves


def unet_kohya_module_map(config: UNetConfig) -> dict[str, str]:
    """``{kohya LoRA module name: original module path}``.

    kohya's sd-scripts name U-Net modules ``lora_unet_`` + the module path with ``.`` -> ``_``,
    using diffusers paths for SD 1/2 (``lora_unet_down_blocks_0_attentions_0_proj_in``) and
    original paths for SDXL (``lora_unet_input_blocks_4_1_proj_in``); both are listed.
    """
    out = {}
    for d, o in unet_module_map(config).items():
        out["lora_unet_" + d.replace(".", "_")] = o
        out["lora_unet_" + o.replace(".", "_")] = o
    return out


def _fit_proj(key: str, value: torch.Tensor, use_linear: bool) -> torch.Tensor:
    """Reshape transformer ``proj_in``/``proj_out`` weights between 1x1 conv ``[O, I, 1, 1]``
    and linear ``[O, I]`` to the layout ``use_linear`` asks for (files of either kind exist)."""
    if not (key.endswith(".proj_in.weight") or key.endswith(".proj_out.weight")):
        return value
    if use_linear and value.ndim == 4:
        return value[:, :, 0, 0]
    if not use_linear and value.ndim == 2:
        return value[:, :, None, None]
    return value


def _rename(sd: Mapping[str, torch.Tensor], table: dict[str, str], config: UNetConfig,
            source: str, target: str) -> dict[str, torch.Tensor]:
    out, unknown = {}, []
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        if module not in table:
            unknown.append(key)
            continue
        new_key = f"{table[module]}.{param}"
        out[new_key] = _fit_proj(new_key, value, config.use_linear_in_transformer)
    if unknown:
        examples = ", ".join(sorted(unknown)[:5])
        raise ValueError(
            f"{len(unknown)} key(s) are not {source} U-Net keys for this config, e.g. {examples}. "
            f"Expected {source} module paths such as {next(iter(table))!r} (without any file "
            f"prefix), mapped to {target} names; is the config (or prefix) right?"
        )
    return out


def unet_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor],
                                   config: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to original keys (no prefix).
    Tensors are not copied (``proj_in``/``proj_out`` may be reshaped views)."""
    return _rename(sd, unet_module_map(config), config, "diffusers", "original")


def unet_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor],
                                 config: UNetConfig) -> dict[str, torch.Tensor]:
    """Rename an original-layout U-Net state dict (no prefix) to diffusers keys."""
    inverse = {o: d for d, o in unet_module_map(config).items()}
    return _rename(sd, inverse, config, "original", "diffusers")


def unet_config_to_diffusers(config: UNetConfig, *, sample_size: int = 64) -> dict:
    """Keyword arguments for diffusers' ``UNet2DConditionModel`` with this architecture.

    diffusers' ``attention_head_dim`` holds the number of heads per level (a known misnomer)
    and its mid block takes ``transformer_layers_per_block[-1]``; a config whose deepest
    level has attention of a different depth than the middle block cannot be expressed.
    """
    n, last = config.num_levels, config.num_levels - 1
    depth = config.transformer_depth
    if depth[last] and depth[last] != config.transformer_depth_middle:
        raise ValueError(
            f"diffusers cannot express transformer_depth[-1]={depth[last]} with "
            f"transformer_depth_middle={config.transformer_depth_middle}; they must be equal "
            "when the deepest level has attention."
        )
    layers = [d if d else 1 for d in depth]
    layers[last] = config.transformer_depth_middle
    heads = [config.heads_for(config.level_channels(i))[0] if depth[i] or i == last else 1
             for i in range(n)]
    kwargs = {
        "sample_size": sample_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": tuple("CrossAttnUpBlock2D" if d else "UpBlock2D"
                                for d in reversed(depth)),
        "block_out_channels": tuple(config.level_channels(i) for i in range(n)),
        "layers_per_block": tuple(config.num_res_blocks),
        "transformer_layers_per_block": tuple(layers),
        "attention_head_dim": tuple(heads),
        "cross_attention_dim": config.context_dim,
        "use_linear_projection": config.use_linear_in_transformer,
        "norm_num_groups": config.norm_groups,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "downsample_padding": 1,
        "act_fn": "silu",
        "dropout": config.dropout,
    }
    if config.adm_in_channels is not None:
        kwargs.update(addition_embed_type="text_time", addition_time_embed_dim=SDXL_SIZE_EMBED_DIM,
                      projection_class_embeddings_input_dim=config.adm_in_channels)
    return kwargs
