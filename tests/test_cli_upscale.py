"""`noisecraft upscale`: the SD-upscale pipeline from the command line; bad input exits 2."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from noisecraft import sd_upscale_image
from noisecraft.cli import app
from noisecraft.metadata import read_settings
from tests.pipelines.tiny import tiny_engine


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("sd1")


def run(engine, *args):
    return CliRunner().invoke(app, ["upscale", *map(str, args)], obj={"engine": engine})


@pytest.fixture
def source(tmp_path):
    yy, xx = np.mgrid[0:16, 0:32]
    path = tmp_path / "in.png"
    Image.fromarray(np.stack([xx * 8, yy * 16, (xx + yy) * 5], -1).astype(np.uint8)).save(path)
    return path


def test_upscale_writes_the_pipeline_image_with_metadata(engine, source, tmp_path):
    out = tmp_path / "out.png"
    r = run(engine, source, "-o", out, "-m", "sd1", "-p", "a red cat", "--scale", 2,
            "--overlap", 16, "--strength", 0.5, "--steps", 2, "--seed", 7)
    assert r.exit_code == 0, r.output
    assert "64x32  seed 7" in r.output
    with Image.open(out) as im:
        got, text = np.asarray(im.convert("RGB")), im.text["parameters"]
    assert got.shape == (32, 64, 3)
    # the tile defaults to the model's native size (64 px for the tiny model)
    assert "Size: 64x64" in text and "SD upscale overlap: 16" in text
    assert read_settings(out)["sd_upscale"]["upscaler"] == "lanczos"
    want = sd_upscale_image(source, "a red cat", model="sd1", scale=2, overlap=16,
                            strength=0.5, steps=2, seed=7, engine=engine)
    assert np.array_equal(got, np.asarray(want))


@pytest.mark.parametrize("args,message", [
    (["MISSING"], "missing.png does not exist"),
    (["IN", "--scale", 0], "scale must be a number > 0"),
    (["IN", "--scale", "-1.5"], "scale must be a number > 0"),
    (["IN", "--tile", 32, "--overlap", 32], "tile (32) must be larger than overlap (32)"),
    (["IN", "--overlap", 12], "overlap must be a multiple of 8"),
    (["IN", "--upscaler", "nope.pth", "--overlap", 16], "upscale model nope.pth does not exist"),
    (["IN", "--scale", "big"], "Invalid value for '--scale'"),
])
def test_bad_input_exits_2_with_a_message(engine, source, tmp_path, args, message):
    names = {"IN": source, "MISSING": tmp_path / "missing.png"}
    args = [names.get(a, a) for a in args]
    r = run(engine, *args, "-m", "sd1", "--steps", 1, "-o", tmp_path / "o.png")
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert "Traceback" not in r.output
    assert not (tmp_path / "o.png").exists()


def test_generate_from_an_sd_upscaled_image_reruns_the_sd_upscale(engine, source, tmp_path):
    """``generate --from`` re-creates an SD-upscaled PNG bit for bit (the tiled run, with the
    input image found beside the output when run from another folder), not a plain img2img."""
    out = tmp_path / "out.png"
    r = run(engine, source, "-o", out, "-m", "sd1", "-p", "a red cat", "--scale", 2,
            "--tile", 32, "--overlap", 16, "--strength", 0.5, "--steps", 2, "--seed", 7)
    assert r.exit_code == 0, r.output
    again = tmp_path / "again.png"
    r = CliRunner().invoke(app, ["generate", "--from", str(out), "-o", str(again)],
                           obj={"engine": engine})
    assert r.exit_code == 0, r.output
    with Image.open(out) as a, Image.open(again) as b:
        assert b.size == (64, 32)
        assert np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))
        assert a.text["parameters"] == b.text["parameters"]
