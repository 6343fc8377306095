"""`noisecraft generate`: outputs, metadata, --from bit for bit, --gif, --preview, exit codes."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from noisecraft.cli import app
from noisecraft.metadata import read_settings
from tests.pipelines.tiny import tiny_engine


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("sd1")


def run(engine, *args):
    return CliRunner().invoke(app, ["generate", *map(str, args)], obj={"engine": engine})


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_generate_writes_png_with_metadata_gif_and_preview(engine, tmp_path):
    out = tmp_path / "a.png"
    r = run(engine, "a red circle", "-m", "sd1", "--steps", 3, "--seed", 5, "-n", "blurry",
            "--sampler", "euler_ancestral", "--scheduler", "karras", "-o", out,
            "--gif", tmp_path / "a.gif", "--preview", tmp_path / "prev")
    assert r.exit_code == 0, r.output
    assert "seed 5" in r.output
    settings = read_settings(out)
    assert settings["seed"] == 5 and settings["sampler"] == "euler_ancestral"
    with Image.open(out) as im:
        params = im.text["parameters"]
    assert "Negative prompt: blurry" in params and "Sampler: Euler a" in params
    with Image.open(tmp_path / "a.gif") as gif:
        assert gif.n_frames == 3 and gif.size == (64, 64)
    assert (tmp_path / "prev" / "preview.png").is_file()


def test_from_recreates_the_image_bit_for_bit(engine, tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    init = tmp_path / "init.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(init)
    r = run(engine, "a (cat:1.3)", "-m", "sd1", "--steps", 4, "--init", init,
            "--strength", 0.5, "--sampler", "dpmpp_2m", "-o", a)
    assert r.exit_code == 0, r.output
    r = run(engine, "--from", a, "-o", b)
    assert r.exit_code == 0, r.output
    assert np.array_equal(pixels(a), pixels(b))
    assert read_settings(a) == read_settings(b)


def test_batch_writes_numbered_files(engine, tmp_path):
    r = run(engine, "x", "-m", "sd1", "--steps", 2, "--seed", 9, "--batch", 2,
            "-o", tmp_path / "o.png")
    assert r.exit_code == 0, r.output
    assert read_settings(tmp_path / "o-0.png")["seed"] == 9
    assert read_settings(tmp_path / "o-1.png")["seed"] == 10


@pytest.mark.parametrize("args,message", [
    (["-W", 60], "width=60 is not a multiple of 8; nearest valid sizes: 56 or 64"),
    (["--sampler", "nope"], "unknown sampler 'nope'"),
    (["-m", "missing.safetensors"], "neither a registered model name"),
    (["--init", "IMG", "--mask", "SMALLMASK"], "must be the same size"),
    (["--init", "BAD"], "cannot read init image"),
    (["--init", "FLOAT"], "unsupported mode"),
    (["--outpaint", "1,2"], "--outpaint takes"),
])
def test_bad_input_exits_2_with_a_message(engine, tmp_path, args, message):
    Image.new("RGB", (64, 64)).save(tmp_path / "img.png")
    Image.new("L", (32, 32)).save(tmp_path / "small.png")
    Image.new("F", (64, 64)).save(tmp_path / "float.tif")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    names = {"IMG": "img.png", "SMALLMASK": "small.png", "BAD": "bad.png", "FLOAT": "float.tif"}
    args = [str(tmp_path / names[a]) if a in names else a for a in args]
    if "-m" not in args:
        args = ["-m", "sd1", *args]
    r = run(engine, "x", "--steps", 1, "-o", tmp_path / "o.png", *args)
    assert r.exit_code == 2, r.output
    assert message in r.output
    assert not (tmp_path / "o.png").exists()


def test_prompt_or_from_is_required(engine, tmp_path):
    r = run(engine, "-o", tmp_path / "o.png")
    assert r.exit_code == 2 and "give a PROMPT" in r.output


def test_generate_from_a_checkpoint_file(tmp_path):
    """The real loader path: a tiny single-file checkpoint in the original layout."""
    from noisecraft.engine import Engine
    from tests.fixtures.checkpoints import write_single_file

    ckpt = write_single_file(tmp_path / "tiny.safetensors", "sd1")
    engine = Engine(device="cpu")
    for name in ("a.png", "b.png"):
        r = run(engine, "x", "-m", ckpt, "-W", 32, "-H", 32, "--steps", 2, "--seed", 1,
                "-o", tmp_path / name)
        assert r.exit_code == 0, r.output
    assert len(engine.cached_models) == 1  # loaded once, reused
    settings = read_settings(tmp_path / "a.png")
    assert settings["model"] == str(ckpt) and len(settings["model_hash"]) == 10
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
    assert pixels(tmp_path / "a.png").shape == (32, 32, 3)
