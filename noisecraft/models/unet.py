"""The Stable Diffusion U-Net (SD 1.x, SD 2.x, SDXL), in the original checkpoint layout.

``UNetModel(config).state_dict()`` has exactly the keys of an original single-file checkpoint
after stripping ``model.diffusion_model.``, so such a file loads with no renaming.  Diffusers
folders go through ``noisecraft.checkpoints.unet_keys``.

Architecture: Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion
Models" (SD 1/2); Podell et al. 2023, "SDXL" (vector conditioning ``y``, per-level depths).

Not tested here (CPU-only machine): CUDA and float16.  bfloat16 on CPU is tested.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from noisecraft.models.layers import (
    Downsample,
    EmbedSequential,
    GroupNorm32,
    ResBlock,
    SpatialTransformer,
    Upsample,
    timestep_embedding,
)
from noisecraft.models.unet_configs import BlockSpec, UNetConfig, unet_layout

SDXL_SIZE_EMBED_DIM = 256


class UNetModel(nn.Module):
    """Noise-prediction U-Net; see :class:`UNetConfig` for the architecture knobs.

    Build it on ``device="meta"`` and ``load_state_dict(sd, assign=True)`` to load a checkpoint
    without allocating the weights twice.  Set ``gradient_checkpointing = True`` to recompute
    each block's activations in the backward pass (training only; no effect in eval mode).
    """

    def __init__(self, config: UNetConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        fk = {"device": device, "dtype": dtype}
        mc = config.model_channels
        self.time_embed = build_time_embed(config, **fk)
        self.label_emb = build_label_emb(config, **fk)
        layout = unet_layout(config)
        self.input_blocks = nn.ModuleList(build_unet_block(s, config, **fk)
                                          for s in layout.input_blocks)
        self.middle_block = build_middle_block(config, **fk)
        self.output_blocks = nn.ModuleList(build_unet_block(s, config, **fk)
                                           for s in layout.output_blocks)
        self.out = nn.Sequential(
            GroupNorm32(mc, groups=config.norm_groups, **fk), nn.SiLU(),
            nn.Conv2d(mc, config.out_channels, 3, padding=1, **fk),
        )
        self._zero_output_layers()

    @torch.no_grad()
    def _zero_output_layers(self) -> None:
        """LDM's ``zero_module`` init: each residual branch and the output start at zero."""
        for module in self.modules():
            if isinstance(module, ResBlock):
                nn.init.zeros_(module.out_layers[3].weight)
                nn.init.zeros_(module.out_layers[3].bias)
            elif isinstance(module, SpatialTransformer):
                nn.init.zeros_(module.proj_out.weight)
                nn.init.zeros_(module.proj_out.bias)
        nn.init.zeros_(self.out[2].weight)
        nn.init.zeros_(self.out[2].bias)

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        *,
        down_residuals: Sequence[torch.Tensor] | None = None,
        mid_residual: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict the model output (eps or v, per the checkpoint) for latents ``x``.

        Args:
            x: ``[B, in_channels, H, W]`` noisy latents (any H, W; odd sizes are handled the
                way diffusers handles them).
            timesteps: ``[B]`` (or scalar) float timesteps in the training range [0, 1000);
                fractional values are allowed.
            context: ``[B, M, context_dim]`` text-encoder hidden states (required).
            y: ``[B, adm_in_channels]`` SDXL vector conditioning (see :func:`sdxl_vector`);
                required exactly when ``config.adm_in_channels`` is set.
            down_residuals: one tensor per ``input_blocks`` entry, shaped like that block's
                output, added to the skip connections after the down path (ControlNet;
                diffusers' ``down_block_additional_residuals``).
            mid_residual: added to the middle block's output (diffusers'
                ``mid_block_additional_residual``).

        Returns:
            ``[B, out_channels, H, W]`` in the dtype of ``x``.
        """
        emb, context = self._conditioning(x, timesteps, context, y)
        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        if down_residuals is not None:
            skips = self._add_down_residuals(skips, down_residuals)
        h = self._run(self.middle_block, h, emb, context)
        if mid_residual is not None:
            h = h + mid_residual
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            h = self._run(block, h, emb, context, skips[-1].shape[-2:] if skips else None)
        return self.out(h)

    def _conditioning(self, x, timesteps, context, y):
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"UNetModel expects x of shape [B, {self.config.in_channels}, H, W], got "
                f"{tuple(x.shape)}"
            )
        if context is None or context.ndim != 3 or context.shape[-1] != self.config.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(
                f"UNetModel needs context of shape [B, M, {self.config.context_dim}] (the text "
                f"encoder's hidden states), got {got}"
            )
        emb = embed_conditioning(self.config, self.time_embed, self.label_emb, x, timesteps, y)
        return emb, context.to(x.dtype)

    def _add_down_residuals(self, skips, down_residuals):
        if len(down_residuals) != len(skips):
            raise ValueError(
                f"down_residuals needs {len(skips)} tensors (one per input block), got "
                f"{len(down_residuals)}"
            )
        return [s + r for s, r in zip(skips, down_residuals, strict=True)]

    def _run(self, block, h, emb, context, upsample_size=None):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, upsample_size, use_reentrant=False)
        return block(h, emb, context, upsample_size)


def build_time_embed(config: UNetConfig, *, device=None, dtype=None) -> nn.Sequential:
    """``time_embed``: Linear(model_channels, 4*mc), SiLU, Linear (keys ``.0``, ``.2``)."""
    mc, ted = config.model_channels, config.time_embed_dim
    fk = {"device": device, "dtype": dtype}
    return nn.Sequential(nn.Linear(mc, ted, **fk), nn.SiLU(), nn.Linear(ted, ted, **fk))


def build_label_emb(config: UNetConfig, *, device=None, dtype=None) -> nn.Sequential | None:
    """SGM's ``label_emb`` for the vector ``y`` (keys ``.0.0``, ``.0.2``), or None."""
    if config.adm_in_channels is None:
        return None
    ted, fk = config.time_embed_dim, {"device": device, "dtype": dtype}
    return nn.Sequential(nn.Sequential(
        nn.Linear(config.adm_in_channels, ted, **fk), nn.SiLU(), nn.Linear(ted, ted, **fk),
    ))


