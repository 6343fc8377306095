"""SaveLatent / LoadLatent, VAEEncodeTiled, ModelSamplingDiscrete, RescaleCFG,
LaplaceScheduler and ImageAddNoise: ComfyUI's inputs and defaults, values by hand, round
trips, and on a tiny real-format SD1 checkpoint against the engine's own paths."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from noisecraft.api import generate_image
from noisecraft.checkpoints.loader import load_checkpoint
from noisecraft.conditioning import Conditioning
from noisecraft.engine import Engine
from noisecraft.graph import (
    ExecutionContext,
    NodeContext,
    PromptValidationError,
    UnsafePathError,
    run_workflow,
    run_workflow_result,
)
from noisecraft.nodes import builtin_registry
from noisecraft.nodes.conditioning import CLIPTextEncode
from noisecraft.nodes.guiders import guider_denoiser
from noisecraft.nodes.image_ops import ImageAddNoise
from noisecraft.nodes.latent_files import LoadLatent, SaveLatent
from noisecraft.nodes.loaders import CheckpointLoaderSimple, LoraLoaderModelOnly
from noisecraft.nodes.model_patches import ModelSamplingDiscrete, RescaleCFG
from noisecraft.nodes.model_values import Guider, VaeValue, entry_cond
from noisecraft.nodes.sampling import BasicScheduler, LaplaceScheduler
from noisecraft.nodes.vae import VAEEncode, VAEEncodeTiled, tiled_map
from noisecraft.pipelines.common import Run, guided_denoiser
from noisecraft.schedules import ZERO_SNR_ALPHA_BAR
from tests.fixtures.loras import write_kohya_lora
from tests.nodes.test_model_nodes_support import (
    PIXELS,
    SD1_NAME,
    make_context,
    registry,
    to_uint8,
    txt2img_prompt,
    write_models,
)

INFO = builtin_registry().object_info()


def _required(name):
    return INFO[name]["input"]["required"]


# ---- object_info: ComfyUI's names, inputs, defaults and ranges --------------------------------


def test_object_info_matches_comfyui():
    assert _required("SaveLatent") == {"samples": ["LATENT"], "filename_prefix": [
        "STRING", {"default": "latents/ComfyUI"}]}
    assert INFO["SaveLatent"]["output_node"] is True and INFO["SaveLatent"]["output"] == []
    assert INFO["LoadLatent"]["output"] == ["LATENT"]
    assert list(_required("LoadLatent")) == ["latent"]
    assert INFO["SaveLatent"]["category"] == INFO["LoadLatent"]["category"] == "_for_testing"

    tiled = _required("VAEEncodeTiled")
    assert INFO["VAEEncodeTiled"]["input_order"]["required"] == [
        "pixels", "vae", "tile_size", "overlap", "temporal_size", "temporal_overlap"]
    assert tiled["tile_size"] == ["INT", {"default": 512, "min": 64, "max": 4096, "step": 64}]
    assert tiled["overlap"] == ["INT", {"default": 64, "min": 0, "max": 4096, "step": 32}]
    assert {k: tiled["temporal_size"][1][k] for k in ("default", "min", "max", "step")} == {
        "default": 64, "min": 8, "max": 4096, "step": 4}
    assert {k: tiled["temporal_overlap"][1][k] for k in ("default", "min", "max", "step")} == {
        "default": 8, "min": 4, "max": 4096, "step": 4}
    assert INFO["VAEEncodeTiled"]["output"] == ["LATENT"]
    assert INFO["VAEEncodeTiled"]["display_name"] == "VAE Encode (Tiled)"

    sampling = _required("ModelSamplingDiscrete")
    assert list(sampling) == ["model", "sampling", "zsnr"]
    assert sampling["sampling"] == [["eps", "v_prediction", "x0"]]
    assert sampling["zsnr"] == ["BOOLEAN", {"default": False}]
    assert INFO["ModelSamplingDiscrete"]["output"] == ["MODEL"]
    assert _required("RescaleCFG")["multiplier"] == [
        "FLOAT", {"default": 0.7, "min": 0.0, "max": 1.0, "step": 0.01}]
    assert INFO["RescaleCFG"]["category"] == "advanced/model"

    laplace = _required("LaplaceScheduler")
    assert list(laplace) == ["steps", "sigma_max", "sigma_min", "mu", "beta"]
    assert laplace["steps"] == ["INT", {"default": 20, "min": 1, "max": 10000}]
    assert laplace["sigma_max"][1] == {
        "default": 14.614642, "min": 0.0, "max": 5000.0, "step": 0.01, "round": False}
    assert laplace["mu"][1] == {"default": 0.0, "min": -10.0, "max": 10.0, "step": 0.1,
                                "round": False}
    assert laplace["beta"][1] == {"default": 0.5, "min": 0.0, "max": 10.0, "step": 0.1,
                                  "round": False}
    assert INFO["LaplaceScheduler"]["output"] == ["SIGMAS"]

    noise = _required("ImageAddNoise")
    assert list(noise) == ["image", "seed", "strength"]
    assert noise["seed"][1]["max"] == 2**64 - 1 and noise["seed"][1]["control_after_generate"]
    assert noise["strength"] == ["FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0,
                                           "step": 0.01}]


# ---- LaplaceScheduler -------------------------------------------------------------------------


def test_laplace_scheduler_by_hand():
    (s,) = LaplaceScheduler.execute(5, 14.614642, 0.0291675, 0.0, 0.5)
    # r = 0, 1/4, 1/2, 3/4, 1: log sigma = -0.5 sign(1/2 - r) log(1 - 2|1/2 - r| + 1e-5)
    expected = [14.614642,  # exp(0.5 * 11.51) = 316 clamped to sigma_max
                math.sqrt(1 / 0.50001), 1.0, math.sqrt(0.50001),
                0.0291675]  # sqrt(1e-5) = 0.0032 clamped to sigma_min
    assert s.dtype == torch.float64 and len(s) == 5  # no final 0, as ComfyUI's
    assert s.tolist() == pytest.approx(expected, rel=1e-12)
    (t,) = LaplaceScheduler.execute(3, 100.0, 0.001, 1.0, 0.2)  # r = 0, 1/2, 1: no clamping
    assert t.tolist() == pytest.approx(
        [math.exp(1.0 - 0.2 * math.log(1e-5)), math.e, math.exp(1.0 + 0.2 * math.log(1e-5))],
        rel=1e-12)


# ---- ImageAddNoise ----------------------------------------------------------------------------


def test_image_add_noise_seeded_clipped_and_zero_strength_identity():
    image = torch.rand(2, 5, 4, 3, generator=torch.Generator().manual_seed(1))
    before = torch.random.get_rng_state()
    (a,) = ImageAddNoise.execute(image, 123, 0.3)
    (b,) = ImageAddNoise.execute(image, 123, 0.3)
    (c,) = ImageAddNoise.execute(image, 124, 0.3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the global RNG is untouched
    assert torch.equal(a, b) and not torch.equal(a, c)
    noise = torch.randn(2, 5, 4, 3, generator=torch.Generator().manual_seed(123))
    assert torch.equal(a, torch.clamp(image + 0.3 * noise, 0.0, 1.0))
    assert a.min() >= 0.0 and a.max() <= 1.0 and (a == 0).any() and (a == 1).any()
    assert torch.equal(ImageAddNoise.execute(image, 123, 0.0)[0], image)
    (top,) = ImageAddNoise.execute(image[:1], 2**64 - 1, 0.5)  # the widget's largest seed
    assert top.shape == (1, 5, 4, 3)


# ---- SaveLatent / LoadLatent ------------------------------------------------------------------


def _node_context(tmp_path, prompt=None, extra=None):
    execution = ExecutionContext(input_dir=tmp_path / "in", output_dir=tmp_path / "out")
    return NodeContext("9", "p", execution, lambda *a: None, prompt=prompt or {},
                       extra_pnginfo=extra)


def test_save_then_load_latent_round_trip_bit_exact(tmp_path):
    prompt = {"9": {"class_type": "SaveLatent", "inputs": {}}}
    ctx = _node_context(tmp_path, prompt, {"workflow": {"nodes": []}})
    z = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0)) * 7
    out = SaveLatent.execute({"samples": z, "noise_mask": torch.ones(1)}, "latents/ComfyUI",
                             context=ctx)
    assert out.values == ()
    assert out.ui == {"latents": [{"filename": "ComfyUI_00001_.latent", "subfolder": "latents",
                                   "type": "output"}]}
    path = tmp_path / "out" / "latents" / "ComfyUI_00001_.latent"
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == {"latent_tensor", "latent_format_version_0"}
        assert f.get_tensor("latent_format_version_0").shape == (0,)
        assert json.loads(f.metadata()["prompt"]) == prompt
        assert json.loads(f.metadata()["workflow"]) == {"nodes": []}
    again = SaveLatent.execute({"samples": z}, "latents/ComfyUI", context=ctx)
    assert again.ui["latents"][0]["filename"] == "ComfyUI_00002_.latent"
    assert not list(path.parent.glob("*.part"))
    (loaded,) = LoadLatent.execute("latents/ComfyUI_00001_.latent [output]", context=ctx)
    assert set(loaded) == {"samples"} and loaded["samples"].dtype == torch.float32
    assert torch.equal(loaded["samples"], z)


def test_load_latent_without_version_marker_is_scaled(tmp_path):
    (tmp_path / "in" / "old").mkdir(parents=True)
    z = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(3)).half()
    save_file({"latent_tensor": z}, tmp_path / "in" / "old" / "a.latent")
    (tmp_path / "in" / "b.png").write_bytes(b"x")
    ctx = _node_context(tmp_path)
    (loaded,) = LoadLatent.execute("old/a.latent", context=ctx)
    assert torch.equal(loaded["samples"], z.float() * (1.0 / 0.18215))
    info = builtin_registry().object_info(ctx.execution, name="LoadLatent")
    assert info["LoadLatent"]["input"]["required"]["latent"] == [["old/a.latent"]]


def test_latent_files_refuse_traversal_and_bad_files(tmp_path):
    ctx = _node_context(tmp_path)
    for prefix in ("../escape", "/etc/x", "a/../../b"):
        with pytest.raises(UnsafePathError, match="filename_prefix"):
            SaveLatent.execute({"samples": torch.zeros(1, 4, 1, 1)}, prefix, context=ctx)
    assert not (tmp_path / "escape_00001_.latent").exists()
    (tmp_path / "secret.latent").write_bytes(b"x")
    with pytest.raises(UnsafePathError, match="'..'"):
        LoadLatent.execute("../secret.latent", context=ctx)
    problems = LoadLatent.validate_inputs(ctx.execution, latent="../secret.latent")
    assert "'..'" in problems["latent"]
    assert "Invalid latent file: nope.latent" in LoadLatent.validate_inputs(
        ctx.execution, latent="nope.latent")["latent"]
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "junk.latent").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="cannot read latent file"):
        LoadLatent.execute("junk.latent", context=ctx)
    save_file({"other": torch.zeros(1)}, tmp_path / "in" / "keys.latent")
    with pytest.raises(ValueError, match="no 'latent_tensor' tensor .*other"):
        LoadLatent.execute("keys.latent", context=ctx)


def test_latent_file_graph_round_trip_and_validation(tmp_path):
    context = ExecutionContext(input_dir=tmp_path / "in", output_dir=tmp_path / "out")
    save = {"1": {"class_type": "EmptyLatentImage",
                  "inputs": {"width": 64, "height": 32, "batch_size": 2}},
            "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0],
                                                         "filename_prefix": "z/run"}}}
    ui = run_workflow(save, registry=builtin_registry(models=False), context=context)
    assert ui["2"]["latents"][0]["filename"] == "run_00001_.latent"
    name = "z/run_00001_.latent [output]"
    load = {"3": {"class_type": "LoadLatent", "inputs": {"latent": name}},
            "4": {"class_type": "SaveLatent", "inputs": {"samples": ["3", 0],
                                                         "filename_prefix": "copy"}}}
    run = run_workflow_result(load, registry=builtin_registry(models=False), context=context)
    assert torch.equal(run.values["3"][0]["samples"], torch.zeros(2, 4, 4, 8))
    bad = {"3": {"class_type": "LoadLatent", "inputs": {"latent": "../../x.latent"}},
           "4": load["4"]}
    with pytest.raises(PromptValidationError) as info:
        run_workflow(bad, registry=builtin_registry(models=False), context=context)
    assert "'..'" in info.value.result.node_errors["3"]["errors"][0]["message"]


# ---- tiling -------------------------------------------------------------------------------


def test_tiled_map_of_a_local_operation_is_exact():
    """Average pooling (encode-like) and nearest upsampling (decode-like) act on each grid
    unit alone, so overlapping tiles agree and blending must give the global result."""
    x = torch.randn(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    down = tiled_map(x, lambda t: F.avg_pool2d(t, 4), tile=4, lap=1, scale_in=4, scale_out=1)
    torch.testing.assert_close(down, F.avg_pool2d(x, 4), rtol=0, atol=1e-6)
    up = tiled_map(x, lambda t: F.interpolate(t, scale_factor=2), tile=16, lap=4, scale_in=1,
                   scale_out=2)
    torch.testing.assert_close(up, F.interpolate(x, scale_factor=2), rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_vae(models):
    return VaeValue.of(load_checkpoint(models / "checkpoints" / SD1_NAME, hash_file=False).vae,
                       "v")


def _correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def test_vae_encode_tiled_against_vae_encode(tiny_vae):
    """The tiny VAE downsamples by 2: a 96 x 80 image has 48 x 40 latents; 64-pixel tiles
    with a 32-pixel overlap (16 latent pixels, capped at a quarter tile: 8) make 2 x 2 tiles."""
    g = torch.Generator().manual_seed(0)
    pixels = F.interpolate(torch.rand(1, 3, 12, 10, generator=g), size=(96, 80),
                           mode="bilinear").movedim(1, -1)
    whole = VAEEncode.execute(pixels, tiny_vae)[0]["samples"]
    assert whole.shape == (1, 4, 48, 40)
    covering = VAEEncodeTiled.execute(pixels, tiny_vae, 128, 64)[0]["samples"]
    assert torch.equal(covering, whole)  # one tile: the plain encode
    tiled = VAEEncodeTiled.execute(pixels, tiny_vae, 64, 32)[0]["samples"]
    assert tiled.shape == whole.shape and not torch.equal(tiled, whole)
    # Each tile's encoder (GroupNorm statistics, mid-block attention) sees only its tile, so
    # this random-weight VAE gives ~0.20 mean relative difference, correlation ~0.976; a
    # latent misplaced by one pixel would be at ~0.51 and ~0.86.
    err = float((tiled - whole).abs().mean() / whole.abs().mean())
    assert err < 0.3 and _correlation(tiled, whole) > 0.95, (err, _correlation(tiled, whole))
    odd = pixels[:, :35, :33]  # cropped (centred) to a multiple of 2 first, as VAEEncode
    plain_odd = VAEEncode.execute(odd, tiny_vae)[0]["samples"]
    assert plain_odd.shape == (1, 4, 17, 16)
    assert torch.equal(VAEEncodeTiled.execute(odd, tiny_vae, 64, 32)[0]["samples"], plain_odd)


# ---- ModelSamplingDiscrete and RescaleCFG on a tiny SD1 checkpoint -----------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    return write_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def engine():
    return Engine(device="cpu")


@pytest.fixture(scope="module")
def context(models, tmp_path_factory, engine):
    return make_context(models, tmp_path_factory.mktemp("run"), engine)


SEED, STEPS = 11, 2


def _prompt() -> dict:
    return txt2img_prompt(seed=SEED, steps=STEPS, sampler="euler")


def _run(prompt, context):
    return run_workflow_result(prompt, registry=registry(), context=context)


@pytest.fixture(scope="module")
def plain(context):
    """The default workflow without model patches (run once for the module)."""
    return _run(_prompt(), context)


def _model(context):
    node = NodeContext("4", "t", context, lambda *a: None)
    return CheckpointLoaderSimple.execute(SD1_NAME, context=node)


def test_model_sampling_discrete_overrides_the_family(context):
    model, _, _ = _model(context)
    (v,) = ModelSamplingDiscrete.execute(model, "v_prediction", True)
    assert (v.bundle.family.prediction, v.bundle.family.zero_terminal_snr) == ("v", True)
    assert v.bundle.unet is model.bundle.unet  # the same weights
    assert (model.bundle.family.prediction, model.bundle.family.zero_terminal_snr) == (
        "eps", False)  # the input MODEL is unchanged
    (sigmas,) = BasicScheduler.execute(v, "normal", 4, 1.0)
    assert float(sigmas[0]) == pytest.approx(math.sqrt((1 - ZERO_SNR_ALPHA_BAR)
                                                       / ZERO_SNR_ALPHA_BAR))
    (x0,) = ModelSamplingDiscrete.execute(v, "x0", False)
    assert (x0.bundle.family.prediction, x0.bundle.family.zero_terminal_snr) == ("x0", False)


@pytest.mark.parametrize("choice", ["lcm", "img_to_img", "edm"])
def test_model_sampling_discrete_refuses_what_it_cannot_honour(context, choice):
    model, _, _ = _model(context)
    with pytest.raises(ValueError, match="choose one of: eps, v_prediction, x0"):
        ModelSamplingDiscrete.execute(model, choice, False)
    problem = ModelSamplingDiscrete.validate_inputs(None, model=None, sampling=choice)
    assert choice in problem["sampling"] and "eps, v_prediction, x0" in problem["sampling"]
    prompt = txt2img_prompt(steps=1)
    prompt["40"] = {"class_type": "ModelSamplingDiscrete",
                    "inputs": {"model": ["4", 0], "sampling": choice, "zsnr": False}}
    prompt["3"]["inputs"]["model"] = ["40", 0]
    with pytest.raises(PromptValidationError) as info:
        run_workflow(prompt, registry=registry(), context=context)
    assert "v_prediction" in info.value.result.node_errors["40"]["errors"][0]["message"]


def test_model_sampling_discrete_drives_ksampler_like_the_engine(models, context, engine,
                                                                 plain):
    """KSampler on ModelSamplingDiscrete(v_prediction, zsnr) equals generate_image on the
    same checkpoint registered with its family overridden the same way."""
    prompt = _prompt()
    prompt["40"] = {"class_type": "ModelSamplingDiscrete",
                    "inputs": {"model": ["4", 0], "sampling": "v_prediction", "zsnr": True}}
    prompt["3"]["inputs"]["model"] = ["40", 0]
    run = _run(prompt, context)
    bundle = load_checkpoint(models / "checkpoints" / SD1_NAME, hash_file=False)
    family = bundle.family.with_overrides(prediction="v", zero_terminal_snr=True)
    engine.register("tiny_sd1_vzsnr", replace(bundle, family=family))
    ref = generate_image("a red cat", negative_prompt="ugly", model="tiny_sd1_vzsnr",
                         steps=STEPS, cfg_scale=7.5, seed=SEED, sampler="euler", width=PIXELS,
                         height=PIXELS, engine=engine)
    got = to_uint8(run.values["8"][0])[0]
    np.testing.assert_array_equal(got, np.asarray(ref))
    assert not torch.allclose(run.values["3"][0]["samples"], plain.values["3"][0]["samples"],
                              atol=1e-3)


def _texts(clip):
    return [CLIPTextEncode.execute(t, clip)[0] for t in ("a red cat", "ugly")]


def _comfy_rescale_by_hand(x0_c, x0_u, x, sigma, cond_scale, multiplier):
    """ComfyUI's rescale_cfg, line by line (its args: cond = x - x0_c, uncond = x - x0_u)."""
    cond, uncond, x_orig = x - x0_c, x - x0_u, x
    s = sigma.view(-1, 1, 1, 1)
    xs = x_orig / (s * s + 1.0)
    cond = ((xs - (x_orig - cond)) * (s**2 + 1.0) ** 0.5) / s
    uncond = ((xs - (x_orig - uncond)) * (s**2 + 1.0) ** 0.5) / s
    x_cfg = uncond + cond_scale * (cond - uncond)
    ro_pos = torch.std(cond, dim=(1, 2, 3), keepdim=True)
    ro_cfg = torch.std(x_cfg, dim=(1, 2, 3), keepdim=True)
    x_final = multiplier * (x_cfg * (ro_pos / ro_cfg)) + (1.0 - multiplier) * x_cfg
    returned = x_orig - (xs - x_final * s / (s * s + 1.0) ** 0.5)
    return x - returned  # ComfyUI's cfg_result = x - sampler_cfg_function(args)


