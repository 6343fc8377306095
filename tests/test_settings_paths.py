"""``noisecraft generate --from IMAGE.png`` with relative paths in the saved settings: found in
the current folder, else in the image's folder, else an error naming both places tried."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from noisecraft.cli import app
from noisecraft.metadata import read_settings
from noisecraft.request import InputError
from noisecraft.settings_paths import resolve_settings_paths
from tests.pipelines.tiny import tiny_engine


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("sd1")


def run(engine, *args):
    return CliRunner().invoke(app, ["generate", *map(str, args)], obj={"engine": engine})


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture
def made(engine, tmp_path, monkeypatch):
    """An inpainted image made in ``work/`` from inputs given by relative paths, as a user
    with the inputs beside the output would; the test then runs from ``elsewhere/``."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), np.uint8)).save(work / "in.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 16:48] = 255
    Image.fromarray(mask).save(work / "mask.png")
    monkeypatch.chdir(work)
    r = run(engine, "a cat", "-m", "sd1", "--steps", 3, "--seed", 2, "--init", "in.png",
            "--mask", "mask.png", "--strength", 0.6, "-o", "a.png")
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(elsewhere)
    return work, elsewhere


def test_inputs_beside_the_image_are_found_from_another_folder(engine, made):
    work, elsewhere = made
    settings = read_settings(work / "a.png")
    assert (settings["init_image"], settings["mask"]) == ("in.png", "mask.png")
    r = run(engine, "--from", os.path.join("..", "work", "a.png"), "-o", "b.png")
    assert r.exit_code == 0, r.output
    assert np.array_equal(pixels(work / "a.png"), pixels(elsewhere / "b.png"))
    again = read_settings(elsewhere / "b.png")
    assert again["init_image"] == os.path.join("..", "work", "in.png")
    assert again["mask"] == os.path.join("..", "work", "mask.png")


def test_paths_found_in_the_current_folder_are_kept_as_they_are(engine, made, monkeypatch):
    work, _ = made
    monkeypatch.chdir(work)
    r = run(engine, "--from", "a.png", "-o", "b.png")
    assert r.exit_code == 0, r.output
    assert read_settings(work / "b.png") == read_settings(work / "a.png")
    assert np.array_equal(pixels(work / "a.png"), pixels(work / "b.png"))


def test_a_missing_input_names_both_places_tried(engine, made):
    work, elsewhere = made
    (work / "mask.png").rename(work / "moved.png")
    r = run(engine, "--from", work / "a.png", "-o", "b.png")
    assert r.exit_code == 2, r.output
    message = " ".join(r.output.split())  # the error may be wrapped
    assert "mask 'mask.png'" in message
    assert str(elsewhere / "mask.png") in message and str(work / "mask.png") in message
    assert not (elsewhere / "b.png").exists()


def test_a_relative_model_file_beside_the_image(tmp_path, monkeypatch):
    """The real loader path: ``-m tiny.safetensors`` given relative to the image's folder."""
    from noisecraft.engine import Engine
    from tests.fixtures.checkpoints import write_single_file

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    write_single_file(work / "tiny.safetensors", "sd1")
    engine = Engine(device="cpu")
    monkeypatch.chdir(work)
    r = run(engine, "x", "-m", "tiny.safetensors", "-W", 32, "-H", 32, "--steps", 2,
            "--seed", 1, "-o", "a.png")
    assert r.exit_code == 0, r.output
    monkeypatch.chdir(elsewhere)
    r = run(engine, "--from", work / "a.png", "-o", "b.png")
    assert r.exit_code == 0, r.output
    assert read_settings(elsewhere / "b.png")["model"] == str(work / "tiny.safetensors")
    assert np.array_equal(pixels(work / "a.png"), pixels(elsewhere / "b.png"))
    assert len(engine.cached_models) == 1  # the same file both times

    (work / "tiny.safetensors").rename(elsewhere / "renamed.safetensors")
    r = run(engine, "--from", work / "a.png", "-o", "c.png")
    assert r.exit_code == 2 and "model 'tiny.safetensors'" in r.output
    assert "-m" in r.output
    r = run(engine, "--from", work / "a.png", "-m", "renamed.safetensors", "-o", "c.png")
    assert r.exit_code == 0, r.output  # -m replaces the missing model; it is not looked up


def test_resolve_settings_paths_rules(tmp_path, monkeypatch):
    image = tmp_path / "out" / "a.png"
    (tmp_path / "out" / "loras").mkdir(parents=True)
    for name in ("cn.safetensors", "edges.png", "loras/style.safetensors", "b.safetensors"):
        (tmp_path / "out" / name).write_bytes(b"x")
    (tmp_path / "here.png").write_bytes(b"x")
    monkeypatch.chdir(tmp_path)
    absolute = str(tmp_path / "nowhere" / "x.png")
    settings = {
        "init_image": "here.png", "mask": absolute, "model": "registered", "loras_dir": "loras",
        "controlnets": [{"model": "cn.safetensors", "image": "edges.png"},
                        {"model": "known-cn", "image": "<image>"}],
        "loras": [["b.safetensors", 1.0, 1.0], ["style", 0.5, 0.5]],
        "embeddings_dir": None, "prompt": "edges.png",
    }
    out = resolve_settings_paths(settings, image, names=("registered", "known-cn"))
    beside = tmp_path / "out"
    assert out["init_image"] == "here.png"  # found in the current folder: unchanged
    assert out["mask"] == absolute  # absolute: left to the image loader's own error
    assert out["model"] == "registered" and out["prompt"] == "edges.png"
    assert out["loras_dir"] == str(beside / "loras")
    assert out["controlnets"] == [
        {"model": str(beside / "cn.safetensors"), "image": str(beside / "edges.png")},
        {"model": "known-cn", "image": "<image>"}]
    # a file beside the image, and a name to look up in loras_dir (not a file anywhere)
    assert out["loras"] == [[str(beside / "b.safetensors"), 1.0, 1.0], ["style", 0.5, 0.5]]
    assert settings["init_image"] == "here.png" and settings["loras_dir"] == "loras"

    with pytest.raises(InputError, match=r"LoRA 'style' in the settings of .* neither place"):
        resolve_settings_paths({**settings, "loras_dir": None}, image, names=("registered",
                                                                              "known-cn"))
    with pytest.raises(InputError, match=r"ControlNet model 'known-cn'"):
        resolve_settings_paths(settings, image, names=("registered",))
    assert resolve_settings_paths({"model": "gone.safetensors"}, image,
                                  skip=("model",)) == {"model": "gone.safetensors"}
