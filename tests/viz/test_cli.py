"""``noisecraft noise`` and ``noisecraft toy``: files written, exit code 2 on bad input."""

from __future__ import annotations

import pytest
from PIL import Image
from typer.testing import CliRunner

from noisecraft.cli import app
from tests.viz.test_plots import assert_png
from tests.viz.test_strip import make_image

runner = CliRunner()


def flat(output: str) -> str:
    """CLI output with rich's error-box borders removed and whitespace collapsed."""
    return " ".join(output.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "in.png"
    make_image(40, 30).save(path)
    return path


def test_noise_writes_strip_and_default_plot(tmp_path, image_path):
    out = tmp_path / "strip.png"
    r = runner.invoke(app, ["noise", str(image_path), "-o", str(out), "--steps", "5"])
    assert r.exit_code == 0, r.output
    assert_png(out, min_size=(5 * 40, 30))
    with Image.open(out) as im:
        assert im.size == (5 * 40 + 4 * 4, 30 + 18)
    assert_png(tmp_path / "strip_schedule.png")


def test_noise_with_explicit_plot_and_schedule(tmp_path, image_path):
    out, plot = tmp_path / "a.png", tmp_path / "plots" / "cos.png"
    args = ["noise", str(image_path), "-o", str(out), "--schedule", "cosine", "--plot", str(plot)]
    r = runner.invoke(app, args + ["--seed", "7"])
    assert r.exit_code == 0, r.output
    assert_png(out, min_size=(8 * 40, 30)) and assert_png(plot)
    assert not (tmp_path / "a_schedule.png").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--schedule", "quadratic"], "unknown schedule 'quadratic'"),
        (["--steps", "1"], "between 2 and 64"),
        (["--plot", "p.jpg"], "ending in .png"),
    ],
)
def test_noise_bad_arguments_exit_2(tmp_path, image_path, extra, message):
    r = runner.invoke(app, ["noise", str(image_path), "-o", str(tmp_path / "s.png")] + extra)
    assert r.exit_code == 2
    assert message in flat(r.output)
    assert not (tmp_path / "s.png").exists()


def test_noise_unreadable_image_exit_2(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    r = runner.invoke(app, ["noise", str(bad), "-o", str(tmp_path / "s.png")])
    assert r.exit_code == 2 and "cannot read" in flat(r.output)
    r = runner.invoke(app, ["noise", str(tmp_path / "missing.png"), "-o", str(tmp_path / "s.png")])
    assert r.exit_code == 2 and "does not exist" in flat(r.output)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data", "circles"], "unknown toy data set 'circles'"),
        (["--sampler", "nope"], "unknown sampler 'nope'"),
        (["--train-steps", "0"], "train_steps must be >= 1"),
        (["-o", "toy.gif"], "ending in .png"),
    ],
)
def test_toy_bad_arguments_exit_2(tmp_path, extra, message):
    r = runner.invoke(app, ["toy", "-o", str(tmp_path / "toy.png")] + extra)
    assert r.exit_code == 2
    assert message in flat(r.output)


def test_toy_eight_writes_picture(tmp_path):
    out = tmp_path / "eight.png"
    args = ["toy", "--data", "eight", "--train-steps", "150", "--steps", "10", "-o", str(out)]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    assert "sample mean" in r.output
    assert_png(out)