@torch.no_grad()
def test_rescale_cfg_is_comfyuis_formula(context):
    loaded = _model(context)
    model = loaded[0]
    pos, neg = _texts(loaded[1])
    shape = (2, 4, 8, 8)
    cond = entry_cond(model.bundle, pos[0], 16, 16)
    uncond = entry_cond(model.bundle, neg[0], 16, 16, negative=True)
    x0_c_of = guided_denoiser(model.bundle, Conditioning(cond, cond), 1.0)
    # cond and uncond x0 from one batched pass (float32 differences between batched and
    # one-by-one U-Net calls reach 1e-4 after CFG 6 at sigma 14, so compare like with like)
    pair = guided_denoiser(model.bundle, Conditioning(cond, uncond), 1.0).with_uncond
    run = Run(model.bundle, torch.device("cpu"), [torch.Generator().manual_seed(0)] * 2)
    (rescaled,) = RescaleCFG.execute(model, 0.7)
    assert rescaled.cfg_rescale == 0.7 and model.cfg_rescale == 0.0
    den = guider_denoiser(Guider(rescaled, pos, neg, 6.0), run, torch.Size(shape))
    engine_rescale = guided_denoiser(model.bundle, Conditioning(cond, uncond), 6.0, 0.7)
    plain_cfg = guider_denoiser(Guider(model, pos, neg, 6.0), run, torch.Size(shape))
    g = torch.Generator().manual_seed(5)
    for sigma in (14.0, 2.5, 0.3):
        x = torch.randn(shape, generator=g) * sigma + torch.randn(shape, generator=g)
        s = torch.full((2,), sigma)
        x0_c, x0_u = pair(x, s)
        torch.testing.assert_close(x0_c, x0_c_of(x, s), rtol=1e-4, atol=1e-4)
        expected = _comfy_rescale_by_hand(x0_c, x0_u, x, s, 6.0, 0.7)
        got = den(x, s)
        # float32 rounding of the two v conversions with |x| up to ~50 at sigma 14
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=5e-5)
        assert not torch.allclose(got, plain_cfg(x, s), rtol=1e-3, atol=1e-3)
        # the engine's guidance_rescale matches eps, not v, standard deviations
        assert not torch.allclose(got, engine_rescale(x, s), rtol=1e-3, atol=1e-3)
    x = torch.randn(shape, generator=g) * 3
    s = torch.full((2,), 3.0)
    off = guider_denoiser(Guider(RescaleCFG.execute(model, 0.0)[0], pos, neg, 6.0), run,
                          torch.Size(shape))
    assert torch.equal(off(x, s), plain_cfg(x, s))  # multiplier 0: plain CFG
    cfg1 = guider_denoiser(Guider(rescaled, pos, neg, 1.0), run, torch.Size(shape))
    torch.testing.assert_close(cfg1(x, s), x0_c_of(x, s), rtol=1e-5, atol=1e-5)


