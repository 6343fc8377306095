"""Conditioning edit nodes: their values (no model), their /object_info entries, and API-format
workflows on a tiny SD1 checkpoint where the sampler must honour what they set."""

from __future__ import annotations

import pytest
import torch

from noisecraft.engine import Engine
from noisecraft.graph import run_workflow_result
from noisecraft.nodes.conditioning_ops import (
    ConditioningAverage,
    ConditioningConcat,
    ConditioningSetAreaPercentage,
    ConditioningSetAreaStrength,
    ConditioningSetMask,
    ConditioningSetTimestepRange,
)
from tests.nodes.test_model_nodes_support import (
    make_context,
    registry,
    txt2img_prompt,
    write_models,
)


def entry(value, tokens=3, pooled=None, **opts):
    return [torch.full((1, tokens, 2), float(value)), {"pooled_output": pooled, **opts}]


def test_average_mixes_contexts_and_pooled_outputs():
    to = [entry(1.0, 3, torch.ones(1, 2), area=(8, 8, 0, 0)), entry(2.0, 5, None)]
    frm = [entry(5.0, 4, torch.full((1, 2), 3.0)), entry(9.0)]  # only the first is used
    (out,) = ConditioningAverage.execute(to, frm, 0.25)
    # entry 0: 3 tokens, from cut to 3 -> 0.25 * 1 + 0.75 * 5
    assert torch.allclose(out[0][0], torch.full((1, 3, 2), 4.0))
    assert torch.allclose(out[0][1]["pooled_output"], torch.full((1, 2), 0.25 + 0.75 * 3))
    assert out[0][1]["area"] == (8, 8, 0, 0)
    # entry 1: 5 tokens, from padded with a zero token; no pooled output: from's is taken
    assert torch.allclose(out[1][0][0, :, 0], torch.tensor([4.25, 4.25, 4.25, 4.25, 0.5]))
    assert torch.equal(out[1][1]["pooled_output"], torch.full((1, 2), 3.0))
    (neither,) = ConditioningAverage.execute([[torch.ones(1, 3, 2), {}]], [entry(2.0)], 0.5)
    assert neither[0][1] == {}
    assert to[0][0][0, 0, 0] == 1.0  # inputs untouched


def test_concat_and_option_setters():
    (out,) = ConditioningConcat.execute([entry(1.0, 3, strength=0.5)], [entry(2.0, 2)])
    assert out[0][0][0, :, 0].tolist() == [1, 1, 1, 2, 2] and out[0][1]["strength"] == 0.5
    (pct,) = ConditioningSetAreaPercentage.execute([entry(1.0)], 0.5, 0.25, 0.1, 0.2, 2.0)
    assert pct[0][1]["area"] == ("percentage", 0.25, 0.5, 0.2, 0.1)
    assert pct[0][1]["strength"] == 2.0 and pct[0][1]["set_area_to_bounds"] is False
    assert ConditioningSetAreaStrength.execute([entry(1.0)], 3.0)[0][0][1]["strength"] == 3.0
    (masked,) = ConditioningSetMask.execute([entry(1.0)], torch.ones(4, 4), 0.7, "mask bounds")
    opts = masked[0][1]
    assert opts["mask"].shape == (1, 4, 4) and opts["mask_strength"] == 0.7
    assert opts["set_area_to_bounds"] is True and "strength" not in opts
    (ranged,) = ConditioningSetTimestepRange.execute([entry(1.0)], 0.2, 0.8)
    assert (ranged[0][1]["start_percent"], ranged[0][1]["end_percent"]) == (0.2, 0.8)
    with pytest.raises(ValueError, match="ConditioningConcat: conditioning_from is empty"):
        ConditioningConcat.execute([entry(1.0)], [])


def test_object_info_follows_comfyui():
    info = registry().object_info()
    mask = info["ConditioningSetMask"]
    assert mask["input_order"] == {"required": ["conditioning", "mask", "strength",
                                                "set_cond_area"]}
    assert mask["input"]["required"]["set_cond_area"] == [["default", "mask bounds"]]
    assert mask["display_name"] == "Conditioning (Set Mask)"
    pct = info["ConditioningSetAreaPercentage"]["input"]["required"]
    assert pct["width"] == ["FLOAT", {"default": 1.0, "min": 0, "max": 1.0, "step": 0.01}]
    rng = info["ConditioningSetTimestepRange"]
    assert rng["category"] == "advanced/conditioning"
    assert rng["input"]["required"]["end"][1] == {"default": 1.0, "min": 0.0, "max": 1.0,
                                                  "step": 0.001}
    assert info["ConditioningAverage"]["input_order"]["required"] == [
        "conditioning_to", "conditioning_from", "conditioning_to_strength"]


# ---- the sampler honours them (tiny SD1 checkpoint) -----------------------------------------


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    torch.set_num_threads(1)
    models = write_models(tmp_path_factory.mktemp("models"))
    return make_context(models, tmp_path_factory.mktemp("run"), Engine(device="cpu"))


def _run(prompt, context):
    return run_workflow_result(prompt, registry=registry(), context=context)


