"""The other model nodes: custom sampling and guiders against KSampler, area conditioning,
VAE loader / tiled decode / inpaint encode, inpainting-model conditioning, teaching nodes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from noisecraft.diffusion import q_sample
from noisecraft.engine import Engine
from noisecraft.graph import run_workflow_result
from noisecraft.nodes.model_values import VaeValue
from noisecraft.nodes.vae import VAEDecode, VAEDecodeTiled
from tests.fixtures.loras import write_kohya_lora
from tests.nodes.test_model_nodes_support import (
    SD1_NAME,
    make_context,
    registry,
    txt2img_prompt,
    write_models,
    write_test_image,
    write_test_mask,
)

INPAINT_NAME = "tiny_sd1_inpaint.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    root = write_models(tmp_path_factory.mktemp("models"),
                        {SD1_NAME: "sd1", INPAINT_NAME: "sd1-inpaint"})
    (root / "vae").mkdir()
    shutil.copy(root / "checkpoints" / SD1_NAME, root / "vae" / "from_ckpt.safetensors")
    return root


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


@pytest.fixture
def context(models, tmp_path, engine):
    return make_context(models, tmp_path, engine)


def _run(prompt, context):
    return run_workflow_result(prompt, registry=registry(), context=context)


def _latent(run, node="3"):
    return run.values[node][0]["samples"]


def _custom(prompt, guider, noise=None):
    """Replace KSampler 3 by SamplerCustomAdvanced with the same settings."""
    k = prompt["3"]["inputs"]
    prompt["30"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": k["seed"]}}
    prompt["31"] = guider
    prompt["32"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": k["sampler_name"]}}
    prompt["33"] = {"class_type": "BasicScheduler", "inputs": {
        "model": ["4", 0], "scheduler": k["scheduler"], "steps": k["steps"], "denoise": 1.0}}
    prompt["3"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": noise or ["30", 0], "guider": ["31", 0], "sampler": ["32", 0],
        "sigmas": ["33", 0], "latent_image": k["latent_image"]}}
    return prompt


def test_sampler_custom_advanced_with_cfg_guider_equals_ksampler(context):
    plain = _run(txt2img_prompt(), context)
    guider = {"class_type": "CFGGuider", "inputs": {
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "cfg": 7.5}}
    custom = _run(_custom(txt2img_prompt(), guider), context)
    assert torch.equal(_latent(custom), _latent(plain))
    denoised = custom.values["3"][1]["samples"]  # the last step's x0; it ends at sigma 0
    assert torch.equal(denoised, _latent(plain))


def test_basic_guider_is_ksampler_at_cfg_1_and_sampler_custom_matches(context):
    p = txt2img_prompt()
    p["3"]["inputs"]["cfg"] = 1.0
    plain = _run(p, context)
    guider = {"class_type": "BasicGuider", "inputs": {"model": ["4", 0],
                                                      "conditioning": ["6", 0]}}
    basic = _run(_custom(txt2img_prompt(), guider), context)
    torch.testing.assert_close(_latent(basic), _latent(plain), rtol=1e-5, atol=1e-6)
    k = txt2img_prompt()
    k.update({"32": {"class_type": "KSamplerSelect", "inputs": {"sampler_name":
                                                                "euler_ancestral"}},
              "33": {"class_type": "BasicScheduler", "inputs": {
                  "model": ["4", 0], "scheduler": "normal", "steps": 3, "denoise": 1.0}}})
    k["3"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["4", 0], "add_noise": True, "noise_seed": 42, "cfg": 7.5,
        "positive": ["6", 0], "negative": ["7", 0], "sampler": ["32", 0],
        "sigmas": ["33", 0], "latent_image": ["5", 0]}}
    assert torch.equal(_latent(_run(k, context)), _latent(_run(txt2img_prompt(), context)))


def test_disable_noise_starts_from_the_latent_itself(context):
    guider = {"class_type": "CFGGuider", "inputs": {
        "model": ["4", 0], "positive": ["6", 0], "negative": ["7", 0], "cfg": 7.5}}
    p = _custom(txt2img_prompt(), guider, noise=["34", 0])
    p["34"] = {"class_type": "DisableNoise", "inputs": {}}
    a, b = _latent(_run(p, context)), _latent(_run(txt2img_prompt(), context))
    assert torch.isfinite(a).all() and not torch.equal(a, b)


def test_area_and_combined_conditioning(context):
    p = txt2img_prompt()
    p["40"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a sun", "clip": ["4", 1]}}
    p["41"] = {"class_type": "ConditioningSetArea", "inputs": {
        "conditioning": ["40", 0], "width": 64, "height": 64, "x": 0, "y": 0, "strength": 1.0}}
    p["42"] = {"class_type": "ConditioningCombine", "inputs": {
        "conditioning_1": ["6", 0], "conditioning_2": ["41", 0]}}
    p["3"]["inputs"]["positive"] = ["42", 0]
    run = _run(p, context)
    assert len(run.values["42"][0]) == 2 and run.values["41"][0][0][1]["area"] == (8, 8, 0, 0)
    combined, plain = _latent(run), _latent(_run(txt2img_prompt(), context))
    assert torch.isfinite(combined).all() and not torch.equal(combined, plain)
    # an area covering everything with itself combined twice is the plain prompt
    p2 = txt2img_prompt()
    p2["41"] = {"class_type": "ConditioningSetArea", "inputs": {
        "conditioning": ["6", 0], "width": 64, "height": 64, "x": 0, "y": 0, "strength": 2.0}}
    p2["42"] = {"class_type": "ConditioningCombine", "inputs": {
        "conditioning_1": ["6", 0], "conditioning_2": ["41", 0]}}
    p2["3"]["inputs"]["positive"] = ["42", 0]
    torch.testing.assert_close(_latent(_run(p2, context)), plain, rtol=1e-3, atol=1e-3)


def test_vae_loader_and_tiled_decode(context, models):
    p = txt2img_prompt(steps=1)
    p["50"] = {"class_type": "VAELoader", "inputs": {"vae_name": "from_ckpt.safetensors"}}
    p["8"]["inputs"]["vae"] = ["50", 0]
    loaded = _run(p, context).values["8"][0]
    own = _run(txt2img_prompt(steps=1), context).values["8"][0]
    assert torch.equal(loaded, own)  # the checkpoint's own VAE, loaded on its own
    vae = VaeValue.of(context.resources["engine"].model(
        models / "checkpoints" / SD1_NAME).vae, "v")
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    whole = VAEDecode.execute({"samples": z}, vae)[0]
    single = VAEDecodeTiled.execute({"samples": z}, vae, 128, 64)[0]
    assert torch.equal(single, whole)  # one tile: the plain decode
    tiled = VAEDecodeTiled.execute({"samples": z}, vae, 64, 32)[0]
    assert tiled.shape == whole.shape
    assert (tiled - whole).abs().mean() < 0.1 and not torch.equal(tiled, whole)


def test_inpainting_model_nodes(context):
    write_test_image(context.input_dir / "init.png")
    write_test_mask(context.input_dir / "mask.png")
    p = txt2img_prompt(INPAINT_NAME, steps=2)
    p["60"] = {"class_type": "LoadImage", "inputs": {"image": "init.png"}}
    p["61"] = {"class_type": "LoadImageMask", "inputs": {"image": "mask.png", "channel": "red"}}
    p["62"] = {"class_type": "InpaintModelConditioning", "inputs": {
        "positive": ["6", 0], "negative": ["7", 0], "vae": ["4", 2], "pixels": ["60", 0],
        "mask": ["61", 0], "noise_mask": True}}
    p["3"]["inputs"].update(positive=["62", 0], negative=["62", 1], latent_image=["62", 2])
    run = _run(p, context)
    latent_in, latent_out = run.values["62"][2]["samples"], _latent(run)
    cond = run.values["62"][0][0][1]
    assert cond["concat_latent_image"].shape == latent_in.shape == (1, 4, 8, 8)
    keep = (slice(None), slice(None), slice(None), slice(0, 4))  # the unmasked left half
    torch.testing.assert_close(latent_out[keep], latent_in[keep], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(latent_out[..., 4:], latent_in[..., 4:])
    p["63"] = {"class_type": "VAEEncodeForInpaint", "inputs": {
        "pixels": ["60", 0], "vae": ["4", 2], "mask": ["61", 0], "grow_mask_by": 3}}
    p["3"]["inputs"].update(positive=["6", 0], negative=["7", 0], latent_image=["63", 0])
    grown = _run(p, context).values["63"][0]["noise_mask"]
    assert grown.shape == (1, 1, 16, 16) and grown[..., 7:].eq(1).all() \
        and grown[..., :7].eq(0).all()


def test_teaching_nodes(context, engine, models):
    p = txt2img_prompt(steps=3)
    p["70"] = {"class_type": "NoisecraftDenoiseSteps", "inputs": {
        **p["3"]["inputs"], "vae": ["4", 2]}}
    p["71"] = {"class_type": "SaveImage", "inputs": {"images": ["70", 1],
                                                      "filename_prefix": "x0"}}
    p["72"] = {"class_type": "NoisecraftForwardProcess", "inputs": {
        "model": ["4", 0], "samples": ["3", 0], "timestep": 999, "seed": 1}}
    p["73"] = {"class_type": "VAEDecode", "inputs": {"samples": ["72", 0], "vae": ["4", 2]}}
    p["74"] = {"class_type": "SaveImage", "inputs": {"images": ["73", 0],
                                                      "filename_prefix": "qt"}}
    run = _run(p, context)
    latent, frames = run.values["70"]
    assert torch.equal(latent["samples"], _latent(run))
    assert frames.shape == (3, 16, 16, 3) and len(run.outputs["71"]["images"]) == 3
    bundle = engine.model(models / "checkpoints" / SD1_NAME)
    fmt, schedule = bundle.family.latent, bundle.family.schedule()
    x0 = fmt.process_in(_latent(run))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    expected = fmt.process_out(q_sample(x0, noise, 999, schedule.alphas_cumprod.float()))
    noised, sigma = run.values["72"]
    torch.testing.assert_close(noised["samples"], expected)
    assert sigma == pytest.approx(float(schedule.sigmas[999]))
    assert np.isfinite(run.values["73"][0].numpy()).all()


def test_lora_model_only_changes_the_unet(context):
    p = txt2img_prompt(steps=1)
    loras = context.resources["models"].paths("loras")[0]
    loras.mkdir(exist_ok=True)
    write_kohya_lora(loras / "u.safetensors", "sd1", text=False)
    p["80"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["4", 0], "lora_name": "u.safetensors", "strength_model": 2.0}}
    p["3"]["inputs"]["model"] = ["80", 0]
    with_lora = _latent(_run(p, context))
    p["80"]["inputs"]["strength_model"] = 0.0
    assert torch.equal(_latent(_run(p, context)), _latent(_run(txt2img_prompt(steps=1),
                                                               context)))
    assert not torch.equal(with_lora, _latent(_run(p, context)))
