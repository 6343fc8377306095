"""Editor-format workflows (as ComfyUI saves them, written by hand after its published default
and SDXL base + refiner examples) run with tiny checkpoints of the same families placed under
the file names the workflows expect; each equals the same graph written in API format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noisecraft.graph import load_workflow, run_workflow_result
from noisecraft.models_folder import DEFAULT_CHECKPOINT_NAME, ModelFolders
from tests.fixtures.checkpoints import write_single_file
from tests.graph.test_ui_format import node, out, slot
from tests.nodes.test_model_nodes_support import (
    make_context,
    registry,
    to_uint8,
    txt2img_prompt,
    write_models,
)

SD15 = "v1-5-pruned-emaonly.safetensors"
XL_BASE, XL_REFINER = "sd_xl_base_1.0.safetensors", "sd_xl_refiner_1.0.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    return write_models(tmp_path_factory.mktemp("models"),
                        {SD15: "sd1", XL_BASE: "sdxl", XL_REFINER: "sdxl-refiner"})


@pytest.fixture
def context(models, tmp_path):
    return make_context(models, tmp_path)


def _ui(nodes, links):
    return {"last_node_id": max(n["id"] for n in nodes), "last_link_id": len(links),
            "nodes": nodes, "links": links, "groups": [], "config": {}, "extra": {},
            "version": 0.4}


def sd15_default_workflow():
    """ComfyUI's default graph (its node ids, link ids and widget order), 64x64, 3 steps."""
    nodes = [
        node(4, "CheckpointLoaderSimple", [], [out("MODEL", "MODEL", [1]),
             out("CLIP", "CLIP", [3, 5]), out("VAE", "VAE", [8])], [SD15]),
        node(5, "EmptyLatentImage", [], [out("LATENT", "LATENT", [2])], [64, 64, 1]),
        node(6, "CLIPTextEncode", [slot("clip", "CLIP", 3)],
             [out("CONDITIONING", "CONDITIONING", [4])], ["a red cat"]),
        node(7, "CLIPTextEncode", [slot("clip", "CLIP", 5)],
             [out("CONDITIONING", "CONDITIONING", [6])], ["ugly"]),
        node(3, "KSampler", [slot("model", "MODEL", 1), slot("positive", "CONDITIONING", 4),
             slot("negative", "CONDITIONING", 6), slot("latent_image", "LATENT", 2)],
             [out("LATENT", "LATENT", [7])],
             [42, "randomize", 3, 7.5, "euler_ancestral", "normal", 1]),
        node(8, "VAEDecode", [slot("samples", "LATENT", 7), slot("vae", "VAE", 8)],
             [out("IMAGE", "IMAGE", [9])], []),
        node(9, "SaveImage", [slot("images", "IMAGE", 9)], [], ["ComfyUI"]),
    ]
    links = [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 3, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
             [4, 6, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"],
             [6, 7, 0, 3, 2, "CONDITIONING"], [7, 3, 0, 8, 0, "LATENT"],
             [8, 4, 2, 8, 1, "VAE"], [9, 8, 0, 9, 0, "IMAGE"]]
    return _ui(nodes, links)


def test_sd15_default_workflow_runs_and_equals_the_api_format(context):
    ui = run_workflow_result(sd15_default_workflow(), registry=registry(), context=context)
    api = run_workflow_result(txt2img_prompt(SD15), registry=registry(), context=context)
    assert sorted(ui.executed) == ["3", "4", "5", "6", "7", "8", "9"]
    np.testing.assert_array_equal(to_uint8(ui.values["8"][0]), to_uint8(api.values["8"][0]))
    saved = ui.outputs["9"]["images"][0]
    assert saved["filename"].startswith("ComfyUI_") and saved["type"] == "output"


def _sdxl_encoders(size):
    """Base: CLIPTextEncodeSDXL (width, height, crop_w, crop_h, target_width, target_height,
    text_g, text_l); refiner: CLIPTextEncodeSDXLRefiner (ascore, width, height, text)."""
    sdxl = [size, size, 0, 0, size, size]
    return [
        node(6, "CLIPTextEncodeSDXL", [slot("clip", "CLIP", 3)],
             [out("CONDITIONING", "CONDITIONING", [4])], [*sdxl, "a lighthouse", "a lighthouse"]),
        node(7, "CLIPTextEncodeSDXL", [slot("clip", "CLIP", 5)],
             [out("CONDITIONING", "CONDITIONING", [6])], [*sdxl, "blurry", "blurry"]),
        node(15, "CLIPTextEncodeSDXLRefiner", [slot("clip", "CLIP", 10)],
             [out("CONDITIONING", "CONDITIONING", [12])], [6, size, size, "a lighthouse"]),
        node(16, "CLIPTextEncodeSDXLRefiner", [slot("clip", "CLIP", 11)],
             [out("CONDITIONING", "CONDITIONING", [13])], [2.5, size, size, "blurry"]),
    ]


def sdxl_refiner_workflow(steps=4, hand_off=3):
    """ComfyUI's SDXL base + refiner example: the base KSamplerAdvanced stops at ``hand_off``
    with its leftover noise; the refiner's continues from there without adding noise."""
    nodes = [
        node(4, "CheckpointLoaderSimple", [], [out("MODEL", "MODEL", [1]),
             out("CLIP", "CLIP", [3, 5]), out("VAE", "VAE", [])], [XL_BASE]),
        node(12, "CheckpointLoaderSimple", [], [out("MODEL", "MODEL", [14]),
             out("CLIP", "CLIP", [10, 11]), out("VAE", "VAE", [16])], [XL_REFINER]),
        node(5, "EmptyLatentImage", [], [out("LATENT", "LATENT", [2])], [64, 64, 1]),
        *_sdxl_encoders(64),
        node(10, "KSamplerAdvanced", [slot("model", "MODEL", 1),
             slot("positive", "CONDITIONING", 4), slot("negative", "CONDITIONING", 6),
             slot("latent_image", "LATENT", 2)], [out("LATENT", "LATENT", [15])],
             ["enable", 721897303308196, "randomize", steps, 8, "euler", "normal", 0, hand_off,
              "enable"]),
        node(11, "KSamplerAdvanced", [slot("model", "MODEL", 14),
             slot("positive", "CONDITIONING", 12), slot("negative", "CONDITIONING", 13),
             slot("latent_image", "LATENT", 15)], [out("LATENT", "LATENT", [17])],
             ["disable", 0, "fixed", steps, 8, "euler", "normal", hand_off, 10000, "disable"]),
        node(17, "VAEDecode", [slot("samples", "LATENT", 17), slot("vae", "VAE", 16)],
             [out("IMAGE", "IMAGE", [18])], []),
        node(19, "SaveImage", [slot("images", "IMAGE", 18)], [], ["ComfyUI"]),
    ]
    links = [[1, 4, 0, 10, 0, "MODEL"], [2, 5, 0, 10, 3, "LATENT"], [3, 4, 1, 6, 0, "CLIP"],
             [4, 6, 0, 10, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"],
             [6, 7, 0, 10, 2, "CONDITIONING"], [10, 12, 1, 15, 0, "CLIP"],
             [11, 12, 1, 16, 0, "CLIP"], [12, 15, 0, 11, 1, "CONDITIONING"],
             [13, 16, 0, 11, 2, "CONDITIONING"], [14, 12, 0, 11, 0, "MODEL"],
             [15, 10, 0, 11, 3, "LATENT"], [16, 12, 2, 17, 1, "VAE"],
             [17, 11, 0, 17, 0, "LATENT"], [18, 17, 0, 19, 0, "IMAGE"]]
    return _ui(nodes, links)


def test_sdxl_base_refiner_workflow_hands_off_the_noisy_latent(context):
    ui = sdxl_refiner_workflow()
    prompt, _ = load_workflow(ui, registry())
    assert prompt["10"]["inputs"]["end_at_step"] == 3
    assert prompt["11"]["inputs"]["add_noise"] == "disable"
    assert prompt["6"]["inputs"]["text_g"] == "a lighthouse"
    assert prompt["15"]["inputs"]["ascore"] == 6
    run = run_workflow_result(ui, registry=registry(), context=context)
    assert sorted(run.executed, key=int) == ["4", "5", "6", "7", "10", "11", "12", "15", "16",
                                             "17", "19"]
    base = run.values["10"][0]["samples"]
    image = run.values["17"][0]
    assert base.shape == (1, 4, 8, 8) and image.shape == (1, 16, 16, 3)
    assert torch.isfinite(image).all()
    # with leftover noise the base stops at sigma_3 > 0; "disable" would denoise to sigma 0
    forced = sdxl_refiner_workflow()
    forced["nodes"][next(i for i, n in enumerate(forced["nodes"]) if n["id"] == 10)][
        "widgets_values"][-1] = "disable"
    run_forced = run_workflow_result(forced, registry=registry(), context=context)
    assert not torch.equal(run_forced.values["10"][0]["samples"], base)
    no_refine = run_workflow_result(sdxl_refiner_workflow(hand_off=4), registry=registry(),
                                    context=context)
    assert not torch.equal(no_refine.values["17"][0], image)  # the refiner did something


def test_hand_off_between_two_advanced_samplers_equals_one_run(context):
    """Base KSamplerAdvanced steps 0-2 with leftover noise + steps 2-4 without new noise ==
    one KSampler of 4 steps (euler: deterministic), up to the float round trip of the latent's
    scaling."""
    whole = txt2img_prompt(SD15, steps=4, sampler="euler")
    split = txt2img_prompt(SD15, steps=4, sampler="euler")
    common = {k: v for k, v in split["3"]["inputs"].items() if k not in ("seed", "denoise")}
    split["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "enable", "noise_seed": 42, "start_at_step": 0,
        "end_at_step": 2, "return_with_leftover_noise": "enable"}}
    split["30"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "disable", "noise_seed": 0, "latent_image": ["3", 0],
        "start_at_step": 2, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    split["8"]["inputs"]["samples"] = ["30", 0]
    a = run_workflow_result(whole, registry=registry(), context=context).values["3"][0]
    b = run_workflow_result(split, registry=registry(), context=context).values["30"][0]
    torch.testing.assert_close(b["samples"], a["samples"], rtol=1e-4, atol=1e-5)


def test_default_model_is_a_checkpoint_choice_when_its_weights_exist(models, tmp_path):
    weights = write_single_file(tmp_path / "default.safetensors", "sd1")
    context = make_context(models, tmp_path)
    context.resources["models"] = ModelFolders.at(models, default_model=weights)
    prompt = txt2img_prompt(DEFAULT_CHECKPOINT_NAME, steps=1)
    run = run_workflow_result(prompt, registry=registry(), context=context)
    as_file = run_workflow_result(txt2img_prompt(SD15, steps=1), registry=registry(),
                                  context=context)
    # the fixture writes the same weights for the same family: the same picture
    np.testing.assert_array_equal(to_uint8(run.values["8"][0]),
                                  to_uint8(as_file.values["8"][0]))
    assert run.values["4"][0].bundle.name == "default"
