"""DPM-Solver++ samplers against diffusers on the same analytic model, float64.

Tolerance: |ours - ref| <= 1e-5 (1 + |ref|) per element.  DPMSolverMultistepScheduler rounds
its sample to float32 inside every ``step`` (the harness upcasts its tables, not that), so
early states of size ~40 carry ~1e-6 absolute rounding; a relative term states that honestly.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, DPMSolverSDEScheduler

from noisecraft.samplers.dpmpp import sample_dpmpp_sde
from noisecraft.samplers.noise import BrownianTreeNoise, brownian_tree_noise
from tests.samplers.harness import (
    F64,
    SD_BETAS,
    ListNoise,
    gmm_denoiser,
    model_output,
    run_pair,
    start_state,
)

TOL = 1e-5


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str = "") -> None:
    err = ((ours - ref).abs() / (1 + ref.abs())).max()
    assert float(err) <= TOL, f"{what}: relative error {float(err):.3g} > {TOL}"


def final_sigma(scheduler, steps: int) -> float:
    scheduler.set_timesteps(steps)
    return float(scheduler.sigmas[-1])


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_diffusers(steps, karras):
    """dpmsolver++ order 2, final_sigmas_type="zero" (diffusers' default): the last step is
    first order in both (k-diffusion: sigma_next == 0; diffusers: lower_order_final)."""
    sched = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++",
                                        solver_order=2, use_karras_sigmas=karras)
    ours, ref = run_pair("dpmpp_2m", sched, steps)
    assert float(ref.sigmas[-1]) == 0
    assert_close(ours.xs, ref.xs, f"2M steps={steps} karras={karras}")


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_sigma_min_final_matches_from_15_steps(karras):
    """final_sigmas_type="sigma_min" with >= 15 steps: diffusers keeps 2nd order to the end,
    as we do (a Karras list then ends with a zero-length step sigma_min -> sigma_min)."""
    sched = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++",
                                        solver_order=2, use_karras_sigmas=karras,
                                        final_sigmas_type="sigma_min")
    ours, ref = run_pair("dpmpp_2m", sched, 20, final_sigma=final_sigma(sched, 20))
    assert float(ref.sigmas[-1]) > 0
    assert_close(ours.xs, ref.xs, "2M sigma_min final")


def test_dpmpp_2m_sigma_min_final_under_15_steps_differs_only_in_last_step():
    """Documented difference: diffusers' ``lower_order_final`` makes the LAST step first order
    when there are < 15 steps, even to sigma_min > 0; k-diffusion (and we) stay 2nd order.
    All states but the last agree; the last equals a DPM-Solver++(1) step from ours."""
    sched = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="dpmsolver++",
                                        solver_order=2, final_sigmas_type="sigma_min")
    ours, ref = run_pair("dpmpp_2m", sched, 10, final_sigma=final_sigma(sched, 10))
    assert_close(ours.xs[:-1], ref.xs[:-1], "2M all but last")
    assert float((ours.xs[-1] - ref.xs[-1]).abs().max()) > 1e-3  # a real difference
    s, s_next = float(ref.sigmas[-2]), float(ref.sigmas[-1])
    x = ours.xs[-2]
    x0 = gmm_denoiser()(x, torch.full((len(x),), s, dtype=F64))
    first_order = (s_next / s) * x - math.expm1(math.log(s_next / s)) * x0
    assert_close(first_order, ref.xs[-1], "diffusers' last step = DPM-Solver++(1)")


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
@pytest.mark.parametrize("steps", [10, 25])
def test_dpmpp_2m_sde_matches_diffusers(solver_type, steps):
    """sde-dpmsolver++ (eta = 1) with diffusers' own Gaussian draws replayed.  diffusers draws
    one more tensor than it uses (at the final step to 0, where both return D)."""
    sched = DPMSolverMultistepScheduler(**SD_BETAS, algorithm_type="sde-dpmsolver++",
                                        solver_order=2, solver_type=solver_type)
    ours, ref = run_pair("dpmpp_2m_sde", sched, steps, options={"solver_type": solver_type})
    assert_close(ours.xs, ref.xs, f"2M SDE {solver_type}")
    assert ours.noise_used == len(ref.noise) - 1 == steps - 1


# ---------------------------------------------------------------------------------------------
# DPM++ SDE against DPMSolverSDEScheduler (k-diffusion's sample_dpmpp_sde, Brownian tree)
# ---------------------------------------------------------------------------------------------


def run_dpmsolver_sde(steps: int, karras: bool, seed: int, record=None, upcast=False):
    """diffusers' DPMSolverSDEScheduler loop on the GMM, as a pipeline runs it.  ``upcast``
    turns its float32 sigma table into float64 (same values) so its step arithmetic is
    float64 like ours; that moves its float32 noise query points, so seed tests keep it off.

    Returns (grid sigmas [steps + 1], states [steps + 1, N, D]); ``record`` collects
    ((sigma, sigma_next), noise) of each Brownian query.
    """
    import diffusers.schedulers.scheduling_dpmsolver_sde as module

    sched = DPMSolverSDEScheduler(**SD_BETAS, use_karras_sigmas=karras, noise_sampler_seed=seed)
    sched.set_timesteps(steps)
    if upcast:
        sched.sigmas = sched.sigmas.to(F64)
    x = start_state(sigma=float(sched.sigmas[0]))
    original = module.BrownianTreeNoiseSampler.__call__

    def recording(self, a, b):
        z = original(self, a, b)
        if record is not None:
            record.append(((a, b), z))
        return z

    module.BrownianTreeNoiseSampler.__call__ = recording
    try:
        sample, states = x, [x]
        for t in sched.timesteps:
            if sched.state_in_first_order:
                sigma = sched.sigmas[sched.step_index or 0]
            else:
                sigma = sched.mid_point_sigma
            out = model_output(sample, float(sigma), "epsilon")
            sample = sched.step(out, t, sample).prev_sample
            if sched.state_in_first_order:
                states.append(sample)
    finally:
        module.BrownianTreeNoiseSampler.__call__ = original
    grid = torch.cat([sched.sigmas[:1], sched.sigmas[1::2]]).to(F64)
    return grid, torch.stack(states)


def run_ours_sde(grid, x, **options):
    xs = [x]
    sample_dpmpp_sde(gmm_denoiser(), x, grid, callback=lambda s: xs.append(s.x), **options)
    return torch.stack(xs)


@pytest.mark.parametrize("steps", [10, 25])
@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_sde_algorithm_matches_diffusers_with_its_noise(steps, karras):
    """The algorithm: replaying diffusers' own Brownian draws, every state agrees."""
    record = []
    grid, ref = run_dpmsolver_sde(steps, karras, seed=7, record=record, upcast=True)
    ours = run_ours_sde(grid, ref[0], noise=ListNoise([z for _, z in record]))
    assert_close(ours, ref, f"DPM++ SDE steps={steps} karras={karras}")


def test_dpmpp_sde_same_seed_same_image_as_diffusers():
    """The noise: ``seed=`` builds the same Brownian tree as DPMSolverSDEScheduler
    (noise_sampler_seed) and, with query points equal, the same image to 1e-5."""
    grid, ref = run_dpmsolver_sde(10, karras=True, seed=1234)
    ours = run_ours_sde(grid, ref[0], seed=1234)
    assert_close(ours, ref, "seeded DPM++ SDE, 10 Karras steps")


def test_dpmpp_sde_seeded_noise_differs_from_diffusers_only_by_query_rounding():
    """Documented difference: diffusers queries its tree at ``exp(-(-log sigma))`` computed in
    float32, up to a couple of ulps off sigma; we (like ComfyUI) query at sigma itself.  The
    tree rounds query times to 1e-6, so such a shift sometimes selects a neighbouring point
    and that draw (~1e-3 relative) changes.  Asserted: at diffusers' own query points our tree
    gives diffusers' draws, and its first query point of each call is a grid sigma up to
    2 float32 ulps (with at least one actually shifted in this run)."""
    record = []
    grid, _ = run_dpmsolver_sde(25, karras=False, seed=99, record=record)
    ours = BrownianTreeNoise(torch.zeros(64, 2, dtype=F64), float(grid[grid > 0].min()),
                             float(grid.max()), 99)
    grid32 = grid.to(torch.float32)
    shifted = 0
    for (a, b), z in record:
        torch.testing.assert_close(ours(a, b), z, rtol=1e-6, atol=1e-6)
        nearest = grid32[(grid32 - a).abs().argmin()]
        assert abs(float(nearest - a)) <= 2 * float(torch.finfo(torch.float32).eps * a)
        shifted += int(not torch.equal(nearest, a.to(torch.float32)))
    assert shifted > 0


def test_brownian_tree_equals_diffusers_noise_sampler():
    """Bit-level: our tree and diffusers' BrownianTreeNoiseSampler (same seed, bounds, dtype)
    give the same draws, for one seed and for a per-sample list of seeds."""
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    x = torch.zeros(3, 4, 5, dtype=torch.float32)
    lo, hi = 0.0291675, 14.614642
    queries = [(14.614642, 9.5), (9.5, 3.25), (3.25, 0.5), (0.5, 0.0291675), (9.5, 4.0)]
    for seed in (5, [1, 2, 3]):
        ref = BrownianTreeNoiseSampler(x, torch.tensor(lo).item(), torch.tensor(hi).item(), seed)
        ours = BrownianTreeNoise(x, lo, hi, seed)
        for a, b in queries:
            a32, b32 = (torch.tensor(v, dtype=torch.float32) for v in (a, b))
            torch.testing.assert_close(ours(a32, b32), ref(a32, b32), rtol=1e-6, atol=1e-6)


def test_brownian_tree_is_a_consistent_path():
    """Increments over a partition add up to the increment over the whole interval, and each
    normalised increment is N(0, 1): the property that makes step counts agree."""
    x = torch.zeros(20000, dtype=F64)
    noise = brownian_tree_noise(x, torch.tensor([10.0, 4.0, 1.0, 0.0]), seed=3)
    whole = noise(torch.tensor(10.0), torch.tensor(1.0)) * 3.0  # sqrt(9)
    parts = (noise(torch.tensor(10.0), torch.tensor(4.0)) * 6.0**0.5
             + noise(torch.tensor(4.0), torch.tensor(1.0)) * 3.0**0.5)
    torch.testing.assert_close(parts, whole, rtol=1e-4, atol=1e-4)
    z = noise(torch.tensor(4.0), torch.tensor(1.0))
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1) < 0.05


def test_brownian_tree_refuses_bad_use():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        BrownianTreeNoise(x, 1.0, 1.0, 0)
    with pytest.raises(ValueError, match="one seed per sample"):
        BrownianTreeNoise(x, 0.1, 1.0, [1, 2, 3])
    with pytest.raises(ValueError, match="outside the tree"):
        BrownianTreeNoise(x, 0.1, 1.0, 0)(torch.tensor(2.0), torch.tensor(0.5))