def build_unet_block(spec: BlockSpec, config: UNetConfig, *, device=None,
                     dtype=None) -> EmbedSequential:
    """One ``input_blocks`` / ``output_blocks`` entry described by ``spec`` (shared with
    ControlNet, whose ``input_blocks`` are the U-Net's)."""
    fk = {"device": device, "dtype": dtype}
    if spec.kind == "conv_in":
        return EmbedSequential(nn.Conv2d(spec.in_channels, spec.out_channels, 3, padding=1, **fk))
    if spec.kind == "down":
        return EmbedSequential(Downsample(spec.out_channels, **fk))
    layers: list[nn.Module] = [ResBlock(spec.in_channels, config.time_embed_dim,
                                        spec.out_channels, dropout=config.dropout,
                                        groups=config.norm_groups, **fk)]
    if spec.depth:
        layers.append(_transformer(config, spec.out_channels, spec.depth, fk))
    if spec.upsample:
        layers.append(Upsample(spec.out_channels, **fk))
    return EmbedSequential(*layers)


def build_middle_block(config: UNetConfig, *, device=None, dtype=None) -> EmbedSequential:
    """``middle_block``: ResBlock, SpatialTransformer, ResBlock at the deepest width."""
    fk = {"device": device, "dtype": dtype}
    mid, ted = config.level_channels(config.num_levels - 1), config.time_embed_dim
    return EmbedSequential(
        ResBlock(mid, ted, mid, dropout=config.dropout, groups=config.norm_groups, **fk),
        _transformer(config, mid, config.transformer_depth_middle, fk),
        ResBlock(mid, ted, mid, dropout=config.dropout, groups=config.norm_groups, **fk),
    )


def _transformer(config: UNetConfig, channels: int, depth: int, fk: dict) -> SpatialTransformer:
    heads, dim_head = config.heads_for(channels)
    return SpatialTransformer(channels, heads, dim_head, depth, config.context_dim,
                              use_linear=config.use_linear_in_transformer,
                              dropout=config.dropout, groups=config.norm_groups, **fk)


