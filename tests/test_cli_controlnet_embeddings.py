"""`noisecraft generate --controlnet MODEL:IMAGE[:STRENGTH]` (repeatable) and `--embeddings
DIR`: the CLI gives what generate_image gives with the same settings; a bad spec exits 2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from noisecraft.api import generate_image
from noisecraft.cli import app
from tests.fixtures.controlnet import write_controlnet
from tests.pipelines.tiny import tiny_engine


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return tiny_engine("sd1")


def run(engine, *args):
    return CliRunner().invoke(app, ["generate", *map(str, args)], obj={"engine": engine})


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


SETTINGS = dict(steps=2, seed=4, width=64, height=64)
FLAGS = ("-m", "sd1", "--steps", 2, "--seed", 4, "-W", 64, "-H", 64)


@pytest.mark.parametrize("spec", ["only-a-model.safetensors", "cn.safetensors:hint.png:strong",
                                  ":hint.png", "a:b:0.5:c"])
def test_bad_controlnet_spec_exits_2_and_says_the_form(engine, tmp_path, spec):
    r = run(engine, "a cat", *FLAGS, "--controlnet", spec, "-o", tmp_path / "x.png")
    assert r.exit_code == 2, r.output
    assert "MODEL:IMAGE[:STRENGTH]" in r.output and not (tmp_path / "x.png").exists()


def test_controlnets_equal_generate_image(engine, tmp_path):
    unet = engine.model("sd1").unet.config
    cn_a = write_controlnet(tmp_path / "a.safetensors", unet, seed=1)
    cn_b = write_controlnet(tmp_path / "b.safetensors", unet, seed=2)
    hint = tmp_path / "hint.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), np.uint8)).save(hint)
    out = tmp_path / "cn.png"
    r = run(engine, "a cat", *FLAGS, "--controlnet", f"{cn_a}:{hint}:0.7",
            "--controlnet", f"{cn_b}:{hint}", "-o", out)
    assert r.exit_code == 0, r.output
    want = generate_image("a cat", model="sd1", engine=engine, **SETTINGS,
                          controlnets=[(str(cn_a), str(hint), 0.7), (str(cn_b), str(hint))])
    np.testing.assert_array_equal(pixels(out), np.asarray(want))
    plain = generate_image("a cat", model="sd1", engine=engine, **SETTINGS)
    assert not np.array_equal(np.asarray(plain), np.asarray(want))


def test_embeddings_folder(engine, tmp_path):
    encoder = engine.model("sd1").text_encoder
    (red,) = encoder.tokenizer.encode("red")
    vector = encoder.text_model.embeddings.token_embedding.weight[red].detach().clone()
    folder = tmp_path / "emb"
    folder.mkdir()
    save_file({"emb_params": vector[None].contiguous()}, str(folder / "crimson.safetensors"))
    out = tmp_path / "e.png"
    r = run(engine, "a embedding:crimson cat", *FLAGS, "--embeddings", folder, "-o", out)
    assert r.exit_code == 0, r.output
    want = generate_image("a red cat", model="sd1", engine=engine, **SETTINGS)
    np.testing.assert_array_equal(pixels(out), np.asarray(want))
    r = run(engine, "a embedding:nope cat", *FLAGS, "--embeddings", folder, "-o", out)
    assert r.exit_code == 2 and "'nope', which is not in the embeddings folder" in r.output
