"""CFG++ samplers on the analytic Gaussian mixture.

Set-up: the unconditional model is the exact denoiser of the 3-component mixture (harness
``GMM``); the conditional model is that of its component 0 alone (``N(mu_0, s_0^2 I)``), so
cond and uncond differ as a prompt and an empty prompt do.  What is checked:

* without a separate unconditional prediction (a plain denoiser, or cond == uncond at any
  scale) every CFG++ sampler IS its plain counterpart (to 1e-12): that is the sense in which
  "scale 1 equals the plain sampler" holds for CFG++.  With cond != uncond, scale 1 is not
  plain conditional sampling (x0 conditional, renoising unconditional): shown below;
* scale 0 samples the unconditional mixture (mass, mean, std within 5 MC s.e. + 0.01);
* euler_cfg_pp at scale lambda is exactly Euler with the per-step CFG scale
  ``lambda * sigma / (sigma - sigma')`` (Chung et al. 2024's DDIM equivalence; any lambda);
* scales 0.5, 1, 1.5 (> 1 included): every sample lands on component 0 and near it (within
  8 s_0 of mu_0, where unguided samples reach ~19 s_0); as the scale grows the component
  mean moves monotonically along the guidance direction (mu_0 - mixture mean), and the
  spread does not grow.  The exact guided distribution has no closed form (CFG samples no
  Bayes posterior), so no sharper target exists.
"""

from __future__ import annotations

import pytest
import torch

from noisecraft.guidance import cfg_denoiser
from noisecraft.samplers import SAMPLERS, get_sampler, sample
from noisecraft.samplers.cfg_pp import SAMPLERS as CFG_PP_SAMPLERS
from noisecraft.samplers.cfg_pp import cfg_pp_denoiser, guided_and_uncond, needs_uncond
from noisecraft.schedules import karras_sigmas
from tests.analytic import GaussianMixture
from tests.samplers.harness import (
    GMM,
    SIGMA_MAX,
    SIGMA_MIN,
    assert_matches_mixture,
    gmm_denoiser,
    mixture_stats,
    run_sampler,
    single_thread,  # noqa: F401
    start_state,
)

pytestmark = pytest.mark.usefixtures("single_thread")

F64 = torch.float64
PLAIN = {"euler_cfg_pp": "euler", "euler_ancestral_cfg_pp": "euler_ancestral",
         "dpmpp_2m_cfg_pp": "dpmpp_2m", "dpmpp_2s_ancestral_cfg_pp": "dpmpp_2s_ancestral"}
COMPONENT0 = GaussianMixture(GMM.means[:1], GMM.stds[:1], torch.ones(1, dtype=F64))
COND, UNCOND = {"c": torch.ones(1, 1, dtype=F64)}, {"c": torch.zeros(1, 1, dtype=F64)}
N, STEPS = 1000, 50


def _model(x, sigma, cond):
    """A Denoiser-shaped ``(x, sigma, cond) -> x0``: component 0 where c = 1, else the mixture."""
    c = cond["c"].reshape(-1, 1) > 0.5
    return torch.where(c, COMPONENT0.denoise(x, sigma), GMM.denoise(x, sigma))


def _sigmas(steps=STEPS):
    return karras_sigmas(steps, SIGMA_MIN, SIGMA_MAX)


@pytest.fixture(scope="module")
def x_start():
    return start_state(N, SIGMA_MAX, seed=21)


def test_registered_under_comfyui_names():
    # dpmpp_2m_cfg_pp waits for test_sample_api's MULTISTEP list (see samplers/__init__.py)
    assert set(PLAIN) - {"dpmpp_2m_cfg_pp"} <= set(SAMPLERS)
    assert set(PLAIN) == set(CFG_PP_SAMPLERS)
    assert all(needs_uncond(n) for n in PLAIN) and not needs_uncond("euler")


@pytest.mark.parametrize("name", list(PLAIN))
def test_without_a_separate_uncond_each_is_its_plain_sampler(name):
    x = start_state(64, SIGMA_MAX, seed=3)
    sig = _sigmas(12)
    want = run_sampler(PLAIN[name], sig, x, seed=4).xs
    got = run_sampler(CFG_PP_SAMPLERS[name], sig, x, seed=4).xs  # plain denoiser: no with_uncond
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    same = cfg_pp_denoiser(_model, COND, COND, scale=3.0)  # cond == uncond: guidance is void
    got_same = run_sampler(CFG_PP_SAMPLERS[name], sig, x, denoiser=same, seed=4).xs
    want_same = run_sampler(PLAIN[name], sig, x, denoiser=gmm_denoiser(COMPONENT0), seed=4).xs
    torch.testing.assert_close(got_same, want_same, atol=1e-12, rtol=1e-12)


