"""AUTOMATIC1111's "Negative Guidance minimum sigma" (NGMS): the guidance wrapper, the request,
the engine (txt2img, hires fix, img2img, inpaint) and the CLI flags."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from noisecraft.cli import app
from noisecraft.guidance import NO_SKIP, SkipUncond, cfg_denoiser
from noisecraft.metadata import read_settings
from noisecraft.request import GenerationRequest, InputError
from tests.pipelines.tiny import tiny_engine

COND = {"context": torch.full((1, 2, 3), 1.0)}
UNCOND = {"context": torch.full((1, 2, 3), -1.0)}


class Counting:
    """A denoiser ``(x, sigma, cond) -> x0`` that records the batch size of every call."""

    def __init__(self):
        self.batches: list[int] = []

    def __call__(self, x, sigma, cond):
        self.batches.append(x.shape[0])
        c = cond["context"].mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return 0.8 * x + 0.3 * c + 0.01 * sigma.view(-1, 1, 1, 1) * x


def _x(batch=2):
    return torch.randn(batch, 4, 3, 3, generator=torch.Generator().manual_seed(0))


def test_below_the_threshold_the_call_is_the_conditional_pass_alone():
    x = _x()
    for sigma in (0.5, 0.999):
        counting = Counting()
        guided = cfg_denoiser(counting, COND, UNCOND, 7.0, 0.7, SkipUncond(1.0, all_steps=True))
        want = Counting()(x, torch.full((2,), sigma), {"context": COND["context"].expand(2, 2, 3)})
        assert torch.equal(guided(x, sigma), want)
        assert counting.batches == [2]  # one pass of B, not 2B


def test_at_and_above_the_threshold_it_is_plain_cfg():
    x = _x()
    for sigma in (1.0, 3.0):  # strictly below skips: sigma == threshold does not
        counting = Counting()
        guided = cfg_denoiser(counting, COND, UNCOND, 7.0, 0.7, SkipUncond(1.0, all_steps=True))
        plain = cfg_denoiser(Counting(), COND, UNCOND, 7.0, 0.7)
        assert torch.equal(guided(x, sigma), plain(x, sigma))
        assert counting.batches == [4]


def test_by_default_every_other_call_below_the_threshold_skips_as_a1111():
    """A1111 skips when ``self.step % 2`` (its call counter) unless ``s_min_uncond_all``."""
    sigmas = [3.0, 2.0, 0.9, 0.7, 0.5, 0.3, 0.1]
    for all_steps, want in ((False, [4, 4, 4, 2, 4, 2, 4]), (True, [4, 4, 2, 2, 2, 2, 2])):
        counting = Counting()
        guided = cfg_denoiser(counting, COND, UNCOND, 5.0, skip=SkipUncond(1.0, all_steps))
        for s in sigmas:
            guided(_x(), s)
        assert counting.batches == want
    counting = Counting()
    guided = cfg_denoiser(counting, COND, UNCOND, 5.0, skip=NO_SKIP)
    for s in sigmas:
        guided(_x(), s)
    assert counting.batches == [4] * len(sigmas)


def test_bad_thresholds_are_refused_with_what_is_allowed():
    for value in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="must be a finite number >= 0"):
            SkipUncond(value)
    for value in (-1, "2", float("inf"), True):
        with pytest.raises(InputError, match=r"uncond_min_sigma \(A1111's NGMS.*>= 0"):
            GenerationRequest("x", uncond_min_sigma=value)
    with pytest.raises(InputError, match="uncond_min_sigma_all_steps must be true or false"):
        GenerationRequest("x", uncond_min_sigma=1.0, uncond_min_sigma_all_steps="yes")
    assert GenerationRequest("x", uncond_min_sigma=2).uncond_min_sigma == 2.0


def test_cfg_pp_samplers_refuse_ngms():
    engine = tiny_engine("sd1")
    with pytest.raises(InputError, match=r"NGMS\) does not apply to the CFG\+\+ sampler"):
        engine.generate(GenerationRequest("x", model="sd1", steps=2, sampler="euler_cfg_pp",
                                          uncond_min_sigma=1.0))


# ---- generations with a tiny random model ---------------------------------------------------

@pytest.fixture(scope="module")
def engine():
    return tiny_engine("sd1", "sd1-inpaint")


def _run(engine, **kw):
    """(final latents, per-step latents, U-Net batch sizes) of one generation."""
    unet = engine.runnable(engine.model(kw.get("model", "sd1"))).unet
    batches, steps = [], []
    hook = unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    try:
        args = {"prompt": "a red circle", "negative_prompt": "blue", "model": "sd1",
                "steps": 4, "seed": 3, "width": 64, "height": 64, **kw}
        result = engine.generate(GenerationRequest(**args),
                                 callback=lambda e: steps.append((e.sigma, e.x.clone())))
    finally:
        hook.remove()
    return result.latents, steps, batches


def test_default_and_thresholds_below_every_sigma_change_nothing(engine):
    plain, plain_steps, plain_batches = _run(engine)
    last = min(s for s, _ in plain_steps)
    for kw in ({"uncond_min_sigma": 0.0, "uncond_min_sigma_all_steps": True},
               {"uncond_min_sigma": last, "uncond_min_sigma_all_steps": True}):  # not < itself
        latents, _, batches = _run(engine, **kw)
        assert torch.equal(latents, plain), kw
        assert batches == plain_batches == [2] * 4


def test_ngms_changes_only_the_steps_below_it(engine):
    plain, plain_steps, _ = _run(engine)
    sigmas = [s for s, _ in plain_steps]
    threshold = (sigmas[1] + sigmas[2]) / 2  # calls 2 and 3 (0-based) are below it
    for all_steps, want in ((True, [2, 2, 1, 1]), (False, [2, 2, 2, 1])):
        latents, steps, batches = _run(engine, uncond_min_sigma=threshold,
                                       uncond_min_sigma_all_steps=all_steps)
        assert batches == want
        first = want.index(1)
        for i, ((_, x), (_, x_plain)) in enumerate(zip(steps, plain_steps, strict=True)):
            assert torch.equal(x, x_plain) == (i < first), (all_steps, i)
        assert not torch.equal(latents, plain)


def test_above_every_sigma_on_all_steps_it_is_cfg_scale_1(engine):
    latents, _, batches = _run(engine, uncond_min_sigma=1e4, uncond_min_sigma_all_steps=True)
    cfg1, _, cfg1_batches = _run(engine, cfg_scale=1.0)
    assert torch.equal(latents, cfg1) and batches == cfg1_batches == [1] * 4


def test_hires_img2img_and_inpaint_passes_skip_too(engine, tmp_path):
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(init)
    mask = tmp_path / "mask.png"
    m = Image.new("L", (64, 64), 0)
    m.paste(255, (16, 16, 48, 48))
    m.save(mask)
    cases = {
        "hires": {"steps": 2, "hires_scale": 1.5, "hires_steps": 2, "hires_strength": 0.5},
        "img2img": {"steps": 3, "init_image": init, "strength": 0.7},
        "inpaint": {"steps": 3, "init_image": init, "mask": mask, "strength": 0.9},
        "inpaint model": {"steps": 2, "init_image": init, "mask": mask, "model": "sd1-inpaint"},
    }
    for name, kw in cases.items():
        plain, _, plain_batches = _run(engine, **kw)
        latents, _, batches = _run(engine, uncond_min_sigma=1e4,
                                   uncond_min_sigma_all_steps=True, **kw)
        assert set(plain_batches) == {2} and set(batches) == {1}, name
        assert len(batches) == len(plain_batches) and not torch.equal(latents, plain), name


def test_settings_carry_ngms_and_cli_flags_round_trip(engine, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"

    def cli(*args):
        return CliRunner().invoke(app, ["generate", *map(str, args)], obj={"engine": engine})

    r = cli("a red circle", "-m", "sd1", "--steps", 2, "--seed", 2, "-n", "blue",
            "--ngms", 5, "--ngms-all-steps", "-o", a)
    assert r.exit_code == 0, r.output
    settings = read_settings(a)
    assert settings["uncond_min_sigma"] == 5.0 and settings["uncond_min_sigma_all_steps"]
    with Image.open(a) as im:
        assert "NGMS: 5.0, NGMS all steps: True" in im.text["parameters"]
    r = cli("--from", a, "-o", b)
    assert r.exit_code == 0, r.output
    with Image.open(a) as im_a, Image.open(b) as im_b:
        assert im_a.tobytes() == im_b.tobytes()
    r = cli("x", "-m", "sd1", "--ngms", -1, "-o", tmp_path / "c.png")
    assert r.exit_code == 2 and "must be a finite number >= 0" in r.output
