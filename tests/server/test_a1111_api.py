"""AUTOMATIC1111's API, driven by the published ``webuiapi`` client, unmodified."""

from __future__ import annotations

import httpx
import pytest
import webuiapi
from PIL import Image

from tests.server.harness import MODEL, Server, write_tiny_model

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("a1111") / "data"
    write_tiny_model(data, tmp_path_factory.getbasetemp())
    with Server(data) as s:
        yield s


@pytest.fixture(scope="module")
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=2)


def test_options_and_model_list(api, server):
    assert [m["title"] for m in api.get_sd_models()] == [MODEL]
    api.set_options({"sd_model_checkpoint": MODEL})
    assert api.get_options()["sd_model_checkpoint"] == MODEL
    r = httpx.post(server.url + "/sdapi/v1/options", json={"sd_model_checkpoint": "../x.ckpt"})
    assert r.status_code == 400 and "unknown model" in r.json()["detail"]
    assert "Euler a" in [s["name"] for s in api.get_samplers()]
    assert "karras" in [s["name"] for s in api.get_schedulers()]
    assert api.get_loras() == []
    assert api.get_progress()["state"]["job_count"] == 0


def test_txt2img_and_png_info(api):
    api.set_options({"sd_model_checkpoint": MODEL})
    result = api.txt2img(prompt="a red circle", negative_prompt="blurry", seed=3, width=64,
                         height=64, cfg_scale=5)
    assert result.image.size == (64, 64)
    assert result.info["all_seeds"] == [3] and result.info["sampler_name"] == "Euler a"
    text = result.image.info["parameters"]
    assert text.startswith("a red circle\nNegative prompt: blurry\n")
    assert "Seed: 3" in text and "Sampler: Euler a" in text and "Size: 64x64" in text
    info = api.png_info(result.image)
    assert info.info == text
    again = api.txt2img(prompt="a red circle", negative_prompt="blurry", seed=3, width=64,
                        height=64, cfg_scale=5)
    assert again.image.tobytes() == result.image.tobytes()


def test_img2img_with_mask_changes_only_the_masked_area(api):
    api.set_options({"sd_model_checkpoint": MODEL})
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for full_res in (True, False):
        result = api.img2img(images=[init], mask_image=mask, prompt="a blue square", seed=4,
                             width=64, height=64, denoising_strength=0.9, mask_blur=0,
                             inpainting_fill=1, inpaint_full_res=full_res,
                             inpaint_full_res_padding=8)
        out = result.image.convert("RGB")
        assert out.size == (64, 64)
        assert out.getpixel((2, 2)) == (200, 30, 30) or not full_res
        assert out.getpixel((32, 32)) != (200, 30, 30)
    plain = api.img2img(images=[init], prompt="x", seed=1, width=64, height=64,
                        denoising_strength=0.5)
    assert plain.image.size == (64, 64) and "Denoising strength: 0.5" in \
        plain.image.info["parameters"]


def test_bad_a1111_requests_are_4xx(server):
    url = server.url + "/sdapi/v1"
    assert httpx.post(url + "/txt2img", json={"steps": "many"}).status_code == 422
    r = httpx.post(url + "/txt2img", json={"sampler_name": "Nope"})
    assert r.status_code == 422 and "unknown sampler" in r.json()["detail"]
    r = httpx.post(url + "/txt2img", json={"width": 65, "height": 64, "steps": 1})
    assert r.status_code == 400 and "multiple of 8" in r.json()["detail"]
    r = httpx.post(url + "/img2img", json={"init_images": ["not base64!"]})
    assert r.status_code == 400 and "base64" in r.json()["detail"]
    r = httpx.post(url + "/png-info", json={"image": "aGVsbG8="})
    assert r.status_code == 400 and "not a readable image" in r.json()["detail"]