def embed_conditioning(config: UNetConfig, time_embed: nn.Module, label_emb: nn.Module | None,
                       x: torch.Tensor, timesteps: torch.Tensor,
                       y: torch.Tensor | None) -> torch.Tensor:
    """The ``[B, 4*model_channels]`` embedding every ResBlock receives: ``time_embed`` of the
    sinusoidal timestep embedding, plus ``label_emb(y)`` for SDXL-style models."""
    batch = x.shape[0]
    timesteps = torch.as_tensor(timesteps, device=x.device)
    if timesteps.ndim == 0:
        timesteps = timesteps.expand(batch)
    if timesteps.shape != (batch,):
        raise ValueError(f"timesteps must be a scalar or [B={batch}], got "
                         f"{tuple(timesteps.shape)}")
    emb = time_embed(timestep_embedding(timesteps, config.model_channels).to(x.dtype))
    if label_emb is not None:
        adm = config.adm_in_channels
        if y is None or y.shape != (batch, adm):
            got = None if y is None else tuple(y.shape)
            raise ValueError(
                f"this U-Net (SDXL-style) needs y of shape [B={batch}, {adm}], e.g. from "
                f"sdxl_vector(); got {got}"
            )
        emb = emb + label_emb(y.to(emb.dtype))
    elif y is not None:
        raise ValueError("y was given but this U-Net has no label_emb (adm_in_channels=None)")
    return emb


def _as_pairs(value, batch: int, name: str, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    if t.ndim == 1:
        t = t.expand(batch, t.shape[0])
    if t.ndim != 2 or t.shape != (batch, 2):
        raise ValueError(f"{name} must be a pair (h, w) / (top, left) or a [B={batch}, 2] tensor, "
                         f"got shape {tuple(t.shape)}")
    return t


def _vector(pooled: torch.Tensor, columns: list[torch.Tensor], embed_dim: int) -> torch.Tensor:
    ids = torch.cat(columns, dim=1)  # [B, n]
    emb = timestep_embedding(ids.flatten(), embed_dim).reshape(pooled.shape[0], -1)
    return torch.cat([pooled.float(), emb], dim=-1).to(pooled.dtype)


def sdxl_vector(pooled: torch.Tensor, original_size, crop_coords, target_size, *,
                embed_dim: int = SDXL_SIZE_EMBED_DIM) -> torch.Tensor:
    """SDXL base's vector conditioning ``y`` (Podell et al. 2023, sec. 2.2).

    ``[pooled, emb(orig_h), emb(orig_w), emb(crop_top), emb(crop_left), emb(target_h),
    emb(target_w)]`` with each ``emb`` the 256-wide sinusoidal :func:`timestep_embedding`;
    the same as diffusers' ``text_embeds`` + ``add_time_ids`` ("text_time").

    Args:
        pooled: ``[B, P]`` pooled text embedding (P = 1280 for SDXL).
        original_size, crop_coords, target_size: ``(h, w)`` / ``(top, left)`` pairs in pixels,
            or ``[B, 2]`` tensors.
    Returns:
        ``[B, P + 6 * embed_dim]`` (2816 for SDXL base) in ``pooled``'s dtype.
    """
    b, dev = pooled.shape[0], pooled.device
    cols = [_as_pairs(v, b, n, dev) for v, n in ((original_size, "original_size"),
                                                 (crop_coords, "crop_coords"),
                                                 (target_size, "target_size"))]
    return _vector(pooled, cols, embed_dim)


def sdxl_refiner_vector(pooled: torch.Tensor, original_size, crop_coords,
                        aesthetic_score, *, embed_dim: int = SDXL_SIZE_EMBED_DIM) -> torch.Tensor:
    """SDXL refiner's ``y``: like :func:`sdxl_vector` but with the aesthetic score (a float or
    ``[B]`` tensor; diffusers' default 6.0, 2.5 for the negative prompt) in place of the
    target size.  Returns ``[B, P + 5 * embed_dim]`` (2560 for the SDXL refiner)."""
    b, dev = pooled.shape[0], pooled.device
    score = torch.as_tensor(aesthetic_score, dtype=torch.float32, device=dev)
    score = score.expand(b) if score.ndim == 0 else score
    if score.shape != (b,):
        raise ValueError(f"aesthetic_score must be a float or a [B={b}] tensor, got shape "
                         f"{tuple(score.shape)}")
    cols = [_as_pairs(original_size, b, "original_size", dev),
            _as_pairs(crop_coords, b, "crop_coords", dev), score[:, None]]
    return _vector(pooled, cols, embed_dim)
