"""From a GUIDER (model + CONDITIONING lists + CFG scale) to the engine's bound denoiser.

The usual case, one prompt entry for each side covering the whole image, is exactly the
engine's ``guided_denoiser`` (cond and uncond in one batch), so a graph and
``generate_image`` run the same numbers.  Several entries (ConditioningCombine) or areas
(ConditioningSetArea and its percentage form), masks (ConditioningSetMask) and timestep ranges
(ConditioningSetTimestepRange) follow ComfyUI: each active entry's x0 prediction over its area,
weighted per pixel (strength, mask, faded area edges; :mod:`noisecraft.nodes.regions`),
averaged where entries overlap, then classifier-free guidance on the averages.

A MODEL with ``cfg_rescale`` (RescaleCFG) combines the two predictions with
:func:`comfy_rescaled_cfg`, ComfyUI's guidance rescale in v space, instead of plain CFG.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from noisecraft.conditioning import Conditioning
from noisecraft.diffusion import BoundDenoiser, append_dims, training_target, x0_from_output
from noisecraft.guidance import rescale_guidance
from noisecraft.models.family import ModelBundle
from noisecraft.nodes.control import controls_of, uncond_controls_of
from noisecraft.nodes.model_values import Guider, entry_cond, is_plain
from noisecraft.nodes.regions import mirror_areas, region_of, resolve_entry
from noisecraft.nodes.tensors import repeat_to_batch
from noisecraft.pipelines.common import (
    GuidedDenoiser,
    Run,
    downsample_mask,
    guided_denoiser,
    vae_factor,
)
from noisecraft.pipelines.inpaint import txt2img_concat


def inpaint_concat(run: Run, entries: list, shape: torch.Size) -> torch.Tensor | None:
    """Extra U-Net channels of an inpainting model: from InpaintModelConditioning's
    ``concat_mask`` / ``concat_latent_image`` (mask binarised at 0.5 and taken at latent size
    nearest, as the engine's ``inpaint_concat``), else the engine's all-repaint default."""
    bundle = run.bundle
    if not bundle.inpaint:
        return None
    f = vae_factor(bundle)
    opts = entries[0][1]
    if "concat_latent_image" not in opts:
        return txt2img_concat(run, shape[-1] * f, shape[-2] * f)
    latent = bundle.family.latent.process_in(opts["concat_latent_image"].float())
    mask = (opts["concat_mask"].float() >= 0.5).float()
    small = F.interpolate(mask, size=latent.shape[-2:], mode="nearest")
    concat = torch.cat([small, latent], dim=1).to(run.device)
    return concat.expand(shape[0], -1, -1, -1) if concat.shape[0] == 1 else concat


def latent_mask(mask: torch.Tensor, bundle: ModelBundle, shape: torch.Size) -> torch.Tensor:
    """A noise mask (pixel or latent size) -> [B, 1, h, w]: area-averaged like the engine's
    pipelines when it is at pixel size, bilinear otherwise."""
    f = vae_factor(bundle)
    m = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    h, w = shape[-2:]
    if m.shape[-2:] == (h * f, w * f):
        m = downsample_mask(m, f)
    elif m.shape[-2:] != (h, w):
        m = F.interpolate(m, size=(h, w), mode="bilinear")
    if m.shape[0] != shape[0]:
        m = m.repeat(-(-shape[0] // m.shape[0]), 1, 1, 1)[:shape[0]]
    return m


def comfy_rescaled_cfg(x0_c: torch.Tensor, x0_u: torch.Tensor, x: torch.Tensor,
                       sigma: torch.Tensor, scale: float, multiplier: float) -> torch.Tensor:
    """ComfyUI's RescaleCFG (``comfy_extras/nodes_model_advanced.py``): classifier-free
    guidance with the guidance rescale of Lin et al. 2023 (eq. 15-16) done on **v
    predictions**, whatever the model predicts.  x0_c, x0_u, x: [B, C, h, w]; sigma: [B].

    Both x0 estimates become v = (x / (1 + sigma^2) - x0) sqrt(1 + sigma^2) / sigma (the v of
    Salimans & Ho 2022 for the VE input x); v_cfg = v_u + scale (v_c - v_u) is rescaled to
    v_c's standard deviation per sample (``guidance.rescale_guidance``), mixed with
    ``multiplier``, and turned back into x0.

    How this differs from the engine's ``guidance_rescale`` (``guidance.cfg_denoiser``): the
    engine matches the standard deviations of the **eps** predictions, (x - x0) / sigma.
    v = sqrt(1 + sigma^2) eps - sigma x / sqrt(1 + sigma^2) carries a share of x that eps does
    not, so the two std ratios, and hence the images, differ (they agree as sigma -> 0).
    """
    s = append_dims(sigma, x.ndim).to(x.dtype).clamp(min=1e-12)

    def to_v(x0: torch.Tensor) -> torch.Tensor:
        return training_target("v", x0, (x - x0) / s, s.flatten())

    v_c, v_u = to_v(x0_c), to_v(x0_u)
    v = rescale_guidance(v_u + scale * (v_c - v_u), v_c, multiplier)
    return x0_from_output("v", v, x, s.flatten())


def _rescaled(pair, scale: float, multiplier: float) -> GuidedDenoiser:
    """A denoiser applying :func:`comfy_rescaled_cfg` to ``pair(x, sigma) -> (x0_c, x0_u)``;
    its ``with_uncond`` gives (that result, x0_u) to the CFG++ samplers, as ComfyUI's
    sampler_cfg_function output and uncond reach them."""

    def both(x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
        x0_c, x0_u = pair(x, sigma)
        return comfy_rescaled_cfg(x0_c, x0_u, x, sigma, scale, multiplier), x0_u

    return GuidedDenoiser(lambda x, sigma: both(x, sigma)[0], both)


def guider_denoiser(guider: Guider, run: Run, shape: torch.Size) -> BoundDenoiser:
    """The bound ``(x, sigma) -> x0`` for diffusion latents of ``shape`` [B, C, h, w]."""
    bundle = guider.model.bundle
    f = vae_factor(bundle)
    width, height = shape[-1] * f, shape[-2] * f
    concat = inpaint_concat(run, guider.positive, shape)
    rescale = float(guider.model.cfg_rescale)
    # cfg 1 (or no negative prompt) is the conditional prediction alone; rescaling it is the
    # identity, as in ComfyUI, so those cases keep the plain path
    rescaling = rescale > 0 and guider.negative is not None and guider.cfg != 1.0
    if is_plain(guider.positive) and is_plain(guider.negative):
        cond = entry_cond(bundle, guider.positive[0], width, height)
        controls = controls_of(guider.positive)
        if guider.negative is None:
            return guided_denoiser(bundle, Conditioning(cond, cond), 1.0, 0.0, concat, controls)
        uncond = entry_cond(bundle, guider.negative[0], width, height, negative=True)
        sides = (Conditioning(cond, uncond), concat, controls,
                 uncond_controls_of(guider.positive, guider.negative))
        if not rescaling:
            return guided_denoiser(bundle, sides[0], guider.cfg, 0.0, *sides[1:])
        # scale 1: the pair is (u + 1 * (c - u), u) from one batched pass, c to float rounding
        pair = guided_denoiser(bundle, sides[0], 1.0, 0.0, *sides[1:]).with_uncond
        return _rescaled(pair, guider.cfg, rescale)
    h, w = shape[-2:]
    positive = [resolve_entry(e, h, w) for e in guider.positive]
    if guider.negative is None or guider.cfg == 1.0:
        return _area_average(bundle, positive, width, height, concat, negative=False)
    negative = [resolve_entry(e, h, w) for e in guider.negative]
    positive, negative = mirror_areas(positive, negative)
    pos = _area_average(bundle, positive, width, height, concat, negative=False)
    neg = _area_average(bundle, negative, width, height, concat, negative=True)
    if rescaling:
        return _rescaled(lambda x, sigma: (pos(x, sigma), neg(x, sigma)), guider.cfg, rescale)

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        x0_u = neg(x, sigma)
        return x0_u + guider.cfg * (pos(x, sigma) - x0_u)

    return guided


def _area_average(bundle, entries, width, height, concat, *, negative) -> BoundDenoiser:
    """ComfyUI's ``calc_cond_batch`` for one side: the x0 predictions of the entries acting at
    this sigma, each over its area and weighted per pixel (:mod:`noisecraft.nodes.regions`),
    summed and divided by the summed weights (entries are run one by one, unguided).  Where
    no entry acts the prediction is 0, as in ComfyUI."""
    f = vae_factor(bundle)
    schedule = bundle.family.schedule()
    parts = []
    for entry in entries:
        region = region_of(entry, height // f, width // f, schedule)
        if region is None:
            continue
        top, left, h, w = region.box
        cond = entry_cond(bundle, entry, width, height, negative)
        crop = None if concat is None else concat[..., top:top + h, left:left + w]
        denoise = guided_denoiser(bundle, Conditioning(cond, cond), 1.0, 0.0, crop,
                                  controls_of([entry]))
        parts.append((denoise, region))

    def average(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        total = torch.zeros_like(x)
        weight = torch.zeros_like(x[:, :1])
        level = float(torch.as_tensor(sigma).reshape(-1)[0])
        for denoise, region in parts:
            if not region.acts_at(level):
                continue
            mult = region.weight.to(x)
            if mult.shape[0] not in (1, x.shape[0]):
                mult = repeat_to_batch(mult, x.shape[0])
            total[region.slices] += mult * denoise(x[region.slices], sigma)
            weight[region.slices] += mult
        return total / weight.clamp(min=1e-37)

    return average
