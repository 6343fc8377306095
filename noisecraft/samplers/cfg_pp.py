"""CFG++ samplers (Chung et al. 2024, "CFG++: Manifold-constrained Classifier Free Guidance for
Diffusion Models", arXiv:2406.08070), under ComfyUI's names.

Classifier-free guidance forms ``x0 = u + scale * (c - u)`` from the conditional and
unconditional x0 estimates ``c`` and ``u``.  Ordinary samplers then move along the guided
noise ``(x - x0) / sigma``; CFG++ keeps the guided ``x0`` but renoises with the UNCONDITIONAL
noise ``eps_u = (x - u) / sigma``, so a DDIM/Euler step is ``x' = x0 + sigma' * eps_u``
(paper eq. 9).  This keeps samples near the data manifold; useful scales are small (the paper's
lambda in [0, 1]; ComfyUI users take cfg ~ 0.5-2).  Scale 0 is plain sampling of the
unconditional model.  Note that scale 1 is NOT plain conditional sampling: x0 is the
conditional one but the renoising stays unconditional, which acts as strong guidance.

How the sampler gets ``u`` (the sampler contract is unchanged)
-------------------------------------------------------------
A CFG++ sampler takes the usual ``denoiser(x, sigma) -> x0``.  If that object also has a
method ``with_uncond(x, sigma) -> (x0_guided, x0_uncond)`` - as :class:`CFGPPDenoiser` from
:func:`cfg_pp_denoiser` does - the sampler calls it, one batched cond/uncond pass per
evaluation.  A denoiser without it has no separate unconditional prediction: it is its own
(``u = x0``), and the sampler is then exactly its plain counterpart.  This was chosen over
(a) a wrapper that remembers the uncond of its last call - hidden mutable state, wrong as
soon as anything else calls the wrapper between two steps - and (b) changing what denoisers
return, which every other sampler would have to know about.  The pipeline only has to build
the denoiser with :func:`cfg_pp_denoiser` instead of ``cfg_denoiser`` for ``*_cfg_pp``
samplers (:func:`needs_uncond` tells it which).

x: [B, ...] at sigmas[0]; sigmas: descending [steps + 1]; each returns x at sigmas[-1].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from noisecraft.diffusion import BoundDenoiser, Cond, Denoiser, as_sigma_batch, to_d
from noisecraft.guidance import _expand, batch_conds
from noisecraft.samplers.common import (
    NoiseSource,
    StepCallback,
    ancestral_step,
    check_sigmas,
    gaussian_noise,
    report,
)


@dataclass(frozen=True, eq=False)
class CFGPPDenoiser:
    """Classifier-free guidance that also returns the unconditional x0.

    ``__call__(x, sigma)`` is the guided ``u + scale * (c - u)`` (the same numbers as
    ``guidance.cfg_denoiser`` without rescale), so it is a valid denoiser for any sampler;
    ``with_uncond(x, sigma)`` returns ``(guided, u)`` from the same single batched pass.
    ``uncond=None`` means no negative prompt: ``u`` is the conditional prediction.  Unlike
    ``cfg_denoiser``, scale 1 still runs the unconditional pass (CFG++ needs ``u``; as ComfyUI's
    ``disable_cfg1_optimization``).
    """

    denoiser: Denoiser
    cond: Cond
    uncond: Cond | None
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scale < 0:
            raise ValueError(f"CFG++ scale must be >= 0, got {self.scale}")

    def with_uncond(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = as_sigma_batch(sigma, x)
        b = x.shape[0]
        if self.uncond is None:
            x0 = self.denoiser(x, sigma, _expand(self.cond, b))
            return x0, x0
        both = batch_conds(_expand(self.cond, b), _expand(self.uncond, b))
        x0_c, x0_u = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), both).chunk(2)
        return x0_u + self.scale * (x0_c - x0_u), x0_u

    def __call__(self, x: torch.Tensor, sigma) -> torch.Tensor:
        return self.with_uncond(x, sigma)[0]


def cfg_pp_denoiser(denoiser: Denoiser, cond: Cond, uncond: Cond | None,
                    scale: float = 1.0) -> CFGPPDenoiser:
    """Bind ``denoiser`` to a prompt (and negative prompt) for the CFG++ samplers."""
    return CFGPPDenoiser(denoiser, cond, uncond, scale)


def guided_and_uncond(denoiser: BoundDenoiser, x: torch.Tensor,
                      sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(guided x0, unconditional x0)`` from a denoiser with ``with_uncond``; otherwise the
    denoiser's x0 twice (a denoiser without guidance is its own unconditional model)."""
    with_uncond = getattr(denoiser, "with_uncond", None)
    if with_uncond is None:
        x0 = denoiser(x, sigma)
        return x0, x0
    return with_uncond(x, sigma)


def _sigma_batch(x: torch.Tensor, sigma) -> torch.Tensor:
    return x.new_full((x.shape[0],), float(sigma))


