"""DPM-Solver++ samplers on the analytic Gaussian mixture: order, distribution, part-way runs,
callbacks, seeds and argument checks.  (Registry-wide 100-step distribution and order checks
live in test_distribution.py / test_order.py; diffusers parity in test_dpmpp_parity.py.)"""

from __future__ import annotations

import pytest
import torch

from noisecraft.samplers import gaussian_noise, sample
from noisecraft.samplers.dpmpp import SAMPLERS
from noisecraft.samplers.noise import BROWNIAN_SAMPLERS, brownian_tree_noise, default_noise
from noisecraft.schedules import karras_sigmas
from tests.samplers.harness import (
    F64,
    GMM,
    SIGMA_MAX,
    SIGMA_MIN,
    assert_matches_mixture,
    convergence_order,
    gmm_denoiser,
    run_sampler,
    start_state,
)

STOCHASTIC = ["dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
              "dpmpp_3m_sde"]
SIGMAS_25 = karras_sigmas(25, SIGMA_MIN, SIGMA_MAX)


def test_registry_names():
    assert set(SAMPLERS) == {"dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m", "dpmpp_2m_sde",
                             "dpmpp_2m_sde_heun", "dpmpp_3m_sde"}
    assert BROWNIAN_SAMPLERS == {"dpmpp_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_heun",
                                 "dpmpp_3m_sde"}


# ---------------------------------------------------------------------------------------------
# Convergence order (probability-flow ODE error at sigma_min vs DOP853, Karras 8..64 steps)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def order_of():
    """convergence_order with the DOP853 reference solved once per start (it dominates)."""
    from tests.samplers import harness

    original, cache = harness.ode_solution, {}

    def cached(x, sigma_from, sigma_to, gmm=GMM):
        key = (sigma_from, sigma_to, x.shape, float(x.sum()), id(gmm))
        if key not in cache:
            cache[key] = original(x, sigma_from, sigma_to, gmm)
        return cache[key]

    harness.ode_solution = cached
    yield convergence_order
    harness.ode_solution = original


def test_dpmpp_2m_is_second_order(order_of):
    order, errors = order_of("dpmpp_2m")
    assert 1.7 <= order <= 2.4, (order, errors)


def test_dpmpp_3m_sde_at_eta_0_beats_second_order(order_of):
    """The deterministic limit of 3M SDE is a 3-step multistep solver: measured ~2.6 on this
    range (the first two steps are lower order), clearly above 2M's ~2.1."""
    order_3m, _ = order_of("dpmpp_3m_sde", eta=0.0)
    order_2m, _ = order_of("dpmpp_2m")
    assert 2.25 <= order_3m <= 3.3 and order_3m > order_2m + 0.2


def test_dpmpp_2s_at_eta_0_is_about_second_order(order_of):
    """Single-step 2S: measured 1.77 on 16..128 steps (pre-asymptotic, rising with steps)."""
    order, errors = order_of("dpmpp_2s_ancestral", steps=(16, 32, 64, 128), eta=0.0)
    assert 1.6 <= order <= 2.4, (order, errors)


def test_2m_sde_heun_at_eta_0_is_second_order(order_of):
    order, errors = order_of("dpmpp_2m_sde_heun", eta=0.0)
    assert 1.7 <= order <= 2.4, (order, errors)


@pytest.mark.parametrize("solver_type", ["midpoint", "heun"])
def test_2m_sde_at_eta_0_is_2m(solver_type):
    """eta = 0 removes the noise and the e^{-eta h} damping: midpoint is exactly DPM++(2M);
    the heun form differs in its phi_2 weight (same order, above)."""
    sig = SIGMAS_25
    x = start_state(16, float(sig[0]))
    ref = run_sampler("dpmpp_2m", sig, x).xs
    got = run_sampler("dpmpp_2m_sde", sig, x, eta=0.0, solver_type=solver_type).xs
    if solver_type == "midpoint":
        torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    else:
        assert 0 < float((got - ref).abs().max()) < 0.1


