"""SD upscale on a tiny SD1 checkpoint: output size, every tile an ordinary engine img2img, and
the tiles cross-faded (no tile edge shows as a hard step) against a hard-pasted reference;
``sd_upscale_image`` (the Python API) is the pipeline plus A1111 metadata."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft import sd_upscale_image
from noisecraft.engine import Engine
from noisecraft.pipelines.sd_upscale import sd_upscale, upscale_image
from noisecraft.request import GenerationRequest, InputError
from tests.fixtures.checkpoints import write_single_file


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    path = write_single_file(tmp_path_factory.mktemp("ckpt") / "sd1.safetensors", "sd1")
    yy, xx = np.mgrid[0:16, 0:32]
    source = Image.fromarray(np.stack([xx * 8, yy * 16, (xx + yy) * 5], -1).astype(np.uint8))
    request = GenerationRequest(prompt="a red cat", model=str(path), init_image=source,
                                strength=0.5, steps=2, seed=3)
    return Engine(device="cpu"), request


def _tile(engine, request, big, x, seed):
    part = big.crop((x, 0, x + 32, 32))
    out = engine.generate(replace(request, init_image=part, width=32, height=32, seed=seed))
    return np.asarray(out.images[0].image, np.float32)


def test_tiles_are_engine_img2img_runs_cross_faded(setup):
    engine, request = setup
    out = sd_upscale(engine, request, scale=2, tile=32, overlap=16)  # x tiles at 0, 16, 32
    assert out.image.size == (64, 32) and out.seed == 3
    o = np.asarray(out.image, np.float32)
    big = upscale_image(request.init_image, 2)
    # tile k uses seed 3 + k (A1111's SD upscale, batch size 1)
    a, b, c = (_tile(engine, request, big, x, 3 + k) for k, x in enumerate((0, 16, 32)))
    # outer quarter of an overlap (4 px) has weight 0: where tile b starts, only tile a shows
    np.testing.assert_allclose(o[:, 16:20], a[:, 16:20], atol=0.5)
    np.testing.assert_allclose(o[:, 0:16], a[:, 0:16], atol=0.5)
    np.testing.assert_allclose(o[:, 60:], c[:, 28:], atol=0.5)
    # then a linear cross-fade: weight of b = (i - 3) / 9 at overlap column i (0..15)
    for i in range(4, 12):
        wb = (i - 3) / 9
        want = (1 - wb) * a[:, 16 + i] + wb * b[:, i]
        np.testing.assert_allclose(o[:, 16 + i], want, atol=0.51)
    # every step across a tile's first or last column is a step inside one tile's own output
    # (the other tile has weight 0 there); a hard paste (no overlap: two tiles) instead puts
    # two different tiles' pixels side by side at column 32
    for col, own in ((16, a[:, 16] - a[:, 15]), (32, b[:, 16] - b[:, 15]),
                     (48, c[:, 16] - c[:, 15])):
        np.testing.assert_allclose(o[:, col] - o[:, col - 1], own, atol=1.0)
    hard = np.asarray(sd_upscale(engine, request, scale=2, tile=32, overlap=0).image, np.float32)
    second = _tile(engine, request, big, 32, 4)  # without overlap, x = 32 is tile 1: seed 4
    np.testing.assert_allclose(hard, np.concatenate([a, second], axis=1), atol=0.5)
    assert np.abs((hard[:, 32] - hard[:, 31]) - (o[:, 32] - o[:, 31])).max() > 5


def test_bad_settings_teach(setup):
    engine, request = setup
    with pytest.raises(InputError, match="tile .32. must be larger than overlap .32."):
        sd_upscale(engine, request, tile=32, overlap=32)
    with pytest.raises(InputError, match="overlap must be a multiple of 8"):
        sd_upscale(engine, request, tile=32, overlap=12)
    with pytest.raises(InputError, match="needs an init_image"):
        sd_upscale(engine, replace(request, init_image=None))
    with pytest.raises(InputError, match="does not exist"):
        sd_upscale(engine, request, upscaler="/nonexistent/4x.pth")
    with pytest.raises(InputError, match="scale must be a number > 0"):
        sd_upscale(engine, request, scale=0, tile=32, overlap=8)
    with pytest.raises(InputError, match=r"tile \(32x16\) must be larger than overlap \(16\)"):
        sd_upscale(engine, request, tile=(32, 16), overlap=16)


def test_sd_upscale_image_is_the_pipeline_plus_metadata(setup):
    engine, request = setup
    stages = []
    direct = sd_upscale(engine, request, scale=1.5, tile=(32, 24), overlap=8,
                        callback=lambda e: stages.append(e.stage))
    assert direct.image.size == (48, 24)  # 32x16 * 1.5; x tiles at 0 and 16, one row
    assert sorted(set(stages)) == ["tile 1/2", "tile 2/2"]
    image = sd_upscale_image(request.init_image, "a red cat", model=request.model, scale=1.5,
                             tile=(32, 24), overlap=8, strength=0.5, steps=2, seed=3,
                             engine=engine)
    assert np.array_equal(np.asarray(image), np.asarray(direct.image))
    assert image.info["seed"] == 3
    text = image.info["parameters"]
    assert text.startswith("a red cat\nSteps: 2, Sampler: Euler, ")
    assert "Size: 32x24" in text and "Denoising strength: 0.5" in text  # A1111: Size = tile
    assert "SD upscale overlap: 8, SD upscale upscaler: Lanczos, Version: " in text
    settings = json.loads(image.info["noisecraft"])
    assert settings["sd_upscale"] == {"scale": 1.5, "upscaler": "lanczos", "tile": [32, 24],
                                      "overlap": 8}
    same = sd_upscale_image(request.init_image, "a red cat", model=request.model,
                            upscaler="none", scale=3, tile=32, overlap=0, strength=0.5,
                            steps=2, seed=3, engine=engine)
    assert same.size == (32, 16) and "SD upscale upscaler: None" in same.info["parameters"]
