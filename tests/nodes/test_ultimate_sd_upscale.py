"""UltimateSDUpscale (ssitu/ComfyUI_UltimateSDUpscale's node) on a tiny random SD1 checkpoint
and a tiny 2x ESRGAN in the RRDBNet layout: the schema, the output size, tiles sampled by the
KSampler node with one seed for every tile, the tile order and seam-fix regions (a recording
sampler, no model), denoise 0 giving back the plain upscale, an API-format graph end to end,
and the refusals.

The graph's widgets need tiles of at least 64 px (a 32x32 latent for the tiny VAE, which
downsamples by 2, slow on a busy CPU), so most tests call ``execute`` directly with 16 px
tiles; the geometry scales."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from noisecraft.graph import run_workflow_result, ui_to_api
from noisecraft.graph.context import NodeContext
from noisecraft.graph.executor import NodeExecutionError
from noisecraft.graph.validate import PromptValidationError
from noisecraft.nodes.control import ControlNetApplyAdvanced
from noisecraft.nodes.image import ImageScale
from noisecraft.nodes.model_values import VaeValue
from noisecraft.nodes.samplers import KSampler
from noisecraft.nodes.sampling import BasicScheduler, SamplerChoice
from noisecraft.nodes.ultimate_sd_upscale import (
    UltimateSDUpscale,
    UltimateSDUpscaleCustomSample,
    UltimateSDUpscaleNoUpscale,
    tile_conditioning,
)
from noisecraft.nodes.upscale import ImageUpscaleWithModel
from noisecraft.nodes.usdu_tiles import TileSettings, redraw_and_fix_seams
from noisecraft.nodes.vae import VAEDecode, VAEEncode
from tests.fixtures.checkpoints import tiny_spec
from tests.fixtures.controlnet import tiny_controlnet
from tests.nodes.test_model_nodes_support import SD1_NAME, make_context, registry, write_models
from tests.test_upscalers import _SequentialESRGAN

UPSCALER = "2x_tiny_esrgan.safetensors"
SOURCES = {"src16.png": (16, 16), "src16x8.png": (16, 8), "src32.png": (32, 32),
           "src20x12.png": (20, 12)}
REAL_INPUTS = [  # ssitu/ComfyUI_UltimateSDUpscale v1.7.1, usdu_nodes.USDU_base_inputs
    "image", "model", "positive", "negative", "vae", "upscale_by", "seed", "steps", "cfg",
    "sampler_name", "scheduler", "denoise", "upscale_model", "mode_type", "tile_width",
    "tile_height", "mask_blur", "tile_padding", "seam_fix_mode", "seam_fix_denoise",
    "seam_fix_width", "seam_fix_mask_blur", "seam_fix_padding", "force_uniform_tiles",
    "tiled_decode", "batch_size"]
SMALL = dict(upscale_by=2.0, seed=5, steps=1, cfg=1.0, sampler_name="euler",
             scheduler="normal", denoise=0.5, mode_type="Linear", tile_width=16,
             tile_height=16, mask_blur=4, tile_padding=8, seam_fix_mode="None",
             seam_fix_denoise=1.0, seam_fix_width=8, seam_fix_mask_blur=4, seam_fix_padding=8,
             force_uniform_tiles=True, tiled_decode=False)


def _gradient(width: int, height: int) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // width, yy * 255 // height, (xx * yy) % 97 + 60],
                    -1).astype(np.uint8)


@pytest.fixture(scope="module")
def context(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("usdu")
    models = write_models(tmp / "models")
    (models / "upscale_models").mkdir()
    save_file(_SequentialESRGAN(1, nb=1).state_dict(), models / "upscale_models" / UPSCALER)
    ctx = make_context(models, tmp)
    for name, size in SOURCES.items():
        Image.fromarray(_gradient(*size)).save(ctx.input_dir / name)
    return ctx


def _prompt(source: str = "src32.png", node: str = "UltimateSDUpscale", **usdu) -> dict:
    inputs = {"image": ["1", 0], "model": ["4", 0], "positive": ["6", 0],
              "negative": ["7", 0], "vae": ["4", 2], "upscale_model": ["2", 0],
              **SMALL, "tile_width": 64, "tile_height": 64, "cfg": 7.0, **usdu}
    if node == "UltimateSDUpscaleNoUpscale":
        inputs["upscaled_image"] = inputs.pop("image")
        del inputs["upscale_model"], inputs["upscale_by"]
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": source}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": UPSCALER}},
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD1_NAME}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red cat", "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly", "clip": ["4", 1]}},
        "10": {"class_type": node, "inputs": inputs},
        "11": {"class_type": "PreviewImage", "inputs": {"images": ["10", 0]}},
    }


def _run(prompt, context):
    return run_workflow_result(prompt, registry=registry(), context=context)


@pytest.fixture(scope="module")
def values(context):
    """MODEL, CONDITIONING, VAE and UPSCALE_MODEL values, from a graph that samples nothing."""
    run = _run(_prompt(mode_type="None"), context)
    assert run.status == "success", run.error
    return {"model": run.values["4"][0], "vae": run.values["4"][2],
            "positive": run.values["6"][0], "negative": run.values["7"][0],
            "upscale_model": run.values["2"][0]}


def _node_context(context) -> NodeContext:
    return NodeContext(node_id="10", prompt_id="test", execution=context,
                       emit=lambda name, data: None)


def _image(context, name: str) -> torch.Tensor:
    a = np.asarray(Image.open(context.input_dir / name), dtype=np.float32) / 255
    return torch.from_numpy(a)[None]


def _usdu(context, values, image, **settings) -> torch.Tensor:
    inputs = {**values, **SMALL, **settings}
    return UltimateSDUpscale.execute(image=image, context=_node_context(context), **inputs)[0]


def test_schema_is_the_real_nodes():
    info = UltimateSDUpscale.schema.object_info()
    names = [*info["input_order"]["required"], *info["input_order"]["optional"]]
    assert names == REAL_INPUTS
    assert (info["name"], info["display_name"], info["category"], info["output"]) == (
        "UltimateSDUpscale", "Ultimate SD Upscale", "image/upscaling", ["IMAGE"])
    req = info["input"]["required"]
    assert req["upscale_model"] == ["UPSCALE_MODEL", req["upscale_model"][1]]
    assert req["mode_type"][0] == ["Linear", "Chess", "None"]
    assert req["seam_fix_mode"][0] == ["None", "Band Pass", "Half Tile",
                                       "Half Tile + Intersections"]
    defaults = {k: v[1].get("default") for k, v in {**req, **info["input"]["optional"]}.items()
                if len(v) > 1}
    assert {k: defaults[k] for k in (
        "upscale_by", "seed", "steps", "cfg", "denoise", "tile_width", "tile_height",
        "mask_blur", "tile_padding", "seam_fix_denoise", "seam_fix_width",
        "seam_fix_mask_blur", "seam_fix_padding", "force_uniform_tiles", "tiled_decode",
        "batch_size")} == {
        "upscale_by": 2, "seed": 0, "steps": 20, "cfg": 8.0, "denoise": 0.2,
        "tile_width": 512, "tile_height": 512, "mask_blur": 8, "tile_padding": 32,
        "seam_fix_denoise": 1.0, "seam_fix_width": 64, "seam_fix_mask_blur": 8,
        "seam_fix_padding": 16, "force_uniform_tiles": True, "tiled_decode": False,
        "batch_size": 1}
    assert (req["upscale_by"][1]["min"], req["upscale_by"][1]["max"]) == (0.05, 4)
    no_up = UltimateSDUpscaleNoUpscale.schema.object_info()
    assert no_up["input_order"]["required"][0] == "upscaled_image"
    assert not {"upscale_by", "upscale_model", "image"} & set(no_up["input"]["required"])
    assert {"UltimateSDUpscale", "UltimateSDUpscaleNoUpscale",
            "UltimateSDUpscaleCustomSample"} <= set(registry())


def test_editor_workflows_saved_without_batch_size_convert():
    """The widget values of the real repository's example workflow (20: saved before
    batch_size existed) land on the right inputs; batch_size takes its default."""
    widgets = [2, 0, "fixed", 20, 6, "deis", "beta", 0.2, "Chess", 512, 512, 8, 32, "None", 1,
               64, 8, 16, True, False]
    workflow = {"nodes": [{"id": 17, "type": "UltimateSDUpscale", "mode": 0, "inputs": [],
                           "outputs": [], "widgets_values": widgets}], "links": []}
    inputs = ui_to_api(workflow, registry())["17"]["inputs"]
    assert inputs == {"upscale_by": 2, "seed": 0, "steps": 20, "cfg": 6,
                      "sampler_name": "deis", "scheduler": "beta", "denoise": 0.2,
                      "mode_type": "Chess", "tile_width": 512, "tile_height": 512,
                      "mask_blur": 8, "tile_padding": 32, "seam_fix_mode": "None",
                      "seam_fix_denoise": 1, "seam_fix_width": 64, "seam_fix_mask_blur": 8,
                      "seam_fix_padding": 16, "force_uniform_tiles": True,
                      "tiled_decode": False, "batch_size": 1}


@pytest.mark.parametrize(("source", "scale", "size"), [
    ("src32.png", 2.0, (64, 64)),    # the 2x model, no resize
    ("src20x12.png", 1.5, (32, 16)),  # 30 x 18 -> nearest multiples of 8
    ("src20x12.png", 1.0, (16, 16)),  # 20 / 8 = 2.5 rounds to even (Python's round)
    ("src32.png", 0.5, (16, 16)),    # shrinking: Lanczos only
])
def test_output_size_is_upscale_by_rounded_to_8(context, source, scale, size):
    """mode_type None, seam fix None: the upscale step alone, which is ImageUpscaleWithModel
    (when enlarging), then Lanczos to the size (ImageScale's lanczos)."""
    run = _run(_prompt(source, mode_type="None", upscale_by=scale), context)
    (out,) = run.values["10"]
    assert tuple(out.shape) == (1, size[1], size[0], 3)
    image = _image(context, source)
    if scale > 1:
        (image,) = ImageUpscaleWithModel.execute(run.values["2"][0], image)
    (want,) = ImageScale.execute(image, "lanczos", size[0], size[1], "disabled") \
        if image.shape[1:3] != (size[1], size[0]) else (image,)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_graph_end_to_end_one_tile_is_vae_encode_ksampler_vae_decode(context):
    """An API-format graph: LoadImage -> UltimateSDUpscale (one 64 px tile, no padding or
    blur) -> PreviewImage gives what the ComfyUI chain ImageUpscaleWithModel -> VAEEncode ->
    KSampler -> VAEDecode gives with the same settings."""
    prompt = _prompt(tile_padding=0, mask_blur=0, denoise=0.5, steps=1)
    prompt.update({
        "20": {"class_type": "ImageUpscaleWithModel",
               "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "21": {"class_type": "VAEEncode", "inputs": {"pixels": ["20", 0], "vae": ["4", 2]}},
        "22": {"class_type": "KSampler", "inputs": {
            "model": ["4", 0], "seed": SMALL["seed"], "steps": 1, "cfg": 7.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["6", 0],
            "negative": ["7", 0], "latent_image": ["21", 0], "denoise": 0.5}},
        "23": {"class_type": "VAEDecode", "inputs": {"samples": ["22", 0], "vae": ["4", 2]}},
        "24": {"class_type": "PreviewImage", "inputs": {"images": ["23", 0]}},
    })
    run = _run(prompt, context)
    assert run.status == "success", run.error
    (out,), (want,) = run.values["10"], run.values["23"]
    assert tuple(out.shape) == (1, 64, 64, 3)
    torch.testing.assert_close(out, want.clamp(0, 1), rtol=0, atol=1e-6)
    assert float((out - run.values["20"][0]).abs().mean()) > 0.01  # the tile was redrawn


def test_every_tile_uses_the_same_seed_and_runs_are_deterministic(context, values):
    """Two tiles side by side, no padding or blur: each half is KSampler's output for that
    crop with the node's seed (not seed + k), and a second run gives the same pixels."""
    image = _image(context, "src16x8.png")
    out = _usdu(context, values, image, tile_padding=0, mask_blur=0, seed=7)
    assert tuple(out.shape) == (1, 16, 32, 3)
    torch.testing.assert_close(_usdu(context, values, image, tile_padding=0, mask_blur=0,
                                     seed=7), out, rtol=0, atol=0)
    (big,) = ImageUpscaleWithModel.execute(values["upscale_model"], image)

    def tile(x: int, seed: int) -> torch.Tensor:
        (latent,) = VAEEncode.execute(big[:, :, x:x + 16], values["vae"])
        (latent,) = KSampler.execute(values["model"], seed, 1, 1.0, "euler", "normal",
                                     values["positive"], values["negative"], latent, 0.5,
                                     context=_node_context(context))
        return VAEDecode.execute(latent, values["vae"])[0].clamp(0, 1)

    torch.testing.assert_close(out[:, :, :16], tile(0, 7), rtol=0, atol=1e-6)
    torch.testing.assert_close(out[:, :, 16:], tile(16, 7), rtol=0, atol=1e-6)
    assert float((out[:, :, 16:] - tile(16, 8)).abs().max()) > 0.05
    assert float((_usdu(context, values, image, tile_padding=0, mask_blur=0, seed=8)
                  - out).abs().max()) > 0.05


def test_custom_sample_variant(context, values):
    """Given a SAMPLER and SIGMAS saying what KSampler's widgets say, the Custom Sample variant
    is UltimateSDUpscale (its sampler_name / steps widgets are then unused); without an
    upscale model it enlarges with Lanczos."""
    image, node_context = _image(context, "src16x8.png"), _node_context(context)
    want = _usdu(context, values, image, tile_padding=0, mask_blur=0)
    (sigmas,) = BasicScheduler.execute(values["model"], "normal", 1, 0.5)
    inputs = {**values, **SMALL, "tile_padding": 0, "mask_blur": 0, "steps": 9,
              "sampler_name": "dpmpp_2m"}
    (out,) = UltimateSDUpscaleCustomSample.execute(
        image=image, custom_sampler=SamplerChoice("euler"), custom_sigmas=sigmas,
        context=node_context, **inputs)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    del inputs["upscale_model"]
    (plain,) = UltimateSDUpscaleCustomSample.execute(image=image, context=node_context,
                                                     **{**inputs, "mode_type": "None"})
    torch.testing.assert_close(plain, ImageScale.execute(image, "lanczos", 32, 16, "disabled")[0],
                               rtol=0, atol=1e-6)


def _record(settings: TileSettings, size=(128, 96)):
    """The regions and sampling sizes a run asks for, with a sampler that returns its input."""
    calls = []

    def sampler(crops, tiles):
        calls.append(([t.region for t in tiles], (crops.shape[2], crops.shape[1])))
        return crops

    image = torch.rand(1, size[1], size[0], 3)
    out = redraw_and_fix_seams(image, settings, sampler)
    return calls, image, out


def _settings(**kw) -> TileSettings:
    base = dict(mode="Linear", tile=(64, 64), padding=16, mask_blur=8, seam_fix_mode="None",
                seam_fix_width=32, seam_fix_padding=16, seam_fix_mask_blur=8, uniform=True)
    return TileSettings(**{**base, **kw})


def test_tile_order_and_regions():
    """128x96 in 64 px tiles: 2 x 2; padding 16 grows each crop to 80 px (the sampling size,
    64 + 16) and the bottom row's crops move up to stay 80 px tall.  Chess: the white squares
    (0, 0), (1, 1) first, then (1, 0), (0, 1)."""
    tl, tr, bl, br = (0, 0, 80, 80), (48, 0, 128, 80), (0, 16, 80, 96), (48, 16, 128, 96)
    linear, image, out = _record(_settings())
    assert linear == [([r], (80, 80)) for r in (tl, tr, bl, br)]
    assert torch.allclose(out, image, atol=1e-6)  # sampler changed nothing: no trace of tiles
    chess, _, _ = _record(_settings(mode="Chess"))
    assert [c[0][0] for c in chess] == [tl, br, tr, bl]
    batched, _, _ = _record(_settings(batch_size=3))
    assert batched == [([tl, tr, bl], (80, 80)), ([br], (80, 80))]
    ragged, _, _ = _record(_settings(uniform=False))  # the crop only, rounded up to 8
    assert ragged == [([tl], (80, 80)), ([(48, 0, 128, 80)], (80, 80)),
                      ([(0, 48, 80, 96)], (80, 48)), ([(48, 48, 128, 96)], (80, 48))]
    assert _record(_settings(mode="None"))[0] == []


@pytest.mark.parametrize(("mode", "jobs"), [("Band Pass", 2), ("Half Tile", 4),
                                            ("Half Tile + Intersections", 5)])
def test_seam_fix_jobs(mode, jobs):
    calls, _, _ = _record(_settings(mode="None", seam_fix_mode=mode))
    assert len(calls) == jobs
    if mode == "Band Pass":  # a 32 px band over x = 64 (the whole height), then over y = 64
        (vertical,), size_v = calls[0]
        (horizontal,), size_h = calls[1]
        assert size_v == (32 + 2 * 16, 96) and size_h == (128, 64)
        assert vertical[1::2] == (0, 96) and abs((vertical[0] + vertical[2]) / 2 - 64) <= 1
        assert horizontal[::2] == (0, 128) and abs((horizontal[1] + horizontal[3]) / 2 - 64) <= 1
    else:
        assert all(size == (64, 64) for _, size in calls)


class _IdentityVAE(nn.Module):
    """Latents = the pixels plus a zero channel at full size: decode(encode(x)) == x."""

    config = SimpleNamespace(downscale_factor=1)

    def __init__(self) -> None:
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def encode(self, x):
        z = torch.cat([x, torch.zeros_like(x[:, :1])], 1)
        return SimpleNamespace(mode=lambda: z)

    def decode(self, z):
        return z[:, :3]


@pytest.mark.parametrize(("mode", "seam_fix", "max_err", "mean_err"), [
    ("Linear", "None", 1e-6, 1e-6), ("Chess", "None", 1e-6, 1e-6),
    ("Linear", "Band Pass", 1e-6, 1e-6), ("Chess", "Half Tile + Intersections", 0.25, 0.02)])
def test_denoise_zero_gives_back_the_plain_upscale(context, values, mode, seam_fix, max_err,
                                                   mean_err):
    """denoise 0 leaves each tile's latent as it is; with a VAE that encodes and decodes
    exactly, the redrawn regions blend back into the plain upscale.  Exactly (1e-6) when each
    crop is sampled at its own size: the 2 x 2 redraw tiles (tile + padding on the two inner
    sides) and the bands (band + 2 x padding).  The Half Tile crops (tile + 2 x padding) are
    sampled at the tile size, as in the real node, so they go through a Lanczos shrink and
    enlarge: on this noisy random-ESRGAN image that costs up to 0.20 (of 1), 0.013 on average
    (measured; bounds 0.25 / 0.02), where a plain 2x Lanczos round trip of the image costs
    0.52 / 0.035."""
    image = _image(context, "src16.png")
    vae = VaeValue.of(_IdentityVAE(), "identity")
    out = _usdu(context, {**values, "vae": vae}, image, denoise=0.0, mode_type=mode,
                seam_fix_mode=seam_fix)
    (big,) = ImageUpscaleWithModel.execute(values["upscale_model"], image)
    err = (out - big).abs()
    assert float(err.max()) <= max_err and float(err.mean()) <= mean_err


def test_control_images_are_cropped_to_each_tile():
    @dataclass(frozen=True)
    class Spec:
        image: torch.Tensor

    hint = torch.arange(2 * 8 * 16, dtype=torch.float32).reshape(1, 2, 8, 16)
    tiles = [SimpleNamespace(region=(16, 0, 32, 16)), SimpleNamespace(region=(0, 0, 16, 16))]
    ((_, opts),) = tile_conditioning([[torch.zeros(1), {"control": (Spec(hint),)}]], tiles,
                                     canvas=(32, 16), size=(8, 8), images=1, side="positive")
    (spec,) = opts["control"]
    assert tuple(spec.image.shape) == (2, 2, 8, 8)  # one crop per tile, at the sampling size
    torch.testing.assert_close(spec.image[0], hint[0, :, :, 8:])  # canvas x 16..32 = hint 8..16
    torch.testing.assert_close(spec.image[1], hint[0, :, :, :8])


def test_a_controlnet_guides_every_tile(context, values):
    """A tiny ControlNet given the whole upscaled image (a ControlNet-tile workflow): every
    tile samples with its crop of it, and the result differs from the run without it."""
    image = _image(context, "src16x8.png")
    (big,) = ImageUpscaleWithModel.execute(values["upscale_model"], image)
    net = tiny_controlnet(tiny_spec("sd1").unet, seed=4, gain=2.0)
    pos, neg = ControlNetApplyAdvanced.execute(values["positive"], values["negative"], net,
                                               big, 1.0, 0.0, 1.0)
    plain = _usdu(context, values, image)
    guided = _usdu(context, {**values, "positive": pos, "negative": neg}, image)
    assert guided.shape == plain.shape and float((guided - plain).abs().max()) > 0.01


def _failure(prompt, context) -> str:
    with pytest.raises(NodeExecutionError) as e:
        _run(prompt, context)
    assert e.value.details["node_id"] == "10"
    return e.value.details["exception_message"]


def test_refusals_are_clear(context):
    with pytest.raises(PromptValidationError) as e:
        _run(_prompt(seam_fix_mode="Half Tile + Corners"), context)
    text = str(e.value.result.as_response())
    assert "Half Tile + Corners" in text and "Band Pass" in text and "seam_fix_mode" in text
    message = _failure(_prompt(batch_size=2, force_uniform_tiles=False), context)
    assert message.startswith("UltimateSDUpscale: batch_size 2 needs force_uniform_tiles")
    message = _failure(_prompt(seam_fix_mode="Band Pass", seam_fix_width=0), context)
    assert "seam_fix_mode 'Band Pass' needs seam_fix_width > 0" in message
    area = _prompt()
    area["8"] = {"class_type": "ConditioningSetArea", "inputs": {
        "conditioning": ["6", 0], "width": 64, "height": 64, "x": 0, "y": 0, "strength": 1.0}}
    area["10"]["inputs"]["positive"] = ["8", 0]
    message = _failure(area, context)
    assert ("UltimateSDUpscale: the positive conditioning carries an area "
            "(ConditioningSetArea)") in message
    with pytest.raises(ValueError, match="unknown mode_type 'Diagonal'; choose one of: "
                                         "Linear, Chess, None"):
        TileSettings("Diagonal", (64, 64), 0, 0, "None", 64, 16, 8, True).check()


def test_no_upscale_variant_only_rounds_the_size(context):
    run = _run(_prompt("src20x12.png", node="UltimateSDUpscaleNoUpscale", mode_type="None"),
               context)
    assert tuple(run.values["10"][0].shape) == (1, 16, 16, 3)  # 20 x 12 -> multiples of 8