# ---------------------------------------------------------------------------------------------
# Distribution: 25 Karras steps (where these samplers are used), Brownian noise for the SDEs
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def x_start():
    return start_state(2000, SIGMA_MAX, seed=21)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_reproduces_mixture_in_25_steps(name, x_start):
    """N = 2000, tolerance 5 Monte-Carlo standard errors plus 0.02 absolute for 25 steps'
    discretisation (the ODE samplers' largest component-mean error measured 0.012 beyond
    noise).  SDE samplers use their default noise: a Brownian tree seeded here."""
    noise = brownian_tree_noise(x_start, SIGMAS_25, seed=5) if name in BROWNIAN_SAMPLERS else None
    out = run_sampler(name, SIGMAS_25, x_start, noise=noise, seed=3).final
    assert torch.isfinite(out).all()
    assert_matches_mixture(out, GMM, z=5.0, bias=0.02, label=name)


@pytest.mark.parametrize("name", ["dpmpp_sde", "dpmpp_2m_sde", "dpmpp_3m_sde"])
def test_partial_noise_options_still_sample_the_mixture(name, x_start):
    """eta = 0.5 (half the noise of the reverse SDE) is still a valid sampler."""
    out = run_sampler(name, SIGMAS_25, x_start, eta=0.5, seed=4).final
    assert_matches_mixture(out, GMM, z=5.0, bias=0.02, label=f"{name} eta=0.5")


def test_s_noise_zero_changes_the_result_and_removes_randomness(x_start):
    x = x_start[:64]
    a = run_sampler("dpmpp_2m_sde", SIGMAS_25, x, s_noise=0.0, seed=1).final
    b = run_sampler("dpmpp_2m_sde", SIGMAS_25, x, s_noise=0.0, seed=2).final
    c = run_sampler("dpmpp_2m_sde", SIGMAS_25, x, seed=1).final
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ---------------------------------------------------------------------------------------------
# Part-way runs, callbacks, seeds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_part_way_run_from_an_exact_noisy_sample(name):
    """img2img: start at sigma = 2 from the exact noisy marginal, 15 steps to 0."""
    sig = karras_sigmas(15, SIGMA_MIN, 2.0)
    x = start_state(2000, 2.0, seed=31)
    out = run_sampler(name, sig, x, seed=8).final
    assert_matches_mixture(out, GMM, z=5.0, bias=0.02, label=f"{name} from sigma 2")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_hand_off_part_way_and_callbacks(name):
    """A run stopped at step 16 of 25 (sigma ~ 0.6, refiner hand-off) calls back once per
    step with the right sigmas; continuing with ``start_step=16`` ends in the mixture."""
    sig = SIGMAS_25
    x = start_state(2000, float(sig[0]), seed=41)
    steps = []
    mid = sample(name, gmm_denoiser(), x, sig, end_step=16, callback=steps.append,
                 generator=torch.Generator().manual_seed(0))
    assert [s.i for s in steps] == list(range(16)) and all(s.total == 16 for s in steps)
    assert [s.sigma for s in steps] == sig[:16].tolist()
    assert [s.sigma_next for s in steps] == sig[1:17].tolist()
    assert steps[-1].x is mid and steps[-1].x0.shape == x.shape
    out = sample(name, gmm_denoiser(), mid, sig, start_step=16,
                 generator=torch.Generator().manual_seed(1))
    assert_matches_mixture(out, GMM, z=5.0, bias=0.02, label=f"{name} hand-off")


