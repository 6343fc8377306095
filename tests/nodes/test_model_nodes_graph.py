"""Model nodes inside the graph engine: caching, validation errors, LoRA isolation, progress,
cancellation, the custom-sampling path, conditioning nodes, VAE and teaching nodes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from noisecraft.engine import Engine
from noisecraft.graph import (
    ExecutionInterrupted,
    Executor,
    PromptValidationError,
    run_workflow_result,
)
from tests.fixtures.loras import write_kohya_lora
from tests.nodes.test_model_nodes_support import (
    SD1_NAME,
    make_context,
    registry,
    to_uint8,
    txt2img_prompt,
    write_models,
)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    root = write_models(tmp_path_factory.mktemp("models"))
    (root / "loras").mkdir()
    write_kohya_lora(root / "loras" / "style.safetensors", "sd1", alpha=4.0)
    return root


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


@pytest.fixture
def context(models, tmp_path, engine):
    return make_context(models, tmp_path, engine)


def _image(run, node="8"):
    return to_uint8(run.values[node][0])


def test_changing_only_the_seed_reruns_the_sampler_and_what_follows(context):
    executor = Executor(registry())
    first = executor.execute(txt2img_prompt(seed=1), context)
    assert sorted(first.executed) == ["3", "4", "5", "6", "7", "8", "9"]
    events = []
    second = executor.execute(txt2img_prompt(seed=2), context,
                              on_event=lambda name, data: events.append((name, data)))
    assert sorted(second.executed) == ["3", "8", "9"]
    assert sorted(second.cached) == ["4", "5", "6", "7"]
    assert ("execution_cached", {"nodes": second.cached, "prompt_id": second.prompt_id}) \
        in events
    ran = [d["node"] for n, d in events if n == "executing" and d["node"] is not None]
    assert sorted(ran) == ["3", "8", "9"]
    assert not np.array_equal(_image(first), _image(second))
    changed = txt2img_prompt(seed=2)
    changed["6"]["inputs"]["text"] = "a blue dog"
    third = executor.execute(changed, context)
    assert sorted(third.executed) == ["3", "6", "8", "9"]


def _errors(prompt, context):
    with pytest.raises(PromptValidationError) as info:
        run_workflow_result(prompt, registry=registry(), context=context)
    body = info.value.result.as_response()
    return body, [(node, e["type"], e["extra_info"].get("input_name"), e["message"])
                  for node, ne in body["node_errors"].items() for e in ne["errors"]]


def test_every_validation_error_names_node_and_input_and_nothing_runs(context, engine,
                                                                      tmp_path):
    fresh = Engine(device="cpu")
    ctx = make_context(context.resources["models"].paths("checkpoints")[0].parent,
                       tmp_path / "v", fresh)
    p = txt2img_prompt()
    p["4"]["inputs"]["ckpt_name"] = "nope.safetensors"              # value_not_in_list
    p["3"]["inputs"]["steps"] = 0                                    # value_smaller_than_min
    p["3"]["inputs"]["cfg"] = 1000.0                                 # value_bigger_than_max
    p["3"]["inputs"]["sampler_name"] = "eulerr"                      # value_not_in_list
    p["3"]["inputs"]["seed"] = "many"                                # invalid_input_type
    p["6"]["inputs"]["clip"] = ["4", 0]                              # return_type_mismatch
    del p["7"]["inputs"]["clip"]                                     # required_input_missing
    p["8"]["inputs"]["vae"] = "my.vae"                               # constant for a link
    p["10"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["4", 0], "clip": ["4", 5], "lora_name": "missing.safetensors",
        "strength_model": 1.0, "strength_clip": 200.0}}              # clip: bad_linked_input
    p["3"]["inputs"]["model"] = ["10", 0]
    body, errors = _errors(p, ctx)
    found = {(n, t, i) for n, t, i, _ in errors}
    assert found == {
        ("4", "value_not_in_list", "ckpt_name"), ("3", "value_smaller_than_min", "steps"),
        ("3", "value_bigger_than_max", "cfg"), ("3", "value_not_in_list", "sampler_name"),
        ("3", "invalid_input_type", "seed"), ("6", "return_type_mismatch", "clip"),
        ("7", "required_input_missing", "clip"), ("8", "invalid_input_type", "vae"),
        ("10", "value_not_in_list", "lora_name"), ("10", "value_bigger_than_max",
                                                   "strength_clip"),
        ("10", "bad_linked_input", "clip"),
    }
    message = {(n, i): m for n, _, i, m in errors}
    assert "node 4" in message[("4", "ckpt_name")] and SD1_NAME in message[("4", "ckpt_name")]
    assert "node 6" in message[("6", "clip")] and "MODEL" in message[("6", "clip")]
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    assert fresh.cached_models == []  # no checkpoint was loaded
    assert not any(ctx.output_dir.iterdir())


def test_unknown_model_node_class_is_reported(context):
    p = txt2img_prompt()
    p["4"]["class_type"] = "CheckpointLoader"  # the deprecated node: not here
    body, errors = _errors(p, context)
    assert body["error"]["type"] == "missing_node_type"
    assert ("4", "missing_node_type", None) in {(n, t, i) for n, t, i, _ in errors}


def test_lora_branch_does_not_change_the_plain_branch(context, engine, models):
    plain = run_workflow_result(txt2img_prompt(seed=4), registry=registry(), context=context)
    bundle = engine.model(models / "checkpoints" / SD1_NAME)
    before = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    p = txt2img_prompt(seed=4)
    p["10"] = {"class_type": "LoraLoader", "inputs": {
        "model": ["4", 0], "clip": ["4", 1], "lora_name": "style.safetensors",
        "strength_model": 3.0, "strength_clip": 3.0}}
    branch = copy.deepcopy({k: p[k] for k in ("6", "7", "3", "8")})
    for node in branch.values():  # a second branch through the LoRA
        for value in node["inputs"].values():
            if isinstance(value, list) and value[0] in ("3", "6", "7", "8"):
                value[0] = "1" + value[0]
    branch["3"]["inputs"]["model"] = ["10", 0]
    branch["6"]["inputs"]["clip"] = ["10", 1]
    branch["7"]["inputs"]["clip"] = ["10", 1]
    branch["8"]["inputs"]["vae"] = ["4", 2]
    p.update({"1" + k: v for k, v in branch.items()})
    p["19"] = {"class_type": "SaveImage", "inputs": {"images": ["18", 0],
                                                      "filename_prefix": "lora"}}
    run = run_workflow_result(p, registry=registry(), context=context)
    np.testing.assert_array_equal(_image(run), _image(plain))
    assert not np.array_equal(_image(run, "18"), _image(plain))
    after = bundle.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    model, clip = run.values["10"]
    assert model.bundle.unet is not bundle.unet and clip.bundle.text_encoder is not \
        bundle.text_encoder
    assert model.bundle.text_encoder is bundle.text_encoder  # the MODEL output: U-Net only


def test_clip_set_last_layer_and_zero_out_change_the_context(context):
    extra = {
        "20": {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["4", 1],
                                                             "stop_at_clip_layer": -2}},
        "21": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["4", 1]}},
        "22": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat", "clip": ["20", 0]}},
        "23": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["22", 0]}},
    }
    last, skip, zero = (_encode(context, extra, n) for n in ("21", "22", "23"))
    assert last.shape == skip.shape and not torch.equal(last, skip)
    assert zero.shape == skip.shape and torch.count_nonzero(zero) == 0


def _encode(context, extra, node):
    """The context tensor of conditioning ``node``, run inside a 1-step txt2img graph."""
    p = txt2img_prompt(steps=1)
    p.update(copy.deepcopy(extra))
    p["3"]["inputs"]["positive"] = [node, 0]
    return run_workflow_result(p, registry=registry(), context=context).values[node][0][0][0]


def test_progress_events_carry_previews_and_cancel_stops(context):
    events = []
    run_workflow_result(txt2img_prompt(steps=3), registry=registry(), context=context,
                        on_event=lambda n, d: events.append((n, d)))
    progress = [d for n, d in events if n == "progress"]
    assert [(d["value"], d["max"], d["node"]) for d in progress] == [(1, 3, "3"), (2, 3, "3"),
                                                                    (3, 3, "3")]
    assert all(d["preview"].size == (16, 16) for d in progress)

    def cancel_at_first_step(name, data):
        if name == "progress":
            context.cancel.cancel()

    with pytest.raises(ExecutionInterrupted):
        run_workflow_result(txt2img_prompt(seed=99, steps=3), registry=registry(),
                            context=context, on_event=cancel_at_first_step)


# ComfyUI's input order and defaults (what editor-saved widgets_values rely on)
COMFY_INPUTS = {
    "KSampler": ["model", "seed", "steps", "cfg", "sampler_name", "scheduler", "positive",
                 "negative", "latent_image", "denoise"],
    "KSamplerAdvanced": ["model", "add_noise", "noise_seed", "steps", "cfg", "sampler_name",
                         "scheduler", "positive", "negative", "latent_image", "start_at_step",
                         "end_at_step", "return_with_leftover_noise"],
    "SamplerCustom": ["model", "add_noise", "noise_seed", "cfg", "positive", "negative",
                      "sampler", "sigmas", "latent_image"],
    "CLIPTextEncodeSDXL": ["clip", "width", "height", "crop_w", "crop_h", "target_width",
                           "target_height", "text_g", "text_l"],
    "CLIPTextEncodeSDXLRefiner": ["ascore", "width", "height", "text", "clip"],
    "LoraLoader": ["model", "clip", "lora_name", "strength_model", "strength_clip"],
    "VAEDecodeTiled": ["samples", "vae", "tile_size", "overlap", "temporal_size",
                       "temporal_overlap"],
    "ConditioningSetArea": ["conditioning", "width", "height", "x", "y", "strength"],
    "InpaintModelConditioning": ["positive", "negative", "vae", "pixels", "mask",
                                 "noise_mask"],
}


def test_model_node_schemas_follow_comfyui():
    info = registry().object_info()
    for name, order in COMFY_INPUTS.items():
        assert info[name]["input_order"]["required"] == order, name
    ks = info["KSampler"]["input"]["required"]
    assert ks["cfg"][1] == {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1,
                            "round": 0.01, "tooltip": ks["cfg"][1]["tooltip"]}
    assert ks["seed"][1]["max"] == 2**64 - 1 and ks["seed"][1]["control_after_generate"]
    assert "dpmpp_2m" in ks["sampler_name"][0] and "karras" in ks["scheduler"][0]
    adv = info["KSamplerAdvanced"]["input"]["required"]
    assert adv["add_noise"][0] == ["enable", "disable"]
    assert adv["return_with_leftover_noise"][0] == ["disable", "enable"]
    assert adv["end_at_step"][1]["default"] == 10000
    assert info["CLIPSetLastLayer"]["input"]["required"]["stop_at_clip_layer"][1] == \
        {"default": -1, "min": -24, "max": -1, "step": 1}
    assert info["CheckpointLoaderSimple"]["output"] == ["MODEL", "CLIP", "VAE"]
    assert info["SamplerCustomAdvanced"]["output_name"] == ["output", "denoised_output"]
