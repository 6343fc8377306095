"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022).

The conditional and unconditional passes run as ONE batch of 2B; the result is
``uncond + scale * (cond - uncond)``, optionally with guidance rescale (Lin et al. 2023,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16), and optionally
skipping the unconditional pass at low sigma (:class:`SkipUncond`, AUTOMATIC1111's NGMS).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from noisecraft.diffusion import BoundDenoiser, Cond, Denoiser, append_dims, as_sigma_batch


def batch_conds(cond: Cond, uncond: Cond) -> dict:
    """Concatenate two conditioning dicts along the batch dimension (cond first)."""
    if set(cond) != set(uncond):
        raise ValueError(
            f"cond and uncond carry different keys: {sorted(cond)} vs {sorted(uncond)}"
        )
    out = {}
    for key in cond:
        a, b = cond[key], uncond[key]
        if a is None and b is None:
            out[key] = None
            continue
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            raise TypeError(f"conditioning {key!r} must be tensors in both cond and uncond")
        if a.shape[1:] != b.shape[1:]:
            raise ValueError(
                f"conditioning {key!r} has shape {tuple(a.shape)} for the prompt but "
                f"{tuple(b.shape)} for the negative prompt; pad them to the same length first"
            )
        out[key] = torch.cat([a, b])
    return out


def _expand(c: Cond, batch: int) -> dict:
    """Repeat [1, ...] conditioning to the batch size; leave [B, ...] as it is."""
    out = {}
    for k, v in c.items():
        if isinstance(v, torch.Tensor) and v.shape[0] == 1 and batch > 1:
            v = v.expand(batch, *v.shape[1:])
        elif isinstance(v, torch.Tensor) and v.shape[0] != batch:
            raise ValueError(f"conditioning {k!r} has batch {v.shape[0]}, latents have {batch}")
        out[k] = v
    return out


def rescale_guidance(
    guided_eps: torch.Tensor, cond_eps: torch.Tensor, rescale: float
) -> torch.Tensor:
    """Lin et al. 2023 eq. 15-16: match the guided prediction's std to the conditional one's."""
    dims = list(range(1, guided_eps.ndim))
    ratio = cond_eps.std(dim=dims, keepdim=True) / guided_eps.std(dim=dims, keepdim=True)
    return rescale * guided_eps * ratio + (1 - rescale) * guided_eps


@dataclass(frozen=True)
class SkipUncond:
    """AUTOMATIC1111's "Negative Guidance minimum sigma" (option ``s_min_uncond``, infotext
    ``NGMS``; its PR #9177): below ``min_sigma`` the unconditional (negative-prompt) pass is
    skipped and the conditional x0 is used alone (CFG scale 1), halving the U-Net batch.

    Matched from A1111's ``CFGDenoiser.forward`` (modules/sd_samplers_cfg_denoiser.py):

    * the test is ``sigma[0] < min_sigma``: the sigma the sampler passes for this call (the
      first of the batch; all images of a batch share it and skip together), strictly below;
    * by default only every other denoiser call skips (A1111's ``self.step % 2``: the 2nd,
      4th, ... call of a sampling run, counted over all calls, so a 2nd-order sampler's
      stages count too); ``all_steps`` skips on every call (A1111's ``s_min_uncond_all``,
      infotext ``NGMS all steps``);
    * ``min_sigma = 0`` is off.  A1111 exempts only InstructPix2Pix edit models (which
      noisecraft does not have); inpainting models' concat conditioning is not exempt there
      either, and here the conditional pass keeps its ``c_concat``.

    Difference: A1111 writes ``NGMS`` into the infotext only once a call has skipped;
    noisecraft writes it whenever it is > 0 (as an earlier A1111 ``processing.py`` did: ``"NGMS":
    None if p.s_min_uncond == 0 else p.s_min_uncond``), so a threshold below every sigma of
    the run is still recorded.
    """

    min_sigma: float = 0.0
    all_steps: bool = False

    def __post_init__(self) -> None:
        if not math.isfinite(self.min_sigma) or self.min_sigma < 0:
            raise ValueError(f"uncond_min_sigma (NGMS) must be a finite number >= 0 (0 = off), "
                             f"got {self.min_sigma}")

    def applies(self, sigma: torch.Tensor, call: int) -> bool:
        """Whether denoiser call ``call`` (0-based within one sampling run) at ``sigma`` [B]
        skips the unconditional pass."""
        return (self.min_sigma > 0 and (self.all_steps or call % 2 == 1)
                and float(sigma[0]) < self.min_sigma)


NO_SKIP = SkipUncond()
"""NGMS off: every call runs both passes."""


def cfg_denoiser(
    denoiser: Denoiser,
    cond: Cond,
    uncond: Cond | None,
    scale: float = 7.0,
    rescale: float = 0.0,
    skip: SkipUncond = NO_SKIP,
) -> BoundDenoiser:
    """Bind a denoiser to a prompt with classifier-free guidance.

    ``scale == 1`` or ``uncond is None`` runs the conditional pass alone (no extra cost).
    Guidance rescale is applied to the noise prediction, as diffusers' ``guidance_rescale`` is.
    ``skip`` (NGMS) makes the calls it selects conditional-only: their result is the
    conditional x0 exactly (rescale then changes nothing, its std ratio being 1).  With NGMS on,
    the bound denoiser counts its calls (A1111's ``CFGDenoiser.step``), so bind a fresh one
    for every sampling run, as the pipelines do.
    """
    if scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {scale}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")
    calls = itertools.count()

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = as_sigma_batch(sigma, x)
        b = x.shape[0]
        call = next(calls)
        if uncond is None or scale == 1.0 or skip.applies(sigma, call):
            return denoiser(x, sigma, _expand(cond, b))
        both = batch_conds(_expand(cond, b), _expand(uncond, b))
        x0_c, x0_u = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        x0 = x0_u + scale * (x0_c - x0_u)
        if rescale > 0:
            s = append_dims(sigma, x.ndim).to(x.dtype).clamp(min=1e-12)
            eps_c, eps = (x - x0_c) / s, (x - x0) / s
            x0 = x - s * rescale_guidance(eps, eps_c, rescale)
        return x0

    return guided
