"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image
Diffusion Models") for SD 1.x, SD 2.x and SDXL, in the original checkpoint layout.

A ControlNet is a trainable copy of the U-Net's encoder half (``time_embed``, ``label_emb``,
``input_blocks``, ``middle_block``, built by the U-Net's own public builders) plus

* ``input_hint_block``: a small conv net that encodes the control image (pixels, [0, 1],
  8x the latent size) to the width of ``input_blocks.0`` and is added after it;
* ``zero_convs.N``: one zero-initialised 1x1 conv per input block, giving the residual added
  to the U-Net's N-th skip connection;
* ``middle_block_out``: the same for the middle block's output.

``ControlNet(config).state_dict()`` has exactly the keys of an original single-file ControlNet
with ``control_model.`` stripped.  Diffusers folders and loading live in
``noisecraft.checkpoints.controlnet_keys``; applying one or several ControlNets to a U-Net
during sampling is :class:`ControlledModel`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from noisecraft.control_images import control_hint
from noisecraft.models.unet import (
    build_label_emb,
    build_middle_block,
    build_time_embed,
    build_unet_block,
    embed_conditioning,
)
from noisecraft.models.unet_configs import UNetConfig, unet_layout

HINT_BLOCK_CHANNELS = (16, 32, 96, 256)
"""Widths of ``input_hint_block`` in every released ControlNet (diffusers'
``conditioning_embedding_out_channels``)."""


@dataclass(frozen=True)
class ControlNetConfig:
    """Architecture of a ControlNet.

    ``unet`` is the encoder half's architecture (its ``out_channels`` and output-block fields are
    unused).  ``hint_channels`` is the control image's channel count (3: RGB).
    ``hint_block_channels`` are the conv widths of ``input_hint_block``; each step after the
    first halves the resolution, so the control image is ``2**(len - 1)`` (8) times the latent.
    ``global_average_pooling`` (shuffle ControlNets; diffusers' ``global_pool_conditions``)
    averages each residual over space.
    """

    unet: UNetConfig
    hint_channels: int = 3
    hint_block_channels: tuple[int, ...] = HINT_BLOCK_CHANNELS
    global_average_pooling: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "hint_block_channels", tuple(self.hint_block_channels))
        if self.hint_channels < 1 or not self.hint_block_channels:
            raise ValueError(
                f"ControlNetConfig needs hint_channels >= 1 and at least one hint block width, "
                f"got {self.hint_channels} and {self.hint_block_channels}"
            )

    @property
    def hint_scale(self) -> int:
        """How many pixels of control image per latent pixel along each side (8)."""
        return 2 ** (len(self.hint_block_channels) - 1)

    @property
    def family(self) -> str:
        """``sdxl`` (vector conditioning ``label_emb``), ``sd2`` (linear ``proj_in``, the
        OpenCLIP-H U-Net) or ``sd1``: the U-Net family this ControlNet was trained with."""
        if self.unet.adm_in_channels is not None:
            return "sdxl"
        return "sd2" if self.unet.use_linear_in_transformer else "sd1"


def check_controlnet_fits(config: ControlNetConfig, unet: UNetConfig) -> None:
    """Raise ValueError saying what differs when ControlNet residuals cannot enter ``unet``:
    the encoder widths and block counts must match (every residual has the shape of a skip
    connection), and so must the text-context width and the vector conditioning."""
    c = config.unet
    fields = ("model_channels", "channel_mult", "num_res_blocks", "context_dim",
              "adm_in_channels")
    diffs = [f"{f}: ControlNet {getattr(c, f)} vs U-Net {getattr(unet, f)}"
             for f in fields if getattr(c, f) != getattr(unet, f)]
    if diffs:
        raise ValueError(
            f"this ControlNet ({config.family}) does not fit the U-Net: " + "; ".join(diffs)
            + ". Use a ControlNet trained for the checkpoint's family (SD 1.x, SD 2.x or SDXL)."
        )


def _hint_block(config: ControlNetConfig, fk: dict) -> nn.Sequential:
    """Original ``input_hint_block``: conv, SiLU, (conv, SiLU, strided conv, SiLU)*, zero conv;
    convs at even indices 0, 2, ..., 14."""
    w = config.hint_block_channels
    layers: list[nn.Module] = [nn.Conv2d(config.hint_channels, w[0], 3, padding=1, **fk)]
    for a, b in zip(w[:-1], w[1:], strict=True):
        layers += [nn.SiLU(), nn.Conv2d(a, a, 3, padding=1, **fk),
                   nn.SiLU(), nn.Conv2d(a, b, 3, padding=1, stride=2, **fk)]
    layers += [nn.SiLU(), nn.Conv2d(w[-1], config.unet.model_channels, 3, padding=1, **fk)]
    return nn.Sequential(*layers)


def _zero_conv(channels: int, fk: dict) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(channels, channels, 1, **fk))


