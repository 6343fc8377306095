"""Sigma schedulers and edits, AddNoise, and SAMPLER nodes with options: values by hand, and on
a tiny SD1 checkpoint the options must reach the sampler (SamplerCustom vs KSampler)."""

from __future__ import annotations

import math

import pytest
import torch

from noisecraft.engine import Engine
from noisecraft.graph import run_workflow_result
from noisecraft.models.family import get_family
from noisecraft.nodes.custom_samplers import (
    SamplerDPMPP_2M_SDE,
    SamplerEulerAncestral,
    SamplerLMS,
)
from noisecraft.nodes.sampling import (
    AddNoise,
    BetaSamplingScheduler,
    FlipSigmas,
    PolyexponentialScheduler,
    RandomNoise,
    SDTurboScheduler,
    SplitSigmasDenoise,
    VPScheduler,
)
from noisecraft.schedules import beta_sigmas, exponential_sigmas
from tests.nodes.test_model_nodes_support import (
    make_context,
    registry,
    txt2img_prompt,
    write_models,
)

FAMILY = get_family("sd1")
TABLE = FAMILY.schedule().sigmas


class FakeModel:
    family = FAMILY


def test_polyexponential_and_vp_schedules():
    (p1,) = PolyexponentialScheduler.execute(6, 10.0, 0.1, 1.0)
    assert torch.allclose(p1, exponential_sigmas(6, 0.1, 10.0))
    (p2,) = PolyexponentialScheduler.execute(3, 10.0, 0.1, 2.0)
    ramp = [1.0, 0.25, 0.0]  # linspace(1, 0, 3) ** 2
    expected = [math.exp(math.log(0.1) + r * (math.log(10.0) - math.log(0.1))) for r in ramp]
    assert torch.allclose(p2, torch.tensor([*expected, 0.0], dtype=p2.dtype))
    (vp,) = VPScheduler.execute(2, 19.9, 0.1, 0.001)
    first = math.sqrt(math.expm1(19.9 / 2 + 0.1))
    last = math.sqrt(math.expm1(19.9 * 0.001**2 / 2 + 0.1 * 0.001))
    assert torch.allclose(vp, torch.tensor([first, last, 0.0], dtype=vp.dtype))


def test_model_schedulers_use_the_models_table():
    (turbo,) = SDTurboScheduler.execute(FakeModel(), 2, 1.0)
    assert torch.equal(turbo, torch.cat([TABLE[[999, 899]], TABLE.new_zeros(1)]))
    (half,) = SDTurboScheduler.execute(FakeModel(), 3, 0.5)  # skips 999 ... 599
    assert torch.equal(half[:-1], TABLE[[499, 399, 299]]) and half[-1] == 0
    (beta,) = BetaSamplingScheduler.execute(FakeModel(), 7, 0.5, 0.7)
    assert torch.equal(beta, beta_sigmas(FAMILY.schedule(), 7, 0.5, 0.7))


def test_split_by_denoise_and_flip():
    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.0])
    high, low = SplitSigmasDenoise.execute(s, 0.5)
    assert high.tolist() == [8.0, 4.0, 2.0] and low.tolist() == [2.0, 1.0, 0.0]
    high, low = SplitSigmasDenoise.execute(s, 0.0)
    assert high.numel() == 0 and low.tolist() == [0.0]
    (flipped,) = FlipSigmas.execute(s)
    assert flipped.tolist() == pytest.approx([0.0001, 1.0, 2.0, 4.0, 8.0])
    assert s[0] == 8.0  # the input is not modified
    assert FlipSigmas.execute(torch.zeros(0))[0].numel() == 0


def test_add_noise_in_the_models_latent_space():
    (noise,) = RandomNoise.execute(7)
    x = torch.rand(1, 4, 2, 2) + 0.5
    drawn = torch.randn((1, 4, 2, 2), generator=torch.Generator().manual_seed(7))
    sigmas = torch.tensor([10.0, 2.0, 0.5])
    (out,) = AddNoise.execute(FakeModel(), noise, sigmas, {"samples": x, "batch_index": [0]})
    k = FAMILY.latent.scaling_factor
    assert torch.allclose(out["samples"], (x * k + 9.5 * drawn) / k, atol=1e-5)
    assert out["batch_index"] == [0]
    (empty,) = AddNoise.execute(FakeModel(), noise, sigmas[:1], {"samples": torch.zeros(1, 4, 2,
                                                                                        2)})
    assert torch.allclose(empty["samples"], 10.0 * drawn / k, atol=1e-5)  # not scaled in
    latent = {"samples": x}
    assert AddNoise.execute(FakeModel(), noise, torch.zeros(0), latent)[0] is latent


