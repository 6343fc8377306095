"""ControlNet and CFG++ through the one engine (generate_image / GenerationRequest), on tiny
random-weight models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.api import generate_image
from noisecraft.conditioning import encode_conditioning
from noisecraft.models.controlnet import ControlSpec
from noisecraft.pipelines.common import (
    generators_for,
    guided_denoiser,
    model_sigmas,
    seeded_noise,
)
from noisecraft.pipelines.control import controlled_unet, sided_unet
from noisecraft.request import ControlNetUnit, GenerationRequest, InputError
from noisecraft.samplers import sample
from noisecraft.samplers.cfg_pp import cfg_pp_denoiser
from tests.fixtures.controlnet import tiny_controlnet, write_controlnet
from tests.pipelines.tiny import shared_bundle, tiny_bundle, tiny_engine

PROMPT, NEGATIVE = "a red cat", "ugly"


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("sd1")


@pytest.fixture(scope="module")
def net():
    return tiny_controlnet(shared_bundle("sd1").unet.config, seed=5)


@pytest.fixture(scope="module")
def hint():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB")


def _gen(engine, **kw):
    kw = {"model": "sd1", "steps": 3, "seed": 3, "cfg_scale": 5.0, "engine": engine, **kw}
    return np.asarray(generate_image(PROMPT, negative_prompt=NEGATIVE, **kw))


def test_strength_zero_or_empty_window_is_the_plain_image(engine, net, hint):
    plain = _gen(engine)
    np.testing.assert_array_equal(_gen(engine, controlnets=[(net, hint, 0.0)]), plain)
    np.testing.assert_array_equal(_gen(engine, controlnets=[(net, hint, 1.0, 0.0, 0.0)]), plain)


def test_controlnet_changes_the_image_and_is_deterministic(engine, net, hint):
    plain = _gen(engine)
    a = _gen(engine, controlnets=[(net, hint, 1.0)])
    assert np.abs(a.astype(int) - plain.astype(int)).mean() > 1.0
    np.testing.assert_array_equal(_gen(engine, controlnets=[(net, hint, 1.0)]), a)
    half = _gen(engine, controlnets=[{"model": net, "image": hint, "end_percent": 0.5}])
    assert not np.array_equal(half, a) and not np.array_equal(half, plain)


def test_img2img_and_hires_run_the_controlnet_too(engine, net, hint):
    for kw in ({"init_image": hint, "strength": 0.7}, {"hires_scale": 1.5, "hires_steps": 2}):
        plain = _gen(engine, **kw)
        assert not np.array_equal(_gen(engine, controlnets=[(net, hint, 1.0)], **kw), plain)


def test_file_controlnet_is_loaded_once_and_settings_round_trip(engine, hint, tmp_path):
    path = write_controlnet(tmp_path / "control_tiny.safetensors",
                            shared_bundle("sd1").unet.config, seed=5)
    hint_path = tmp_path / "hint.png"
    hint.save(hint_path)
    image = generate_image(PROMPT, negative_prompt=NEGATIVE, model="sd1", steps=3, seed=3,
                           cfg_scale=5.0, engine=engine,
                           controlnets=[(str(path), str(hint_path), 0.8)])
    assert engine.cached_controlnets[-1] == str(path.resolve())
    first = engine.controlnet(path)
    assert engine.controlnet(path) is first  # cached
    settings = json.loads(image.info["noisecraft"])
    assert settings["controlnets"] == [{"model": str(path), "image": str(hint_path),
                                        "strength": 0.8, "start_percent": 0.0,
                                        "end_percent": 1.0, "preprocessor": "none"}]
    again = engine.generate(GenerationRequest.from_settings(settings)).images[0].image
    np.testing.assert_array_equal(np.asarray(again), np.asarray(image))


def test_canny_preprocessor_differs_from_the_raw_image(engine, net, hint):
    raw = _gen(engine, controlnets=[{"model": net, "image": hint}])
    edges = _gen(engine, controlnets=[{"model": net, "image": hint, "preprocessor": "canny"}])
    assert not np.array_equal(raw, edges)


def test_bad_controlnet_entries_teach(engine, hint, tmp_path):
    with pytest.raises(InputError, match="end_percent must lie in"):
        ControlNetUnit("x.safetensors", hint, 1.0, 0.0, 2.0)
    with pytest.raises(InputError, match="unknown preprocessor 'depth'"):
        ControlNetUnit("x.safetensors", hint, preprocessor="depth")
    with pytest.raises(InputError, match="each controlnets entry"):
        GenerationRequest("x", controlnets=["just-a-name"])
    with pytest.raises(InputError, match="neither a registered ControlNet name"):
        _gen(engine, controlnets=[(str(tmp_path / "missing.pth"), hint, 1.0)])
    sdxl_net = tiny_controlnet(shared_bundle("sdxl").unet.config)
    with pytest.raises(InputError, match="does not fit the U-Net"):
        _gen(engine, controlnets=[(sdxl_net, hint, 1.0)])
    with pytest.raises(InputError, match="in-memory ControlNet image"):
        GenerationRequest.from_settings(
            GenerationRequest("x", controlnets=[("n", hint)]).settings())


def test_sided_controls_match_one_controlled_unet_when_both_sides_agree(net):
    bundle = shared_bundle("sd1")
    spec = ControlSpec(net, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    cond = encode_conditioning(bundle, PROMPT, NEGATIVE, width=64, height=64)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([3.0, 3.0])
    with torch.inference_mode():
        both = guided_denoiser(bundle, cond, 5.0, controls=[spec])(x, sigma)
        sided = guided_denoiser(bundle, cond, 5.0, controls=[spec],
                                uncond_controls=[spec])(x, sigma)
        split = sided_unet(bundle.unet, [spec], [spec])
        same = controlled_unet(bundle.unet, [spec])
        ctx = torch.cat([cond.cond["context"], cond.uncond["context"]])
        t = torch.tensor([500.0, 500.0])
        side = torch.tensor([1.0, 0.0])
        cond_only = guided_denoiser(bundle, cond, 5.0, controls=[spec], uncond_controls=())
        torch.testing.assert_close(split(x, t, ctx, control_side=side), same(x, t, ctx),
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(cond_only(x, sigma), both)
    torch.testing.assert_close(sided, both)


@pytest.fixture(scope="module")
def loud_engine():
    """An engine with a tiny SD1 model whose cross-attention is amplified, so the prompt (and
    so guidance) moves the result well above float32 rounding."""
    bundle = tiny_bundle("sd1", seed=3)
    with torch.no_grad():
        for name, p in bundle.unet.named_parameters():
            if "attn2.to_v" in name or "attn2.to_out" in name:
                p.mul_(8)
    engine = tiny_engine("sd1")
    engine.register("loud", bundle)
    return engine


@pytest.mark.parametrize("sampler", ["euler_cfg_pp", "dpmpp_2m_cfg_pp"])
def test_cfg_pp_sampler_differs_from_plain_and_matches_a_hand_built_run(loud_engine, sampler):
    def latents(name):
        request = GenerationRequest(PROMPT, negative_prompt=NEGATIVE, model="loud", steps=3,
                                    seed=9, cfg_scale=7.0, sampler=name)
        return loud_engine.generate(request).latents

    cfg_pp = latents(sampler)
    # latents are ~16 in size: float32 rounding is ~1e-5; the samplers differ by far more
    assert (cfg_pp - latents(sampler.removesuffix("_cfg_pp"))).abs().max() > 1e-2

    bundle = loud_engine.runnable(loud_engine.model("loud"))  # as the engine runs it
    with torch.inference_mode():
        cond = encode_conditioning(bundle, PROMPT, NEGATIVE, width=64, height=64)
        sigmas = model_sigmas(bundle, "normal", 3)
        x = seeded_noise(generators_for([9]), (4, 8, 8)) * float(sigmas[0])
        denoiser = cfg_pp_denoiser(bundle.denoiser(), cond.cond, cond.uncond, 7.0)
        hand = sample(sampler, denoiser, x, sigmas)
    assert torch.equal(cfg_pp, hand)


def test_cfg_pp_refuses_guidance_rescale(engine):
    with pytest.raises(InputError, match="guidance_rescale does not apply to the CFG\\+\\+"):
        _gen(engine, sampler="euler_cfg_pp", guidance_rescale=0.5)


def test_a1111_controlnet_units_become_the_request_controlnets(tmp_path, hint):
    import base64
    import io
    from types import SimpleNamespace

    from noisecraft.server.a1111 import _controlnets
    from noisecraft.server.config import Limits
    from noisecraft.server.security import RequestError

    (tmp_path / "models" / "controlnet").mkdir(parents=True)
    model = write_controlnet(tmp_path / "models" / "controlnet" / "control_tiny.safetensors",
                             shared_bundle("sd1").unet.config)
    state = SimpleNamespace(folders=SimpleNamespace(root=tmp_path, input=tmp_path / "input"),
                            config=SimpleNamespace(limits=Limits()))
    buf = io.BytesIO()
    hint.save(buf, format="PNG")
    data = base64.b64encode(buf.getvalue()).decode()
    body = {"alwayson_scripts": {"controlnet": {"args": [
        {"image": data, "module": "canny", "model": "control_tiny [0123abcd]", "weight": 0.7,
         "guidance_start": 0.2, "guidance_end": 0.6},
        {"enabled": False, "image": data, "model": "control_tiny"}]}}}
    (unit,) = _controlnets(state, body)
    assert unit["model"] == str(model) and unit["preprocessor"] == "canny"
    assert (unit["strength"], unit["start_percent"], unit["end_percent"]) == (0.7, 0.2, 0.6)
    assert np.array_equal(np.asarray(Image.open(unit["image"])), np.asarray(hint))
    request = GenerationRequest.from_settings({"prompt": "x", "controlnets": [unit]})
    assert request.controlnets[0] == ControlNetUnit(**unit)
    bad = {"alwayson_scripts": {"controlnet": {"args": [{"image": data, "model": "nope"}]}}}
    with pytest.raises(RequestError, match="unknown ControlNet 'nope'; available: "
                                           "control_tiny.safetensors"):
        _controlnets(state, bad)
    bad["alwayson_scripts"]["controlnet"]["args"][0]["module"] = "depth_midas"
    with pytest.raises(RequestError, match="module 'depth_midas' is not available"):
        _controlnets(state, bad)


def test_cfg_pp_samplers_have_a1111_names():
    from noisecraft.metadata import A1111_SAMPLERS, sampler_from_a1111
    from noisecraft.samplers.cfg_pp import SAMPLERS

    assert set(SAMPLERS) <= set(A1111_SAMPLERS)
    assert sampler_from_a1111("DPM++ 2M CFG++") == ("dpmpp_2m_cfg_pp", None)
    assert sampler_from_a1111("Euler a CFG++") == ("euler_ancestral_cfg_pp", None)
