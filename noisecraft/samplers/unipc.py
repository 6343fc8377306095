"""UniPC: unified predictor-corrector (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector
Framework for Fast Sampling of Diffusion Models", arXiv:2302.04867), data-prediction form.

In lambda = -log(sigma) (VE form, x = x0 + sigma eps), a step from s to t with h = lambda_t -
lambda_s starts from the exact first-order exponential-integrator step

    x_t = (sigma_t / sigma_s) x_s - expm1(-h) D_s

and adds B(h) times a combination of divided differences of D (Alg. 2 and 3, the B(h) form):
the predictor UniP-p uses the p - 1 previous evaluations, the corrector UniC-p additionally
the evaluation at the predicted x_t, raising the order to p + 1 at no extra model call (the
evaluation is reused by the next predictor).  The two B(h) choices of the paper:
``bh1``: B(h) = -h (ComfyUI ``uni_pc``), ``bh2``: B(h) = expm1(-h) (ComfyUI ``uni_pc_bh2``,
diffusers' ``UniPCMultistepScheduler`` default).  Orders 2 predictor / 1 corrector use the
paper's fixed rho = 1/2, as both reference implementations do.
"""

from __future__ import annotations

import math

import torch

from noisecraft.diffusion import BoundDenoiser
from noisecraft.samplers.common import NoiseSource, StepCallback, check_sigmas, report

VARIANTS = ("bh1", "bh2")


def _lam(sigma: float) -> float:
    return -math.log(sigma)


def _rhos(rks: list[float], hh: float, variant: str, order: int) -> tuple[list[float], float]:
    """Solve R rho = b (Zhao et al. eq. 8 / Alg. 3) for ``order`` nodes rks (the last is 1).

    Returns (rhos, B(h)).  Float64 throughout; hh = -h.
    """
    b_h = hh if variant == "bh1" else math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R = torch.tensor([[rk ** (i - 1) for rk in rks] for i in range(1, order + 1)],
                     dtype=torch.float64)
    rhos = torch.linalg.solve(R, torch.tensor(b, dtype=torch.float64))
    return rhos.tolist(), b_h


def _unipc_update(x, s_prev: list[float], x0_prev: list, sigma_t: float, order: int,
                  variant: str, x0_t=None):
    """One UniP-``order`` step (x0_t is None) or UniC-``order`` correction (x0_t given).

    x is the state at s_prev[-1]; s_prev, x0_prev: the previous sigmas and D's (newest last).
    """
    sigma_s = s_prev[-1]
    m0 = x0_prev[-1]
    h = _lam(sigma_t) - _lam(sigma_s)
    base = (sigma_t / sigma_s) * x - math.expm1(-h) * m0
    rks, diffs = [], []
    for k in range(1, order):
        rk = (_lam(s_prev[-(k + 1)]) - _lam(sigma_s)) / h
        rks.append(rk)
        diffs.append((x0_prev[-(k + 1)] - m0) / rk)
    hh = -h
    b_h = hh if variant == "bh1" else math.expm1(hh)
    if x0_t is None:  # predictor: uses only the order - 1 previous differences
        if not diffs:
            return base
        rhos = [0.5] if order == 2 else _rhos(rks, hh, variant, order - 1)[0]
        res = sum(r * d for r, d in zip(rhos, diffs, strict=True))
        return base - b_h * res
    rhos = [0.5] if order == 1 else _rhos(rks + [1.0], hh, variant, order)[0]
    res = sum((r * d for r, d in zip(rhos[:-1], diffs, strict=True)), torch.zeros_like(x))
    return base - b_h * (res + rhos[-1] * (x0_t - m0))


@torch.no_grad()
def sample_uni_pc(
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    *,
    callback: StepCallback | None = None,
    noise: NoiseSource | None = None,
    order: int = 3,
    variant: str = "bh1",
    lower_order_final: bool = True,
) -> torch.Tensor:
    """UniPC multistep (Zhao et al. 2023, Alg. 2-3, B(h) form): UniP-p predictor followed, once
    the next evaluation is known, by the UniC-p corrector; 1 evaluation per step.

    order: the predictor order p (the corrected solution has order p + 1 in h); the run warms
    up from 1 and, with ``lower_order_final``, winds down to 1 at the last step as diffusers
    and ComfyUI do (``min(order, steps - i)``).  The step to sigma = 0 is always first order
    (it returns D) and the last step is never corrected (that would cost an extra call).
    variant: ``"bh1"`` (B(h) = -h) or ``"bh2"`` (B(h) = e^{-h} - 1).  Deterministic.
    The callback sees the predicted x at sigma_{i+1}, before the next step corrects it.
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if not isinstance(order, int) or isinstance(order, bool) or order < 1:
        raise ValueError(f"order must be a whole number >= 1, got {order!r}")
    sigmas = check_sigmas(x, sigmas)
    s = sigmas.tolist()
    n = len(s) - 1
    s_hist: list[float] = []
    x0_hist: list[torch.Tensor] = []
    x_last, last_order = None, 0
    for i in range(n):
        x0 = denoiser(x, x.new_full((x.shape[0],), s[i]))
        if x_last is not None:  # UniC: correct x_i using the evaluation at the predicted x_i
            x = _unipc_update(x_last, s_hist, x0_hist, s[i], last_order, variant, x0_t=x0)
        s_hist = (s_hist + [s[i]])[-order:]
        x0_hist = (x0_hist + [x0])[-order:]
        this_order = min(order, len(s_hist), n - i if lower_order_final else order)
        if s[i + 1] == 0:
            this_order = 1
        x_last, last_order = x, this_order
        if s[i + 1] == 0:
            x = x0
        else:
            x = _unipc_update(x, s_hist, x0_hist, s[i + 1], this_order, variant)
        report(callback, i, sigmas, x, x0)
    return x


@torch.no_grad()
def sample_uni_pc_bh2(denoiser, x, sigmas, *, callback=None, noise=None, **options):
    """UniPC with B(h) = e^{-h} - 1 (ComfyUI ``uni_pc_bh2``; diffusers' default variant)."""
    options.setdefault("variant", "bh2")
    return sample_uni_pc(denoiser, x, sigmas, callback=callback, noise=noise, **options)


SAMPLERS = {"uni_pc": sample_uni_pc, "uni_pc_bh2": sample_uni_pc_bh2}
