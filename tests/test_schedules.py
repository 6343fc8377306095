import math

import pytest
import torch

from noisecraft.schedules import (
    COMFY_SPACINGS,
    SPACINGS,
    DiscreteSchedule,
    alphas_cumprod_from_betas,
    betas_for,
    build_sigmas,
    rescale_zero_terminal_snr,
    sigmas_from_alphas_cumprod,
)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_betas_match_diffusers(name):
    from diffusers import DDPMScheduler

    diffusers_name = "squaredcos_cap_v2" if name == "cosine" else name
    ref = DDPMScheduler(beta_schedule=diffusers_name, beta_start=0.00085, beta_end=0.012)
    ours = betas_for(name, 1000, 0.00085, 0.012)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours.float(), ref.betas, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(
        alphas_cumprod_from_betas(ours).float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-6
    )


def test_zero_terminal_snr():
    ac = alphas_cumprod_from_betas(betas_for("scaled_linear"))
    r = rescale_zero_terminal_snr(ac)
    assert r[-1] == 0 and math.isclose(float(r[0]), float(ac[0]), rel_tol=1e-12)
    assert (r[1:] < r[:-1]).all()
    from diffusers import DDPMScheduler

    ref = DDPMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        rescale_betas_zero_snr=True,
    )
    torch.testing.assert_close(r.float(), ref.alphas_cumprod, rtol=1e-4, atol=1e-6)


def test_sigma_timestep_roundtrip():
    s = DiscreteSchedule.from_betas()
    t = torch.tensor([0.0, 0.5, 10.25, 500.0, 998.9, 999.0], dtype=torch.float64)
    torch.testing.assert_close(s.sigma_to_t(s.t_to_sigma(t)), t, atol=1e-6, rtol=0)
    assert s.sigmas[0] == s.sigma_min and s.sigmas[-1] == s.sigma_max
    torch.testing.assert_close(
        sigmas_from_alphas_cumprod(s.alphas_cumprod), s.sigmas, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("spacing", list(SPACINGS))
@pytest.mark.parametrize("steps", [1, 4, 20])
def test_spacings_shape_and_order(spacing, steps):
    sig = build_sigmas(steps, spacing=spacing)
    assert sig.dtype == torch.float64
    # beta drops repeated timesteps, so very short runs may have fewer steps
    assert len(sig) == steps + 1 or (spacing == "beta" and len(sig) <= steps + 1)
    assert (sig[1:] <= sig[:-1]).all() and sig[-1] == 0
    assert sig[0] <= 14.62


def test_karras_endpoints():
    sig = build_sigmas(10, spacing="karras")
    s = DiscreteSchedule.from_betas()
    assert math.isclose(float(sig[0]), s.sigma_max) and math.isclose(float(sig[-2]), s.sigma_min)
    # evenly spaced in sigma^(1/7)
    d = torch.diff(sig[:-1] ** (1 / 7))
    torch.testing.assert_close(d, d[0].expand_as(d))


def test_exponential_is_log_uniform():
    sig = build_sigmas(8, spacing="exponential")[:-1]
    d = torch.diff(sig.log())
    torch.testing.assert_close(d, d[0].expand_as(d))


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_diffusers_spacings_match_euler_scheduler(spacing):
    from diffusers import EulerDiscreteScheduler

    ref = EulerDiscreteScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        timestep_spacing=spacing, steps_offset=1,
    )
    ref.set_timesteps(20)
    ours = build_sigmas(20, spacing=spacing, steps_offset=1) if spacing == "leading" else (
        build_sigmas(20, spacing=spacing))
    torch.testing.assert_close(ours.float(), ref.sigmas.float(), rtol=1e-5, atol=1e-5)


def test_bad_names_and_steps():
    with pytest.raises(ValueError, match="karras"):
        build_sigmas(10, spacing="karas")
    with pytest.raises(ValueError, match="scaled_linear"):
        build_sigmas(10, schedule="squared")
    with pytest.raises(ValueError, match=">= 1"):
        build_sigmas(0)
    assert set(COMFY_SPACINGS) <= set(SPACINGS)