class ControlNet(nn.Module):
    """The ControlNet network; keys as original single files (see the module docstring).

    Build it on ``device="meta"`` and ``load_state_dict(sd, assign=True)`` to load weights
    without allocating them twice.  A fresh model has zero-initialised output convs (LDM's
    ``zero_module``), so its residuals are exactly zero.
    """

    def __init__(self, config: ControlNetConfig, *, device=None, dtype=None):
        super().__init__()
        self.config = config
        u, fk = config.unet, {"device": device, "dtype": dtype}
        layout = unet_layout(u)
        self.time_embed = build_time_embed(u, **fk)
        self.label_emb = build_label_emb(u, **fk)
        self.input_hint_block = _hint_block(config, fk)
        self.input_blocks = nn.ModuleList(build_unet_block(s, u, **fk)
                                          for s in layout.input_blocks)
        self.zero_convs = nn.ModuleList(_zero_conv(s.out_channels, fk)
                                        for s in layout.input_blocks)
        self.middle_block = build_middle_block(u, **fk)
        self.middle_block_out = _zero_conv(layout.middle_channels, fk)
        self._zero_outputs()

    @torch.no_grad()
    def _zero_outputs(self) -> None:
        for conv in [self.input_hint_block[-1], self.middle_block_out[0],
                     *(z[0] for z in self.zero_convs)]:
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(
        self,
        x: torch.Tensor,
        hint: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        y: torch.Tensor | None = None,
        *,
        strength: float = 1.0,
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Residuals for the U-Net's skip connections and middle block.

        Args:
            x: ``[B, in_channels, H, W]``, the U-Net's (scaled) input latents.
            hint: ``[B, hint_channels, 8H, 8W]`` control image in [0, 1]
                (``noisecraft.control_images``; ``fit_control_image`` resizes one).
            timesteps, context, y: as for ``UNetModel.forward``.
            strength: multiplies every residual (ComfyUI's strength, diffusers'
                ``controlnet_conditioning_scale``).

        Returns:
            ``(down_residuals, mid_residual)``: one tensor per ``input_blocks`` entry shaped
            like that block's output, and one shaped like the middle block's output; pass them
            as ``UNetModel.forward(..., down_residuals=, mid_residual=)``.
        """
        self._check_inputs(x, hint, context)
        emb = embed_conditioning(self.config.unet, self.time_embed, self.label_emb, x,
                                 timesteps, y)
        context = context.to(x.dtype)
        guided_hint = self.input_hint_block(hint.to(x.dtype))
        h, outs = x, []
        for n, (block, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs,
                                                   strict=True)):
            h = block(h, emb, context)
            if n == 0:
                h = h + guided_hint
            outs.append(zero_conv(h))
        mid = self.middle_block_out(self.middle_block(h, emb, context))
        outs = [o * strength for o in outs]
        mid = mid * strength
        if self.config.global_average_pooling:
            outs = [o.mean(dim=(2, 3), keepdim=True) for o in outs]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return outs, mid

    def _check_inputs(self, x, hint, context) -> None:
        u = self.config.unet
        if x.ndim != 4 or x.shape[1] != u.in_channels:
            raise ValueError(f"ControlNet expects x of shape [B, {u.in_channels}, H, W], got "
                             f"{tuple(x.shape)}")
        f = self.config.hint_scale
        want = (x.shape[0], self.config.hint_channels, x.shape[2] * f, x.shape[3] * f)
        if tuple(hint.shape) != want:
            raise ValueError(
                f"ControlNet hint must be {want} ([B, channels, {f}*H, {f}*W] for latents "
                f"{tuple(x.shape)}), got {tuple(hint.shape)}; resize it with "
                "noisecraft.control_images.fit_control_image"
            )
        if context is None or context.ndim != 3 or context.shape[-1] != u.context_dim:
            got = None if context is None else tuple(context.shape)
            raise ValueError(f"ControlNet needs context of shape [B, M, {u.context_dim}], "
                             f"got {got}")


def sum_residuals(
    parts: Sequence[tuple[list[torch.Tensor], torch.Tensor]],
) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """Element-wise sum of several ControlNets' ``(down_residuals, mid_residual)`` (None for
    none), as multi-ControlNet in diffusers and ComfyUI's chained ControlNets."""
    if not parts:
        return None
    downs, mid = list(parts[0][0]), parts[0][1]
    for d, m in parts[1:]:
        if len(d) != len(downs):
            raise ValueError(f"ControlNets give {len(downs)} and {len(d)} down residuals; "
                             "they must share the U-Net layout")
        downs = [a + b for a, b in zip(downs, d, strict=True)]
        mid = mid + m
    return downs, mid


# ---------------------------------------------------------------------------------------------
# Applying ControlNets while sampling
# ---------------------------------------------------------------------------------------------


