"""Model nodes against generate_image: the same settings and seed give the same 8-bit images
(txt2img, img2img, inpaint) or the same engine steps (hires fix), on a tiny SD1 checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.api import generate_image
from noisecraft.engine import Engine
from noisecraft.graph import run_workflow_result
from tests.nodes.test_model_nodes_support import (
    PIXELS,
    SD1_NAME,
    make_context,
    registry,
    to_uint8,
    txt2img_prompt,
    write_models,
    write_test_image,
    write_test_mask,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


@pytest.fixture
def context(models, tmp_path, engine):
    return make_context(models, tmp_path, engine)


def _ckpt(models):
    return str(models / "checkpoints" / SD1_NAME)


@pytest.mark.parametrize("sampler", ["euler", "euler_ancestral", "dpmpp_2m_sde"])
def test_txt2img_matches_generate_image(models, context, engine, sampler):
    run = run_workflow_result(txt2img_prompt(seed=42, sampler=sampler), registry=registry(),
                              context=context)
    ref = generate_image("a red cat", negative_prompt="ugly", model=_ckpt(models), steps=3,
                         cfg_scale=7.5, seed=42, sampler=sampler, width=PIXELS,
                         height=PIXELS, engine=engine)
    got = to_uint8(run.values["8"][0])[0]
    assert got.shape == np.asarray(ref).shape
    np.testing.assert_array_equal(got, np.asarray(ref))
    saved = run.outputs["9"]["images"]
    assert len(saved) == 1 and (context.output_dir / saved[0]["filename"]).is_file()


def test_batch_item_i_uses_seed_plus_i(models, context, engine):
    """The engine's batch convention: item 1 of a seed-7 batch is the seed-8 image."""
    run = run_workflow_result(txt2img_prompt(seed=7, batch=2), registry=registry(),
                              context=context)
    refs = generate_image("a red cat", negative_prompt="ugly", model=_ckpt(models), steps=3,
                          cfg_scale=7.5, seed=7, sampler="euler_ancestral", width=PIXELS,
                          height=PIXELS, batch_size=2, engine=engine)
    got = to_uint8(run.values["8"][0])
    for i in range(2):
        np.testing.assert_array_equal(got[i], np.asarray(refs[i]))
    assert not np.array_equal(got[0], got[1])


def _img2img_prompt(mask: bool) -> dict:
    prompt = txt2img_prompt(seed=5, steps=2, sampler="euler_ancestral")
    prompt["10"] = {"class_type": "LoadImage", "inputs": {"image": "init.png"}}
    prompt["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["10", 0], "vae": ["4", 2]}}
    prompt["3"]["inputs"].update(latent_image=["11", 0], denoise=0.5)
    if mask:
        prompt["12"] = {"class_type": "LoadImageMask",
                        "inputs": {"image": "mask.png", "channel": "red"}}
        prompt["13"] = {"class_type": "SetLatentNoiseMask",
                        "inputs": {"samples": ["11", 0], "mask": ["12", 0]}}
        prompt["3"]["inputs"]["latent_image"] = ["13", 0]
    del prompt["5"]
    return prompt


def test_img2img_matches_generate_image(models, context, engine):
    """KSampler(steps=2, denoise=0.5) runs the last 2 of 4 steps: generate_image(steps=4,
    strength=0.5)."""
    init = write_test_image(context.input_dir / "init.png")
    run = run_workflow_result(_img2img_prompt(mask=False), registry=registry(),
                              context=context)
    ref = generate_image("a red cat", negative_prompt="ugly", model=_ckpt(models), steps=4,
                         strength=0.5, cfg_scale=7.5, seed=5, sampler="euler_ancestral",
                         init_image=init, engine=engine)
    np.testing.assert_array_equal(to_uint8(run.values["8"][0])[0], np.asarray(ref))


def test_inpaint_matches_generate_image(models, context, engine):
    """SetLatentNoiseMask + KSampler is the engine's inpainting with an ordinary model; the
    engine also pastes the original back where the mask is 0 (a compositing step)."""
    init = write_test_image(context.input_dir / "init.png")
    mask = write_test_mask(context.input_dir / "mask.png")
    run = run_workflow_result(_img2img_prompt(mask=True), registry=registry(),
                              context=context)
    ref = np.asarray(generate_image(
        "a red cat", negative_prompt="ugly", model=_ckpt(models), steps=4, strength=0.5,
        cfg_scale=7.5, seed=5, sampler="euler_ancestral", init_image=init, mask=mask,
        mask_blur=0, engine=engine))
    got = to_uint8(run.values["8"][0])[0]
    m = np.asarray(Image.open(mask)) > 127
    original = np.asarray(Image.open(init))
    np.testing.assert_array_equal(got[m], ref[m])
    np.testing.assert_array_equal(ref[~m], original[~m])
    assert not np.array_equal(got[m], original[m])


def test_hires_fix_matches_generate_image(models, context, engine):
    """txt2img -> LatentUpscaleBy(bilinear, 2) -> KSampler(steps 2, denoise 0.5, same seed)
    equals generate_image's hires fix (hires_steps 4, hires_strength 0.5): the engine seeds its
    second pass afresh with the same seed, as this graph does."""
    prompt = txt2img_prompt(seed=3, steps=3, sampler="euler")
    prompt["20"] = {"class_type": "LatentUpscaleBy", "inputs": {
        "samples": ["3", 0], "upscale_method": "bilinear", "scale_by": 2.0}}
    prompt["21"] = {"class_type": "KSampler", "inputs": {
        **prompt["3"]["inputs"], "latent_image": ["20", 0], "steps": 2, "denoise": 0.5}}
    prompt["8"]["inputs"]["samples"] = ["21", 0]
    run = run_workflow_result(prompt, registry=registry(), context=context)
    ref = generate_image("a red cat", negative_prompt="ugly", model=_ckpt(models), steps=3,
                         cfg_scale=7.5, seed=3, sampler="euler", width=PIXELS, height=PIXELS,
                         hires_scale=2.0, hires_steps=4, hires_strength=0.5, engine=engine)
    got = to_uint8(run.values["8"][0])[0]
    assert got.shape[:2] == (2 * PIXELS, 2 * PIXELS)
    np.testing.assert_array_equal(got, np.asarray(ref))
