"""ControlNet nodes (ComfyUI names) against generate_image(controlnets=...): the same settings
give the same 8-bit image, on a tiny SD1 checkpoint and a tiny original-layout ControlNet."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.api import generate_image
from noisecraft.control_images import canny
from noisecraft.engine import Engine
from noisecraft.graph import run_workflow_result
from noisecraft.nodes.control import Canny, ControlNetApply, ControlNetApplyAdvanced
from tests.fixtures.checkpoints import tiny_spec
from tests.fixtures.controlnet import tiny_controlnet, write_controlnet
from tests.nodes.test_model_nodes_support import (
    PIXELS,
    SD1_NAME,
    make_context,
    registry,
    to_uint8,
    txt2img_prompt,
    write_models,
)

CN_NAME = "control_tiny_sd15.safetensors"
HINT = "hint.png"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    root = write_models(tmp_path_factory.mktemp("models"))
    (root / "controlnet").mkdir()
    write_controlnet(root / "controlnet" / CN_NAME, tiny_spec("sd1").unet, seed=4)
    return root


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


@pytest.fixture
def context(models, tmp_path, engine):
    ctx = make_context(models, tmp_path, engine)
    a = np.zeros((64, 64, 3), dtype=np.uint8)
    a[16:48, 20:44] = (250, 200, 30)  # a square: Canny finds its outline
    a += np.random.default_rng(1).integers(0, 6, a.shape, dtype=np.uint8)
    Image.fromarray(a, "RGB").save(ctx.input_dir / HINT)
    return ctx


def _prompt(apply: str, *, strength=0.8, start=0.1, end=0.9, canny_node=False) -> dict:
    prompt = txt2img_prompt(seed=42, sampler="euler", steps=3)
    prompt["10"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": CN_NAME}}
    prompt["11"] = {"class_type": "LoadImage", "inputs": {"image": HINT}}
    image = ["11", 0]
    if canny_node:
        prompt["13"] = {"class_type": "Canny", "inputs": {
            "image": ["11", 0], "low_threshold": 0.4, "high_threshold": 0.8}}
        image = ["13", 0]
    if apply == "ControlNetApplyAdvanced":
        prompt["12"] = {"class_type": apply, "inputs": {
            "positive": ["6", 0], "negative": ["7", 0], "control_net": ["10", 0],
            "image": image, "strength": strength, "start_percent": start, "end_percent": end}}
        prompt["3"]["inputs"].update(positive=["12", 0], negative=["12", 1])
    else:
        prompt["12"] = {"class_type": apply, "inputs": {
            "conditioning": ["6", 0], "control_net": ["10", 0], "image": image,
            "strength": strength}}
        prompt["3"]["inputs"].update(positive=["12", 0])
    return prompt


def _api(models, context, engine, **unit):
    unit = {"model": str(models / "controlnet" / CN_NAME),
            "image": str(context.input_dir / HINT), **unit}
    image = generate_image("a red cat", negative_prompt="ugly",
                           model=str(models / "checkpoints" / SD1_NAME), steps=3,
                           cfg_scale=7.5, seed=42, sampler="euler", width=PIXELS, height=PIXELS,
                           controlnets=[unit], engine=engine)
    return np.asarray(image)


def _graph(prompt, context):
    run = run_workflow_result(prompt, registry=registry(), context=context)
    return to_uint8(run.values["8"][0])[0]


def test_apply_advanced_matches_generate_image(models, context, engine):
    got = _graph(_prompt("ControlNetApplyAdvanced"), context)
    ref = _api(models, context, engine, strength=0.8, start_percent=0.1, end_percent=0.9)
    np.testing.assert_array_equal(got, ref)
    plain = _graph(txt2img_prompt(seed=42, sampler="euler", steps=3), context)
    assert not np.array_equal(got, plain)


def test_old_apply_acts_on_both_prompts_like_the_advanced_node(models, context, engine):
    old = _graph(_prompt("ControlNetApply", strength=0.8), context)
    new = _graph(_prompt("ControlNetApplyAdvanced", strength=0.8, start=0.0, end=1.0), context)
    np.testing.assert_array_equal(old, new)
    np.testing.assert_array_equal(old, _api(models, context, engine, strength=0.8))


def test_canny_node_matches_the_canny_preprocessor(models, context, engine):
    got = _graph(_prompt("ControlNetApplyAdvanced", canny_node=True), context)
    ref = _api(models, context, engine, strength=0.8, start_percent=0.1, end_percent=0.9,
               preprocessor="canny")
    np.testing.assert_array_equal(got, ref)


def test_strength_zero_leaves_the_conditioning_alone():
    cond = [[torch.zeros(1, 77, 8), {"pooled_output": None}]]
    net = tiny_controlnet(tiny_spec("sd1").unet)
    image = torch.rand(1, 64, 64, 3)
    assert ControlNetApply.execute(cond, net, image, 0.0) == (cond,)
    assert ControlNetApplyAdvanced.execute(cond, cond, net, image, 0.0, 0.0, 1.0) == (cond, cond)
    pos, neg = ControlNetApplyAdvanced.execute(cond, cond, net, image, 0.5, 0.2, 0.7)
    (spec,) = pos[0][1]["control"]
    assert neg[0][1]["control"] == (spec,) and (spec.start_percent, spec.end_percent) == (0.2, 0.7)
    chained, _ = ControlNetApplyAdvanced.execute(pos, neg, net, image, 1.0, 0.0, 1.0)
    assert len(chained[0][1]["control"]) == 2 and "control" not in cond[0][1]


def test_canny_node_shape_and_errors():
    image = torch.zeros(1, 32, 32, 3)
    image[:, 8:24, 8:24] = 1.0
    (edges,) = Canny.execute(image, 0.4, 0.8)
    assert edges.shape == (1, 32, 32, 3) and set(edges.unique().tolist()) == {0.0, 1.0}
    torch.testing.assert_close(edges.movedim(-1, 1), canny(image.movedim(-1, 1), 0.4, 0.8))
    with pytest.raises(ValueError, match="low_threshold 0.9 is above high_threshold 0.5"):
        Canny.execute(image, 0.9, 0.5)