def _text(text):
    return {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["4", 1]}}


def _ranged(source, start, end):
    return {"class_type": "ConditioningSetTimestepRange",
            "inputs": {"conditioning": [source, 0], "start": start, "end": end}}


def test_timestep_range_switches_prompts_where_the_sigmas_cross(context):
    """cat for the first 30% of timesteps, dog after: with 3 'normal' steps (timesteps 999,
    499.5, 0) only the first step sees cat, so this equals KSamplerAdvanced running step 0
    with cat and steps 1-2 with dog."""
    p = txt2img_prompt(steps=3, sampler="euler", cfg=5.0)
    p.update({"40": _text("a dog"), "41": _ranged("6", 0.0, 0.3), "42": _ranged("40", 0.3, 1.0),
              "43": {"class_type": "ConditioningCombine", "inputs": {
                  "conditioning_1": ["41", 0], "conditioning_2": ["42", 0]}}})
    p["3"]["inputs"]["positive"] = ["43", 0]
    switched = _run(p, context).values["3"][0]["samples"]

    split = txt2img_prompt(steps=3, sampler="euler", cfg=5.0)
    common = {k: split["3"]["inputs"][k] for k in ("model", "steps", "cfg", "sampler_name",
                                                    "scheduler", "negative")}
    split["40"] = _text("a dog")
    split["3"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "enable", "noise_seed": 42, "positive": ["6", 0],
        "latent_image": ["5", 0], "start_at_step": 0, "end_at_step": 1,
        "return_with_leftover_noise": "enable"}}
    split["44"] = {"class_type": "KSamplerAdvanced", "inputs": {
        **common, "add_noise": "disable", "noise_seed": 42, "positive": ["40", 0],
        "latent_image": ["3", 0], "start_at_step": 1, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}}
    split["8"]["inputs"]["samples"] = ["44", 0]
    expected = _run(split, context).values["44"][0]["samples"]
    # the two paths batch the model calls differently: float32 rounding differs (CI saw 3e-4)
    torch.testing.assert_close(switched, expected, rtol=1e-3, atol=1e-3)
    # without the ranges both prompts act at every step: a different image
    p["43"]["inputs"] = {"conditioning_1": ["6", 0], "conditioning_2": ["40", 0]}
    unranged = _run(p, context).values["3"][0]["samples"]
    assert (unranged - expected).abs().max() > 1e-2


def test_api_workflow_chaining_conditioning_latent_and_image_nodes(context):
    p = txt2img_prompt(steps=2, sampler="euler")
    p.update({
        "40": _text("a dog"),
        "41": {"class_type": "ConditioningSetAreaPercentage", "inputs": {
            "conditioning": ["40", 0], "width": 0.5, "height": 1.0, "x": 0.5, "y": 0.0,
            "strength": 1.5}},
        "50": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}},
        "51": {"class_type": "FeatherMask", "inputs": {"mask": ["50", 0], "left": 16,
                                                       "top": 0, "right": 0, "bottom": 0}},
        "42": {"class_type": "ConditioningSetMask", "inputs": {
            "conditioning": ["6", 0], "mask": ["51", 0], "strength": 1.0,
            "set_cond_area": "default"}},
        "43": {"class_type": "ConditioningConcat", "inputs": {
            "conditioning_to": ["42", 0], "conditioning_from": ["40", 0]}},
        "44": {"class_type": "ConditioningCombine", "inputs": {
            "conditioning_1": ["43", 0], "conditioning_2": ["41", 0]}},
        "45": {"class_type": "ConditioningAverage", "inputs": {
            "conditioning_to": ["7", 0], "conditioning_from": ["40", 0],
            "conditioning_to_strength": 0.8}},
        "60": {"class_type": "EmptyLatentImage", "inputs": {"width": 32, "height": 32,
                                                           "batch_size": 1}},
        "61": {"class_type": "LatentCompositeMasked", "inputs": {
            "destination": ["5", 0], "source": ["60", 0], "x": 16, "y": 16,
            "resize_source": False, "mask": ["51", 0]}},
        "62": {"class_type": "LatentFlip", "inputs": {"samples": ["3", 0],
                                                      "flip_method": "y-axis: horizontally"}},
        "63": {"class_type": "ImageSharpen", "inputs": {"image": ["8", 0], "sharpen_radius": 1,
                                                        "sigma": 1.0, "alpha": 0.5}},
    })
    p["3"]["inputs"].update(positive=["44", 0], negative=["45", 0], latent_image=["61", 0])
    p["8"]["inputs"]["samples"] = ["62", 0]
    p["9"]["inputs"]["images"] = ["63", 0]
    run = _run(p, context)
    assert run.values["43"][0][0][0].shape[1] == 2 * run.values["6"][0][0][0].shape[1]
    latent = run.values["3"][0]["samples"]
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()
    assert torch.equal(run.values["62"][0]["samples"], latent.flip(3))
    image = run.values["63"][0]
    assert image.shape[0] == 1 and image.min() >= 0 and image.max() <= 1
    assert len(run.outputs["9"]["images"]) == 1
