"""Classifier-free guidance as a denoiser wrapper (Ho & Salimans 2022).

The conditional and unconditional passes run as ONE batch of 2B; the result is
``uncond + scale * (cond - uncond)``, optionally with guidance rescale (Lin et al. 2023,
"Common Diffusion Noise Schedules and Sample Steps are Flawed", eq. 15-16).
"""

from __future__ import annotations

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


def cfg_denoiser(
    denoiser: Denoiser,
    cond: Cond,
    uncond: Cond | None,
    scale: float = 7.0,
    rescale: float = 0.0,
) -> BoundDenoiser:
    """Bind a denoiser to a prompt with classifier-free guidance.

    ``scale == 1`` or ``uncond is None`` runs the conditional pass alone (no extra cost).
    Guidance rescale is applied to the noise prediction, as diffusers' ``guidance_rescale`` is.
    """
    if scale < 0:
        raise ValueError(f"cfg_scale must be >= 0, got {scale}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale must lie in [0, 1], got {rescale}")

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = as_sigma_batch(sigma, x)
        b = x.shape[0]
        if uncond is None or scale == 1.0:
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
