"""diffusers' ``leading`` spacing with ``steps_offset`` as a request field: the default is the
model family's (1 for SD, read from a diffusers folder's scheduler config), images record the
offset they used, and misuse is refused with a message.  (Parity with diffusers' Euler and
DDIM schedulers: tests/parity/test_pipeline_parity.py.)"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from noisecraft import generate_image
from noisecraft.cli import app
from noisecraft.metadata import read_settings
from noisecraft.models.family import FAMILIES
from noisecraft.pipelines.common import model_sigmas
from noisecraft.request import GenerationRequest, InputError
from noisecraft.schedules import build_sigmas
from tests.pipelines.tiny import shared_bundle, tiny_engine


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("sd1")


def test_family_default_and_explicit_offsets_give_diffusers_timesteps():
    bundle = shared_bundle("sd1")
    assert FAMILIES["sd1"].steps_offset == FAMILIES["sdxl"].steps_offset == 1
    default = model_sigmas(bundle, "leading", 10)
    torch.testing.assert_close(default, build_sigmas(10, spacing="leading", steps_offset=1))
    torch.testing.assert_close(model_sigmas(bundle, "leading", 10, 0),
                               build_sigmas(10, spacing="leading", steps_offset=0))
    assert not torch.equal(default, model_sigmas(bundle, "leading", 10, 0))
    zero = replace(bundle, family=replace(bundle.family, steps_offset=0))
    torch.testing.assert_close(model_sigmas(zero, "leading", 10), model_sigmas(bundle, "leading",
                                                                               10, 0))


def test_generate_image_records_the_offset_used(engine):
    common = dict(model="sd1", steps=2, seed=3, scheduler="leading", engine=engine)
    default = generate_image("x", **common)
    one = generate_image("x", steps_offset=1, **common)
    zero = generate_image("x", steps_offset=0, **common)
    assert json.loads(default.info["noisecraft"])["steps_offset"] == 1
    assert json.loads(zero.info["noisecraft"])["steps_offset"] == 0
    assert default.tobytes() == one.tobytes() != zero.tobytes()
    other = generate_image("x", model="sd1", steps=2, seed=3, scheduler="karras", engine=engine)
    assert json.loads(other.info["noisecraft"])["steps_offset"] is None


def test_cli_steps_offset_and_from(engine, tmp_path):
    def run(*args):
        return CliRunner().invoke(app, ["generate", *map(str, args)], obj={"engine": engine})

    a, b = tmp_path / "a.png", tmp_path / "b.png"
    r = run("x", "-m", "sd1", "--steps", 2, "--seed", 3, "--scheduler", "leading",
            "--steps-offset", 0, "-o", a)
    assert r.exit_code == 0, r.output
    assert read_settings(a)["steps_offset"] == 0
    assert run("--from", a, "-o", b).exit_code == 0
    assert read_settings(b) == read_settings(a)
    r = run("x", "-m", "sd1", "--steps", 2, "--steps-offset", 1, "-o", tmp_path / "c.png")
    assert r.exit_code == 2 and "scheduler='leading' only" in r.output


@pytest.mark.parametrize("kwargs,message", [
    ({"scheduler": "karras", "steps_offset": 1}, "applies to scheduler='leading' only"),
    ({"scheduler": "leading", "steps_offset": -1}, "whole number >= 0"),
    ({"scheduler": "leading", "steps_offset": True}, "whole number >= 0"),
    ({"scheduler": "leading", "steps_offset": 1.0}, "whole number >= 0"),
])
def test_bad_offsets_are_refused(kwargs, message):
    with pytest.raises(InputError, match=message):
        GenerationRequest("x", **kwargs)


def test_an_offset_past_the_last_timestep_is_refused(engine):
    with pytest.raises(ValueError, match="starts at timestep 1000, past the schedule's last "
                                         "timestep 999"):
        build_sigmas(1000, spacing="leading", steps_offset=1)
    request = GenerationRequest("x", model="sd1", steps=1, scheduler="leading", steps_offset=999)
    assert engine.generate(request).request.steps_offset == 999  # timestep 999: still valid
    with pytest.raises(InputError, match="use fewer steps or a smaller steps_offset"):
        engine.generate(replace(request, steps_offset=1000))