def test_sampler_nodes_carry_their_options():
    (ea,) = SamplerEulerAncestral.execute(eta=0.5, s_noise=0.8)
    assert (ea.name, ea.options) == ("euler_ancestral", {"eta": 0.5, "s_noise": 0.8})
    (sde,) = SamplerDPMPP_2M_SDE.execute(solver_type="heun", eta=1.0, s_noise=1.0,
                                         noise_device="gpu")
    assert sde.options == {"solver_type": "heun", "eta": 1.0, "s_noise": 1.0}
    assert SamplerLMS.execute(order=2)[0].options == {"order": 2}
    info = registry().object_info()
    assert info["SamplerDPMPP_2M_SDE"]["input_order"]["required"] == [
        "solver_type", "eta", "s_noise", "noise_device"]
    assert info["SamplerDPMPP_SDE"]["input"]["required"]["r"] == [
        "FLOAT", {"default": 0.5, "min": 0.0, "max": 100.0, "step": 0.01, "round": False}]
    assert info["SamplerLMS"]["input"]["required"]["order"] == [
        "INT", {"default": 4, "min": 1, "max": 100}]
    assert info["SplitSigmasDenoise"]["output_name"] == ["high_sigmas", "low_sigmas"]
    assert info["AddNoise"]["category"] == "_for_testing/custom_sampling/noise"


# ---- the options reach the sampler ----------------------------------------------------------


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    torch.set_num_threads(1)
    models = write_models(tmp_path_factory.mktemp("models"))
    return make_context(models, tmp_path_factory.mktemp("run"), Engine(device="cpu"))


def _latent(prompt, context):
    run = run_workflow_result(prompt, registry=registry(), context=context)
    return run.values["3"][0]["samples"]


def _ksampler(sampler):
    return txt2img_prompt(steps=3, sampler=sampler)


def _custom(sampler_node):
    p = txt2img_prompt(steps=3)
    p["32"] = sampler_node
    p["33"] = {"class_type": "BasicScheduler", "inputs": {
        "model": ["4", 0], "scheduler": "normal", "steps": 3, "denoise": 1.0}}
    p["3"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["4", 0], "add_noise": True, "noise_seed": 42, "cfg": 7.5,
        "positive": ["6", 0], "negative": ["7", 0], "sampler": ["32", 0],
        "sigmas": ["33", 0], "latent_image": ["5", 0]}}
    return p


@pytest.mark.parametrize(("node", "equivalent"), [
    # eta 0: no noise is re-added, i.e. plain Euler
    ({"class_type": "SamplerEulerAncestral", "inputs": {"eta": 0.0, "s_noise": 1.0}}, "euler"),
    ({"class_type": "SamplerEulerAncestral", "inputs": {"eta": 1.0, "s_noise": 1.0}},
     "euler_ancestral"),
    # linear multistep of order 1 is Euler (the default order, 4, is not)
    ({"class_type": "SamplerLMS", "inputs": {"order": 1}}, "euler"),
    ({"class_type": "SamplerDPMPP_2M_SDE", "inputs": {
        "solver_type": "heun", "eta": 1.0, "s_noise": 1.0, "noise_device": "cpu"}},
     "dpmpp_2m_sde_heun"),
])
def test_sampler_options_reach_the_sampler(context, node, equivalent):
    got = _latent(_custom(node), context)
    assert torch.equal(got, _latent(_ksampler(equivalent), context))


def test_changing_an_option_changes_the_image(context):
    base = {"class_type": "SamplerEulerAncestral", "inputs": {"eta": 1.0, "s_noise": 1.0}}
    quiet = {"class_type": "SamplerEulerAncestral", "inputs": {"eta": 1.0, "s_noise": 0.0}}
    assert not torch.allclose(_latent(_custom(base), context), _latent(_custom(quiet), context))
    lms4 = _latent(_custom({"class_type": "SamplerLMS", "inputs": {"order": 4}}), context)
    assert torch.equal(lms4, _latent(_ksampler("lms"), context))
    assert not torch.equal(lms4, _latent(_ksampler("euler"), context))
