"""``noisecraft train``: bad data exits with code 2 and the data set's message naming the file."""

from __future__ import annotations

from PIL import Image
from typer.testing import CliRunner

from noisecraft.cli import app
from noisecraft.training.state import load_trained_model

runner = CliRunner()


def _train(data, out, *extra):
    return runner.invoke(app, ["train", str(data), "--out", str(out), *extra])


def test_empty_folder(tmp_path):
    (tmp_path / "data").mkdir()
    result = _train(tmp_path / "data", tmp_path / "run")
    assert result.exit_code == 2
    assert "no images in" in result.output and "data" in result.output


def test_image_without_caption_is_named(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (40, 40), "red").save(data / "a.png")
    (data / "a.txt").write_text("a red square")
    Image.new("RGB", (40, 40), "blue").save(data / "lonely.png")
    result = _train(data, tmp_path / "run")
    assert result.exit_code == 2
    assert "lonely.png" in result.output and "no caption" in result.output


def test_unreadable_image_is_named_before_training(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broken.png").write_bytes(b"not a png at all")
    (data / "broken.txt").write_text("a caption")
    result = _train(data, tmp_path / "run")
    assert result.exit_code == 2
    assert "broken.png" in result.output and "cannot read image" in result.output
    assert not (tmp_path / "run/checkpoints").exists()


def test_bad_option_is_explained(tmp_path):
    result = _train("shapes", tmp_path / "run", "--objective", "x0")
    assert result.exit_code == 2 and "'eps', 'v'" in result.output


def test_trains_on_a_folder(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, colour in (("r", "red"), ("g", "green")):
        Image.new("RGB", (48, 40), colour).save(data / f"{name}.png")
        (data / f"{name}.txt").write_text(f"a {colour} image")
    result = _train(data, tmp_path / "run", "--steps", "1", "--batch-size", "2",
                    "--resolution", "32", "--objective", "v", "--min-snr", "5",
                    "--sample-every", "0")
    assert result.exit_code == 0, result.output
    bundle = load_trained_model(tmp_path / "run/model.safetensors")
    assert bundle.family.prediction == "v" and bundle.vae is None
