"""The ``sample()`` entry point and the sampler contract, over every registered sampler."""

import pytest
import torch

from noisecraft.samplers import SAMPLERS, gaussian_noise, sample
from noisecraft.schedules import karras_sigmas
from tests.samplers.harness import (
    SIGMA_MAX,
    SIGMA_MIN,
    gmm_denoiser,
    single_thread,  # noqa: F401
    start_state,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SIGMAS = karras_sigmas(12, SIGMA_MIN, SIGMA_MAX)
K = 5  # the hand-off step of part-way runs
DENOISER = gmm_denoiser()

# Multistep samplers keep a history of past slopes; a run that starts part-way begins a new
# history (as ComfyUI's KSamplerAdvanced does), so only their first segment equals the full run.
MULTISTEP = {"lms", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde",
             "uni_pc", "uni_pc_bh2", "dpmpp_2m_cfg_pp"}
# UniPC lowers its order over the last steps of a run (diffusers' lower_order_final), so even
# a run that stops part-way differs from the same steps of a longer run.
DEPENDS_ON_RUN_LENGTH = {"uni_pc", "uni_pc_bh2"}
# Stochastic in this package's own samplers (others' samplers are detected by running them).
STOCHASTIC = {"euler_ancestral", "dpm_2_ancestral", "ddpm", "lcm"}


def _x():
    return start_state(16, SIGMA_MAX, seed=1)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match="unknown sampler 'eulr'") as e:
        sample("eulr", DENOISER, _x(), SIGMAS)
    for name in SAMPLERS:
        assert name in str(e.value)


@pytest.mark.parametrize("start,end", [(5, 5), (6, 5), (-1, None), (0, 13), (12, None)])
def test_bad_step_range(start, end):
    with pytest.raises(ValueError, match="start_step"):
        sample("euler", DENOISER, _x(), SIGMAS, start_step=start, end_step=end)


@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize(
    "sigmas,message",
    [
        (torch.tensor([1.0]), "at least 2 values"),
        (torch.ones(2, 3), "1-D"),
        (torch.tensor([1.0, 2.0, 0.0]), "descending"),
        (torch.tensor([1.0, float("nan"), 0.0]), "finite"),
        (torch.tensor([1.0, -0.5]), ">= 0"),
    ],
)
def test_bad_sigmas_are_refused(name, sigmas, message):
    with pytest.raises(ValueError, match=message):
        SAMPLERS[name](DENOISER, _x(), sigmas.to(torch.float64))


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_integer_x_is_refused(name):
    with pytest.raises(TypeError, match="floating-point"):
        SAMPLERS[name](DENOISER, torch.zeros(4, 2, dtype=torch.long), SIGMAS)


def test_lms_order_must_be_positive():
    with pytest.raises(ValueError, match="order must be a whole number >= 1"):
        sample("lms", DENOISER, _x(), SIGMAS, order=0)


def _full_run(name):
    states = []
    noise = gaussian_noise(_x(), torch.Generator().manual_seed(3))
    out = sample(name, DENOISER, _x(), SIGMAS, noise=noise, callback=lambda s: states.append(s))
    return out, states


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_callback_once_per_step(name):
    out, states = _full_run(name)
    assert [s.i for s in states] == list(range(12))
    assert {s.total for s in states} == {12}
    assert [s.sigma for s in states] == SIGMAS[:-1].tolist()
    assert [s.sigma_next for s in states] == SIGMAS[1:].tolist()
    assert torch.equal(states[-1].x, out)
    assert all(s.x0.shape == out.shape for s in states)
    # a part-way run reports its own steps, numbered from 0
    part = []
    sample(name, DENOISER, _x(), SIGMAS, end_step=K, callback=part.append,
           generator=torch.Generator().manual_seed(3))
    assert [(s.i, s.total) for s in part] == [(i, K) for i in range(K)]


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_part_way_runs_are_slices_of_the_full_run(name):
    """end_step=K stops at sigmas[K] > 0 (a refiner hand-off); start_step=K resumes there."""
    full, states = _full_run(name)
    noise = gaussian_noise(_x(), torch.Generator().manual_seed(3))  # one stream, both halves
    first = sample(name, DENOISER, _x(), SIGMAS, end_step=K, noise=noise)
    second = sample(name, DENOISER, first, SIGMAS, start_step=K, noise=noise)
    if name in DEPENDS_ON_RUN_LENGTH:
        assert not torch.allclose(first, states[K - 1].x)
        return
    assert torch.equal(first, states[K - 1].x)
    if name in MULTISTEP:
        assert not torch.allclose(second, full)  # the history restarts at K
    else:
        assert torch.equal(second, full)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_same_seed_same_samples(name):
    def run(seed):
        return sample(name, DENOISER, _x(), SIGMAS, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(7), run(7), run(8)
    assert torch.equal(a, b)
    if name in STOCHASTIC:
        assert (a - c).abs().max() > 1e-3


def test_ddim_eta_and_euler():
    gen = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    euler = sample("euler", DENOISER, _x(), SIGMAS)
    ddim = sample("ddim", DENOISER, _x(), SIGMAS)
    assert (ddim - euler).abs().max() < 1e-12  # DDIM (eta 0) is Euler in VE form
    ddim1 = sample("ddim", DENOISER, _x(), SIGMAS, eta=1.0, generator=gen())
    ddpm = sample("ddpm", DENOISER, _x(), SIGMAS, generator=gen())
    ancestral = sample("euler_ancestral", DENOISER, _x(), SIGMAS, generator=gen())
    assert (ddim1 - ddpm).abs().max() < 1e-12 and (ddpm - ancestral).abs().max() < 1e-12
    assert (ddim1 - ddim).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["euler_ancestral", "dpm_2_ancestral"])
def test_eta_zero_is_deterministic(name):
    a = sample(name, DENOISER, _x(), SIGMAS, eta=0.0, generator=torch.Generator().manual_seed(1))
    b = sample(name, DENOISER, _x(), SIGMAS, eta=0.0, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    base = sample(name.removesuffix("_ancestral"), DENOISER, _x(), SIGMAS)
    assert (a - base).abs().max() < 1e-12


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_float32_in_float32_out(name):
    x = _x().float()
    out = sample(name, lambda x_, s: DENOISER(x_.double(), s.double()).float(), x, SIGMAS,
                 generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