@torch.no_grad()
def sample_euler_cfg_pp(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """Euler / DDIM with CFG++ (Chung et al. 2024, Alg. 1): ``x' = x0 + sigma' * eps_u`` with
    ``eps_u = (x - u) / sigma``.  Equivalent to plain Euler with a per-step guidance scale
    ``scale * sigma / (sigma - sigma')``.  One (batched) evaluation per step."""
    sigmas = check_sigmas(x, sigmas)
    for i in range(len(sigmas) - 1):
        s = _sigma_batch(x, sigmas[i])
        x0, u = guided_and_uncond(denoiser, x, s)
        x = x0 + to_d(x, s, u) * sigmas[i + 1]
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """Ancestral Euler with CFG++: ``x0 + sigma_down * eps_u``, then fresh noise of std
    ``s_noise * sigma_up`` (:func:`~noisecraft.samplers.common.ancestral_step`); no noise
    when sigma' = 0."""
    sigmas = check_sigmas(x, sigmas)
    noise = gaussian_noise(x) if noise is None else noise
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        s = _sigma_batch(x, sigma)
        x0, u = guided_and_uncond(denoiser, x, s)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next, eta)
        x = x0 + to_d(x, s, u) * sigma_down
        if sigma_next > 0 and sigma_up > 0:
            x = x + noise(sigma, sigma_next) * s_noise * sigma_up
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2m_cfg_pp(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2) with CFG++, as ComfyUI's
    ``dpmpp_2m_cfg_pp``: with ``h = log(sigma / sigma')`` and ``r = h_last / h``,
    ``x' = x0 + (sigma'/sigma)(x - u) - expm1(-h) / (2r) * (x0 - u_prev)``: the first-order
    CFG++ step plus the 2M correction, taken from the change of the x0 estimate against the
    previous step's unconditional one.  First order on the first step and into sigma' = 0."""
    sigmas = check_sigmas(x, sigmas)
    s = sigmas.tolist()
    u_prev = None
    for i in range(len(s) - 1):
        x0, u = guided_and_uncond(denoiser, x, _sigma_batch(x, s[i]))
        if s[i + 1] == 0:
            x = x0
        else:
            h = math.log(s[i] / s[i + 1])
            x = x0 + (s[i + 1] / s[i]) * (x - u)
            if u_prev is not None:
                r = math.log(s[i - 1] / s[i]) / h
                x = x - math.expm1(-h) / (2 * r) * (x0 - u_prev)
        u_prev = u
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral_cfg_pp(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> torch.Tensor:
    """DPM-Solver++(2S) ancestral (Lu et al. 2022, Alg. 1, r = 1/2) with CFG++.

    Each first-order move from sigma to sigma_t is the CFG++ one,
    ``(sigma_t/sigma)(x - u) + x0`` written as ``(sigma_t/sigma)(x + x0 - u) - expm1(-h) x0``;
    the step to sigma_down uses the midpoint estimate x0_mid in the second term.  Both
    stages use the ``u`` of the step's first evaluation.  (ComfyUI's ``dpmpp_2s_ancestral_cfg_pp``
    takes the midpoint's ``u`` in the second stage, a side effect of its "last uncond" hook,
    so without guidance it differs from ``dpmpp_2s_ancestral``; this one reduces to it.)
    2 evaluations per step (1 when sigma_down = 0), then noise of std ``s_noise * sigma_up``.
    """
    sigmas = check_sigmas(x, sigmas)
    noise = gaussian_noise(x) if noise is None else noise
    s = sigmas.tolist()
    for i in range(len(s) - 1):
        x0, u = guided_and_uncond(denoiser, x, _sigma_batch(x, s[i]))
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        down, up = float(down), float(up)
        if down == 0:
            x = x0
        else:
            h = math.log(s[i] / down)
            sigma_mid = math.sqrt(s[i] * down)  # lambda + h / 2
            shifted = x + x0 - u
            x_mid = (sigma_mid / s[i]) * shifted - math.expm1(-h / 2) * x0
            x0_mid = denoiser(x_mid, _sigma_batch(x, sigma_mid))
            x = (down / s[i]) * shifted - math.expm1(-h) * x0_mid
        if s[i + 1] > 0 and up > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * (s_noise * up)
        report(callback, i, sigmas, x, x0)
    return x


SAMPLERS = {
    "euler_cfg_pp": sample_euler_cfg_pp,
    "euler_ancestral_cfg_pp": sample_euler_ancestral_cfg_pp,
    "dpmpp_2m_cfg_pp": sample_dpmpp_2m_cfg_pp,
    "dpmpp_2s_ancestral_cfg_pp": sample_dpmpp_2s_ancestral_cfg_pp,
}


def needs_uncond(sampler_name: str) -> bool:
    """True for the CFG++ samplers, whose denoiser should come from :func:`cfg_pp_denoiser`."""
    return sampler_name in SAMPLERS