def test_rescale_cfg_reaches_ksampler_and_cfg_guider(context, plain):
    rescale = {"class_type": "RescaleCFG", "inputs": {"model": ["4", 0], "multiplier": 0.7}}
    ks = _prompt()
    ks["41"] = rescale
    ks["3"]["inputs"]["model"] = ["41", 0]
    custom = _prompt()
    custom["41"] = rescale
    custom["30"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": SEED}}
    custom["31"] = {"class_type": "CFGGuider", "inputs": {
        "model": ["41", 0], "positive": ["6", 0], "negative": ["7", 0], "cfg": 7.5}}
    custom["32"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    custom["33"] = {"class_type": "BasicScheduler", "inputs": {
        "model": ["41", 0], "scheduler": "normal", "steps": STEPS, "denoise": 1.0}}
    custom["3"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["30", 0], "guider": ["31", 0], "sampler": ["32", 0], "sigmas": ["33", 0],
        "latent_image": ["5", 0]}}
    got = _run(ks, context).values["3"][0]["samples"]
    assert torch.equal(_run(custom, context).values["3"][0]["samples"], got)
    assert not torch.allclose(got, plain.values["3"][0]["samples"], atol=1e-3)


def test_model_settings_survive_a_lora(context):
    """ModelSamplingDiscrete and RescaleCFG compose, and a LoRA applied after them keeps both
    (ComfyUI's model.clone() keeps its patches)."""
    loras = context.resources["models"].paths("loras")[0]
    loras.mkdir(parents=True, exist_ok=True)
    write_kohya_lora(loras / "u.safetensors", "sd1", text=False)
    (patched,) = ModelSamplingDiscrete.execute(*RescaleCFG.execute(_model(context)[0], 0.4),
                                               "v_prediction", False)
    assert patched.cfg_rescale == 0.4 and patched.bundle.family.prediction == "v"
    node = NodeContext("80", "t", context, lambda *a: None)
    (lora,) = LoraLoaderModelOnly.execute(patched, "u.safetensors", 1.0, context=node)
    assert lora.cfg_rescale == 0.4 and lora.bundle.family.prediction == "v"
    assert lora.loras == (("u.safetensors", 1.0),) and lora.bundle.unet is not patched.bundle.unet
