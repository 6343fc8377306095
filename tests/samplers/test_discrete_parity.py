"""Parity of ddim / ddpm / lcm with diffusers' DDIM, DDPM and LCM schedulers (float64, GMM).

diffusers keeps these schedulers' samples in VP form x_t = x / sqrt(1 + sigma^2); the harness
converts every state to VE.  DDPM and DDIM are built with ``clip_sample=False`` (their
default clips the x0 estimate to [-1, 1], an image-space heuristic, not part of the
algorithm; noisecraft leaves x0 alone).  Documented differences, asserted as such:

* DDIM with ``timestep_spacing="linspace"``: diffusers steps from t to t - T // n, which is
  not the next timestep of a linspace grid (999 -> 899, then restarts at 888 with the
  same VP sample).  noisecraft's ddim steps between consecutive sigmas; the test reproduces
  diffusers exactly by running ddim step by step on diffusers' (from, to) pairs.
* DDIM with eta > 0 and DDPM with trailing spacing: diffusers draws a noise tensor on the final
  step (where its variance is 0); noisecraft draws none.
* LCM: diffusers' scheduler applies the LCM boundary condition c_skip / c_out (a property
  of the distilled network) to the x0 estimate; in noisecraft that belongs to the denoiser.
  Without it the results differ by ~1e-7 (c_skip < 4e-8 at t >= 259); with the same
  wrapper around the GMM denoiser (using diffusers' float32 c_skip, c_out values)
  they agree to 1e-12.
"""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, LCMScheduler

from noisecraft.samplers.discrete import sample_ddim
from tests.samplers.harness import (
    GMM,
    SD_BETAS,
    SD_SCHEDULE,
    assert_trajectories_close,
    run_pair,
    run_sampler,
    single_thread,  # noqa: F401
)

pytestmark = pytest.mark.usefixtures("single_thread")


def _alpha_sigma(a: float) -> float:
    return math.sqrt((1 - a) / a)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_ddim_deterministic(spacing, alpha_to_one):
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=alpha_to_one,
                          timestep_spacing=spacing, steps_offset=1 if spacing == "leading" else 0)
    final = 0.0 if alpha_to_one else _alpha_sigma(float(sched.alphas_cumprod[0]))
    ours, ref = run_pair("ddim", sched, steps=10, seed=5, final_sigma=final)
    assert_trajectories_close(ours, ref, atol=1e-5)
    assert ours.noise_used == 0 and len(ref.noise) == 0
    assert float(ref.sigmas[-1]) == pytest.approx(final)


@pytest.mark.parametrize("eta", [0.5, 1.0])
def test_ddim_eta(eta):
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=True)
    ours, ref = run_pair("ddim", sched, steps=10, seed=6, options={"eta": eta},
                         step_kwargs={"eta": eta})
    assert_trajectories_close(ours, ref, atol=1e-5)
    assert len(ref.noise) == 10 and ours.noise_used == 9  # diffusers' last draw is unused


def test_ddim_linspace_is_diffusers_off_grid_step():
    sched = DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=True,
                          timestep_spacing="linspace")
    ours, ref = run_pair("ddim", sched, steps=10, seed=7)
    # stepping between consecutive grid sigmas is NOT what diffusers does here
    assert (ours.final - ref.final).abs().max() > 1e-2
    ac = sched.alphas_cumprod.to(torch.float64)
    ratio = sched.config.num_train_timesteps // 10
    x = ref.xs[0]
    for i, t in enumerate(sched.timesteps.tolist()):
        s_from = _alpha_sigma(float(ac[t]))
        s_to = _alpha_sigma(float(ac[t - ratio])) if t - ratio >= 0 else 0.0
        x_ve = x * math.sqrt(1 + s_from**2) / math.sqrt(1 + float(ref.sigmas[i]) ** 2)
        x_ve = sample_ddim(lambda x_, s: GMM.denoise(x_, s), x_ve,
                           torch.tensor([s_from, s_to], dtype=torch.float64))
        # diffusers carries the VP sample on to the next timestep unchanged
        x_vp = x_ve / math.sqrt(1 + s_to**2)
        x = x_vp * math.sqrt(1 + float(ref.sigmas[i + 1]) ** 2)
        torch.testing.assert_close(x, ref.xs[i + 1], atol=1e-10, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddpm(spacing):
    sched = DDPMScheduler(**SD_BETAS, clip_sample=False, timestep_spacing=spacing)
    ours, ref = run_pair("ddpm", sched, steps=10, seed=8)
    assert_trajectories_close(ours, ref, atol=1e-5)
    # one draw per step that ends above sigma 0; trailing's last timestep (99) is > 0, where
    # diffusers draws one more (times variance 0)
    assert ours.noise_used == 9
    assert len(ref.noise) == (10 if spacing == "trailing" else 9)


def _lcm_boundary(denoiser, scheduler):
    """The LCM boundary condition as a denoiser wrapper: c_out * x0 + c_skip * x_t (x_t the
    VP sample), with the scheduler's own (float32) c_skip, c_out at the rounded timestep."""

    def wrapped(x, sigma):
        t = int(SD_SCHEDULE.sigma_to_t(sigma[:1]).round())
        c_skip, c_out = (float(c) for c in
                         scheduler.get_scalings_for_boundary_condition_discrete(torch.tensor(t)))
        x_vp = x / (1 + sigma.reshape(-1, 1) ** 2).sqrt()
        return c_out * denoiser(x, sigma) + c_skip * x_vp

    return wrapped


@pytest.mark.parametrize("steps", [2, 4])
def test_lcm(steps):
    sched = LCMScheduler(**SD_BETAS)
    ours, ref = run_pair("lcm", sched, steps=steps, seed=9)
    assert_trajectories_close(ours, ref, atol=1e-6)  # boundary condition left out: ~1e-7
    assert ours.noise_used == len(ref.noise) == steps - 1
    exact = run_sampler("lcm", ref.sigmas, ref.xs[0], noise=list(ref.noise),
                        denoiser=_lcm_boundary(lambda x, s: GMM.denoise(x, s), sched))
    assert_trajectories_close(exact, ref, atol=1e-12)