def percent_to_timestep(percent: float, num_timesteps: int = 1000) -> float:
    """ComfyUI's ``percent_to_sigma`` in timestep terms: the schedule position
    ``(1 - percent) * (T - 1)``; 0 % is +inf (before any step) and 100 % is -inf (after the
    last).  ``sigma(percent_to_timestep(p))`` (log-linear table interpolation, as
    ``DiscreteSchedule.t_to_sigma``) is exactly ComfyUI's sigma for p."""
    if percent <= 0.0:
        return math.inf
    if percent >= 1.0:
        return -math.inf
    return (1.0 - percent) * (num_timesteps - 1)


@dataclass(frozen=True, eq=False)
class ControlSpec:
    """One ControlNet applied to a generation (ComfyUI's "Apply ControlNet (Advanced)").

    ``image`` is the control image ``[1|B, C, H, W]`` in [0, 1] (any size: resized to 8x the
    latents, centre-cropped to their aspect ratio).  ``strength`` scales its residuals.  It acts
    while the sampler is between ``start_percent`` and ``end_percent`` of the schedule
    (0 = the first, noisiest step; 1 = the end): at a noise level sigma iff
    ``sigma(end) <= sigma <= sigma(start)``, ComfyUI's rule.
    """

    controlnet: ControlNet
    image: torch.Tensor
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0

    def __post_init__(self) -> None:
        for name in ("start_percent", "end_percent"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"ControlSpec.{name} must lie in [0, 1], got "
                                 f"{getattr(self, name)}")
        if self.image.ndim != 4 or self.image.shape[1] != self.controlnet.config.hint_channels:
            raise ValueError(
                f"ControlSpec.image must be [B, {self.controlnet.config.hint_channels}, H, W] "
                f"in [0, 1], got {tuple(self.image.shape)}"
            )

    def active(self, timesteps: torch.Tensor, num_timesteps: int) -> torch.Tensor:
        """[B] bool: which samples lie inside the window (timesteps [B] of the schedule)."""
        t_start = percent_to_timestep(self.start_percent, num_timesteps)
        t_end = percent_to_timestep(self.end_percent, num_timesteps)
        t = timesteps.to(torch.float64)
        return (t <= t_start) & (t >= t_end)


class ControlledModel(nn.Module):
    """A U-Net with ControlNets attached: ``model(x, timesteps, context, y, **kw)`` like
    ``UNetModel.forward``, so it stands wherever the U-Net does (``Denoiser(model, ...)``).

    Each :class:`ControlSpec` whose window contains the current timestep and whose strength is
    non-zero runs its ControlNet on the same (scaled) input, timestep, ``context`` and ``y`` as
    the U-Net; the residuals of all of them are summed and passed to the U-Net as
    ``down_residuals`` / ``mid_residual``.  With no active ControlNet the U-Net is called
    exactly as it would be without this wrapper.  Under classifier-free guidance the batch holds
    both prompts and every ControlNet acts on both (ComfyUI's default).  For inpainting U-Nets
    (x has more channels than the ControlNet takes) the ControlNet sees the first channels,
    the noisy latent.

    ``num_timesteps`` is the length of the model's training schedule (1000 for SD / SDXL).
    Samples of one batch at different timesteps get residuals only where their window is open.
    """

    def __init__(self, unet: nn.Module, controls: Sequence[ControlSpec], *,
                 num_timesteps: int = 1000):
        super().__init__()
        self.unet = unet
        self.controls = tuple(controls)
        self.controlnets = nn.ModuleList(c.controlnet for c in self.controls)
        self.num_timesteps = num_timesteps
        unet_config = getattr(unet, "config", None)
        if isinstance(unet_config, UNetConfig):
            for spec in self.controls:
                check_controlnet_fits(spec.controlnet.config, unet_config)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context=None, y=None,
                **kwargs) -> torch.Tensor:
        t = torch.as_tensor(timesteps, device=x.device)
        t = t.expand(x.shape[0]) if t.ndim == 0 else t
        parts = [r for spec in self.controls
                 if (r := self._residuals(spec, x, t, context, y)) is not None]
        summed = sum_residuals(parts)
        if summed is not None:
            kwargs.update(down_residuals=summed[0], mid_residual=summed[1])
        return self.unet(x, timesteps, context, y, **kwargs)

    def _residuals(self, spec: ControlSpec, x, t, context, y):
        if spec.strength == 0:
            return None
        active = spec.active(t, self.num_timesteps)
        if not active.any():
            return None
        cn = spec.controlnet
        dtype = next(cn.parameters()).dtype
        x_c = x[:, :cn.config.unet.in_channels].to(dtype)
        hint = control_hint(spec.image, x_c, cn.config.hint_scale)
        context, y = (None if v is None else v.to(dtype) for v in (context, y))
        down, mid = cn(x_c, hint, t, context, y, strength=spec.strength)
        if not active.all():
            keep = active.to(dtype).reshape(-1, 1, 1, 1)
            down, mid = [d * keep for d in down], mid * keep
        return [d.to(x.dtype) for d in down], mid.to(x.dtype)