def test_img2img_sd_upscale_script_is_the_python_api(api, server):
    """A1111's "SD upscale" script (script_args [info, overlap, upscaler_index, scale_factor],
    tile = width x height) gives the image sd_upscale_image gives with the same settings."""
    import numpy as np
    import torch

    from noisecraft import sd_upscale_image
    from noisecraft.engine import Engine

    assert [u["name"] for u in api.get_upscalers()] == ["None", "Lanczos"]
    assert "sd upscale" in api.get_scripts()["img2img"]
    api.set_options({"sd_model_checkpoint": MODEL})
    yy, xx = np.mgrid[0:16, 0:32]
    init = Image.fromarray(np.stack([xx * 8, yy * 16, (xx + yy) * 5], -1).astype(np.uint8))
    result = api.img2img(images=[init], prompt="a red cat", seed=3, steps=2, width=32,
                         height=24, cfg_scale=7, denoising_strength=0.5, sampler_name="Euler",
                         script_name="sd Upscale", script_args=["", 8, 1, 2])
    assert result.image.size == (64, 32)
    text = result.image.info["parameters"]
    assert "Size: 32x24" in text and "SD upscale overlap: 8, SD upscale upscaler: Lanczos" in text
    assert result.info["extra_generation_params"]["SD upscale upscaler"] == "Lanczos"
    torch.set_num_threads(1)  # as the server's worker (OMP_NUM_THREADS=1)
    want = sd_upscale_image(init, "a red cat", model=str(server.data_dir / "models" /
                                                         "checkpoints" / MODEL),
                            scale=2, upscaler="lanczos", tile=(32, 24), overlap=8, strength=0.5,
                            steps=2, cfg_scale=7, seed=3, sampler="euler",
                            engine=Engine(device="cpu"))
    diff = np.abs(np.asarray(result.image.convert("RGB"), np.int16) - np.asarray(want, np.int16))
    assert diff.max() <= 1  # two processes: float rounding may move a value by one level


def test_bad_sd_upscale_requests_are_422(server):
    url = server.url + "/sdapi/v1/img2img"
    init = webuiapi.b64_img(Image.new("RGB", (32, 32)))
    body = {"init_images": [init], "width": 32, "height": 32, "script_name": "SD upscale"}
    for args, message in (([None, 32, 1, 2], "tile (32) must be larger than overlap (32)"),
                          ([None, 8, 9, 2], "is not an upscaler"),
                          ([None, 8, "lanczos", 0], "scale must be a number > 0")):
        r = httpx.post(url, json={**body, "script_args": args})
        assert r.status_code == 422 and message in r.json()["detail"], r.text
    r = httpx.post(url, json={**body, "script_name": "Loopback"})
    assert r.status_code == 422 and "Script 'Loopback' not found" in r.json()["detail"]


def test_ngms_override_settings_as_a1111(api, server):
    """``override_settings: {"s_min_uncond": x, "s_min_uncond_all": b}`` (A1111's NGMS options)
    reach the generation and its infotext; a threshold above every sigma on all steps is the
    conditional pass alone, i.e. the CFG-scale-1 image."""
    api.set_options({"sd_model_checkpoint": MODEL})
    args = dict(prompt="a red circle", negative_prompt="blurry", seed=3, width=64, height=64,
                cfg_scale=5, steps=3, sampler_name="Euler")
    plain = api.txt2img(**args)
    skipped = api.txt2img(**args, override_settings={"s_min_uncond": 1000,
                                                     "s_min_uncond_all": True})
    assert "NGMS" not in plain.image.info["parameters"]
    assert "NGMS: 1000.0, NGMS all steps: True" in skipped.image.info["parameters"]
    assert skipped.info["extra_generation_params"]["NGMS"] == 1000.0
    assert skipped.image.tobytes() != plain.image.tobytes()
    assert skipped.image.tobytes() == api.txt2img(**{**args, "cfg_scale": 1}).image.tobytes()
    init = Image.new("RGB", (64, 64), (200, 30, 30))
    again = api.img2img(images=[init], prompt="x", seed=1, width=64, height=64,
                        denoising_strength=0.5, override_settings={"s_min_uncond": 2.5})
    assert "NGMS: 2.5" in again.image.info["parameters"]
    assert "NGMS all steps" not in again.image.info["parameters"]
    url = server.url + "/sdapi/v1"
    r = httpx.post(url + "/txt2img", json={**args, "override_settings": {"s_min_uncond": -1}})
    assert r.status_code == 422 and "override_settings.s_min_uncond (NGMS" in r.json()["detail"]
    r = httpx.post(url + "/options", json={"s_min_uncond_all": "yes"})
    assert r.status_code == 422 and "must be true or false" in r.json()["detail"]
    assert api.get_options()["s_min_uncond"] == 0.0