def test_dpmpp_sde_split_run_equals_full_run_with_one_tree():
    """DPM++ SDE keeps no history between steps, so with one Brownian tree over the whole
    list, running steps 0..k then k..end gives exactly the full run: what a refiner
    hand-off with a shared seed needs."""
    sig = SIGMAS_25
    x = start_state(32, float(sig[0]), seed=2)
    full = run_sampler("dpmpp_sde", sig, x, noise=brownian_tree_noise(x, sig, 77)).final
    tree = brownian_tree_noise(x, sig, 77)
    half = run_sampler("dpmpp_sde", sig[:11], x, noise=tree).final
    rest = run_sampler("dpmpp_sde", sig[10:], half, noise=tree).final
    torch.testing.assert_close(rest, full, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_same_seed_reproduces_exactly(name):
    """Brownian samplers via ``seed=``; dpmpp_2s_ancestral via a seeded Gaussian source."""
    sig = karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    x = start_state(64, float(sig[0]), seed=3)

    def run(seed):
        if name in BROWNIAN_SAMPLERS:
            return SAMPLERS[name](gmm_denoiser(), x, sig, seed=seed)
        noise = gaussian_noise(x, torch.Generator().manual_seed(seed))
        return SAMPLERS[name](gmm_denoiser(), x, sig, noise=noise)

    a, b, c = run(10), run(10), run(11)
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_default_noise_is_the_brownian_tree_for_sde_samplers():
    """default_noise(name, x, sigmas, generator) = ComfyUI's rule: a tree seeded with the
    generator's seed for the SDE samplers; the sampler's own ``seed=`` gives the same."""
    sig = karras_sigmas(10, SIGMA_MIN, SIGMA_MAX)
    x = start_state(16, float(sig[0]), seed=3)
    g = torch.Generator().manual_seed(1234)
    via_default = sample("dpmpp_2m_sde", gmm_denoiser(), x, sig,
                         noise=default_noise("dpmpp_2m_sde", x, sig, g))
    via_seed = SAMPLERS["dpmpp_2m_sde"](gmm_denoiser(), x, sig, seed=1234)
    assert torch.equal(via_default, via_seed)
    assert not hasattr(default_noise("dpmpp_2s_ancestral", x, sig, g), "bounds")


# ---------------------------------------------------------------------------------------------
# Edge cases and argument checks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_zero_length_step_and_float32(name):
    """diffusers-style Karras lists end sigma_min -> sigma_min: no NaN, no crash; float32
    states stay float32."""
    from tests.analytic import GaussianMixture

    sig = torch.cat([karras_sigmas(8, SIGMA_MIN, SIGMA_MAX)[:-1],
                     torch.tensor([SIGMA_MIN], dtype=F64)])
    x = start_state(16, float(sig[0]), seed=5)
    assert torch.isfinite(run_sampler(name, sig, x, seed=1).final).all()
    gmm32 = GaussianMixture.default(torch.float32)
    out32 = SAMPLERS[name](gmm_denoiser(gmm32), x.float(), sig.float())
    assert out32.dtype == torch.float32 and torch.isfinite(out32).all()


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("dpmpp_2m_sde", {"solver_type": "rk4"}, "solver_type must be one of"),
        ("dpmpp_sde", {"eta": -1.0}, "eta and s_noise must be >= 0"),
        ("dpmpp_3m_sde", {"s_noise": -0.5}, "eta and s_noise must be >= 0"),
        ("dpmpp_sde", {"r": 1.5}, "r .* must lie in"),
    ],
)
def test_bad_options_are_explained(name, options, message):
    x = start_state(4, SIGMA_MAX)
    with pytest.raises(ValueError, match=message):
        SAMPLERS[name](gmm_denoiser(), x, SIGMAS_25, **options)


def test_single_step_to_zero_returns_the_denoised_estimate():
    sig = torch.tensor([3.0, 0.0], dtype=F64)
    x = start_state(8, 3.0)
    want = GMM.denoise(x, torch.full((8,), 3.0, dtype=F64))
    for name, fn in SAMPLERS.items():
        torch.testing.assert_close(fn(gmm_denoiser(), x, sig), want, msg=name)