def test_guided_x0_is_cfg_and_uncond_is_the_negative_prompt():
    x = start_state(16, 2.0, seed=5)
    sigma = torch.full((16,), 2.0, dtype=F64)
    d = cfg_pp_denoiser(_model, COND, UNCOND, scale=1.7)
    guided, uncond = guided_and_uncond(d, x, sigma)
    torch.testing.assert_close(guided, cfg_denoiser(_model, COND, UNCOND, 1.7)(x, sigma))
    torch.testing.assert_close(uncond, GMM.denoise(x, sigma))
    with pytest.raises(ValueError, match="scale must be >= 0"):
        cfg_pp_denoiser(_model, COND, UNCOND, scale=-1.0)


@pytest.mark.parametrize("name", list(PLAIN))
def test_scale_zero_samples_the_unconditional_mixture(name, x_start):
    d = cfg_pp_denoiser(_model, COND, UNCOND, scale=0.0)
    out = run_sampler(CFG_PP_SAMPLERS[name], _sigmas(), x_start, denoiser=d, seed=22).final
    assert_matches_mixture(out, GMM, z=5.0, bias=0.01, label=name)


@pytest.mark.parametrize("scale", [0.5, 1.5])
def test_euler_cfg_pp_is_euler_with_a_per_step_guidance_scale(scale):
    x = start_state(32, SIGMA_MAX, seed=6)
    sig = _sigmas(10).to(F64)
    got = run_sampler("euler_cfg_pp", sig, x,
                      denoiser=cfg_pp_denoiser(_model, COND, UNCOND, scale)).xs
    per_step = {float(s): scale * float(s / (s - s_next))
                for s, s_next in zip(sig[:-1], sig[1:], strict=True)}

    def varying_cfg(x_, sigma):
        return cfg_denoiser(_model, COND, UNCOND, per_step[float(sigma[0])])(x_, sigma)

    want = run_sampler("euler", sig, x, denoiser=varying_cfg).xs
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", list(PLAIN))
def test_guidance_selects_the_condition_and_stays_on_the_manifold(name, x_start):
    direction = GMM.means[0] - (GMM.weights[:, None] * GMM.means).sum(0)
    direction = direction / direction.norm()
    along, spread = [], []
    for scale in (0.5, 1.0, 1.5):
        d = cfg_pp_denoiser(_model, COND, UNCOND, scale)
        out = run_sampler(CFG_PP_SAMPLERS[name], _sigmas(), x_start, denoiser=d, seed=22).final
        assert torch.isfinite(out).all()
        assert (GMM.assign(out) == 0).all(), f"{name} scale {scale}: samples off component 0"
        far = float((out - GMM.means[0]).norm(dim=1).max())
        assert far < 8 * float(GMM.stds[0]), f"{name} scale {scale}: a sample {far:.2f} away"
        along.append(float((out.mean(0) - GMM.means[0]) @ direction))
        spread.append(float(out.var(0).mean().sqrt()))  # all samples are component 0's
    assert along[0] < along[1] < along[2], f"{name}: mean along guidance {along}"
    assert spread[2] <= spread[1] + 1e-3 <= spread[0] + 2e-3, f"{name}: std {spread}"


def test_unguided_start_does_reach_far_so_the_manifold_check_has_teeth(x_start):
    out = run_sampler("euler_cfg_pp", _sigmas(), x_start,
                      denoiser=cfg_pp_denoiser(_model, COND, UNCOND, 0.0), seed=22).final
    assert float((out - GMM.means[0]).norm(dim=1).max()) > 8 * float(GMM.stds[0])


def test_scale_one_is_not_plain_conditional_sampling(x_start):
    """Scale 1: x0 is the conditional one, renoising stays unconditional - stronger than plain
    conditional Euler, whose samples match component 0 (std s_0 = 0.3)."""
    plain = run_sampler("euler", _sigmas(), x_start, denoiser=gmm_denoiser(COMPONENT0)).final
    assert abs(float(mixture_stats(plain, COMPONENT0).std[0]) - 0.3) < 0.02
    pp = run_sampler("euler_cfg_pp", _sigmas(), x_start,
                     denoiser=cfg_pp_denoiser(_model, COND, UNCOND, 1.0)).final
    assert float(mixture_stats(pp, COMPONENT0).std[0]) < 0.25


def test_sample_api_runs_cfg_pp_part_way():
    x = start_state(8, SIGMA_MAX, seed=7)
    d = cfg_pp_denoiser(_model, COND, UNCOND, 1.0)
    out = sample("dpmpp_2s_ancestral_cfg_pp", d, x, _sigmas(10), end_step=5,
                 generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert get_sampler("euler_cfg_pp").__doc__.startswith("Euler / DDIM with CFG++")
