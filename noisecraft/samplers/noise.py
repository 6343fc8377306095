"""Brownian-tree noise: the noise source ComfyUI and diffusers use for their SDE samplers.

An SDE sampler asks for the Brownian increment between two noise levels, normalised:
``(W(sigma_next) - W(sigma)) / sqrt(|sigma_next - sigma|) ~ N(0, I)``.  With independent draws
per call (:func:`noisecraft.samplers.common.gaussian_noise`) the image depends on the step
count in an arbitrary way; with one Brownian path W fixed by the seed (a Brownian tree,
Kidger et al. 2021, "Efficient and accurate gradients for neural SDEs", via ``torchsde``) the
increments over any partition are consistent, so more steps converge to the same image, and
the same seed gives the same image as ComfyUI (``dpmpp_sde``, ``dpmpp_2m_sde``,
``dpmpp_3m_sde``) and diffusers (``DPMSolverSDEScheduler(noise_sampler_seed=seed)``).

What must match them bit for bit, and does here:

* the tree spans ``[min positive sigma, max sigma]`` of the run (k-diffusion),
* ``torchsde.BrownianInterval(tol=1e-6, pool_size=24, halfway_tree=True)`` with the seed as
  entropy, ``x``'s shape and dtype, on the CPU,
* bounds and query points rounded to float32 first (ComfyUI queries its CPU tree in float32;
  diffusers' sigmas are float32).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from noisecraft.samplers.common import NoiseSource, gaussian_noise

BROWNIAN_SAMPLERS = frozenset({"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"})
"""Samplers whose ComfyUI default noise is a Brownian tree seeded with the sampler seed."""


def _f32(value) -> float:
    """A sigma rounded to float32, as a Python float (what the tree sees)."""
    return float(torch.as_tensor(value).detach().to("cpu", torch.float32))


class BrownianTreeNoise:
    """A :data:`NoiseSource` drawing normalised increments of one seeded Brownian path.

    like: the state x [B, ...] (shape, dtype and device of the returned noise).
    sigma_min, sigma_max: the interval the path covers; queries must fall inside it.
    seed: an int (one path for the whole batch, as ComfyUI), a list of B ints (one path per
    sample, diffusers' and k-diffusion's batched form), or None (a random seed).
    The tree is built on first use, so a run that never asks for noise costs nothing.
    """

    def __init__(
        self,
        like: torch.Tensor,
        sigma_min: float,
        sigma_max: float,
        seed: int | Sequence[int] | None = None,
    ):
        lo, hi = sorted((_f32(sigma_min), _f32(sigma_max)))
        if not 0 < lo < hi:
            raise ValueError(
                f"a Brownian tree needs 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}"
            )
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, ()).item())
        self.batched = not isinstance(seed, int)
        self.seeds = list(seed) if self.batched else [seed]
        if self.batched and len(self.seeds) != like.shape[0]:
            raise ValueError(
                f"one seed per sample: got {len(self.seeds)} seeds for a batch of {like.shape[0]}"
            )
        self.like = like
        self.bounds = (lo, hi)
        self._trees = None

    def _build(self):
        try:
            import torchsde
        except ImportError as e:  # pragma: no cover - torchsde is a declared dependency
            raise ImportError(
                "Brownian-tree noise needs torchsde (pip install torchsde); or pass "
                "noise=gaussian_noise(x, generator) for independent draws"
            ) from e
        shape = self.like.shape[1:] if self.batched else self.like.shape
        lo, hi = self.bounds
        return [
            torchsde.BrownianInterval(
                t0=lo, t1=hi, size=shape, dtype=self.like.dtype, device="cpu", entropy=s,
                tol=1e-6, pool_size=24, halfway_tree=True,
            )
            for s in self.seeds
        ]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        if self._trees is None:
            self._trees = self._build()
        a, b = _f32(sigma), _f32(sigma_next)
        lo, hi = min(a, b), max(a, b)
        if lo < self.bounds[0] or hi > self.bounds[1] or lo == hi:
            raise ValueError(
                f"noise asked for sigma {a} -> {b}, outside the tree's interval {self.bounds} "
                "(or of zero length)"
            )
        # The tree rounds times to its tolerance and clamps them to its (rounded) interval;
        # doing both first gives identical values without torchsde's out-of-range warnings.
        rnd = self._trees[0]._round
        q_lo, q_hi = max(rnd(lo), self._trees[0]._start), min(rnd(hi), self._trees[0]._end)
        w = torch.stack([tree(q_lo, q_hi) for tree in self._trees])
        w = w if self.batched else w[0]
        sign = 1.0 if a < b else -1.0
        z = w * (sign / (hi - lo) ** 0.5)
        return z.to(device=self.like.device, dtype=self.like.dtype)


def brownian_tree_noise(
    x: torch.Tensor, sigmas: torch.Tensor, seed: int | Sequence[int] | None = None
) -> BrownianTreeNoise:
    """The Brownian-tree noise source for a run over ``sigmas`` (k-diffusion's bounds:
    the smallest positive and the largest sigma)."""
    sigmas = torch.as_tensor(sigmas)
    positive = sigmas[sigmas > 0]
    if len(positive) == 0:
        raise ValueError("a Brownian tree needs at least one positive sigma")
    return BrownianTreeNoise(x, float(positive.min()), float(sigmas.max()), seed)


def default_noise(
    sampler: str,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    generator: torch.Generator | None = None,
) -> NoiseSource:
    """ComfyUI's choice of noise for a sampler: a Brownian tree seeded with the generator's
    seed for the SDE samplers in :data:`BROWNIAN_SAMPLERS`, independent draws otherwise."""
    if sampler in BROWNIAN_SAMPLERS and generator is not None:
        positive = torch.as_tensor(sigmas)[torch.as_tensor(sigmas) > 0]
        if len(positive) and float(positive.min()) < float(torch.as_tensor(sigmas).max()):
            return brownian_tree_noise(x, sigmas, generator.initial_seed())
    return gaussian_noise(x, generator)
