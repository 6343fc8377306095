"""LoRAs over HTTP: ``<lora:NAME:W>`` tags in AUTOMATIC1111's txt2img and the native route's
``loras`` name files in ``models/loras``; names never leave that folder."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from noisecraft.server.app import create_app
from noisecraft.server.config import ServerConfig
from tests.fixtures.loras import write_kohya_lora
from tests.server.harness import MODEL, Server, write_tiny_model

pytestmark = pytest.mark.timeout(600)
A1111 = dict(negative_prompt="", seed=3, width=64, height=64, steps=2, cfg_scale=5,
             sampler_name="Euler", override_settings={"sd_model_checkpoint": MODEL})


def add_lora(data_dir):
    folder = data_dir / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    write_kohya_lora(folder / "style.safetensors", "sd1", seed=3)


def add_embedding(data_dir, checkpoint):
    """models/embeddings/crimson.safetensors: one vector, the checkpoint's own input embedding
    of the token "red" (so "embedding:crimson" must draw what "red" draws)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from noisecraft.models.tokenizer import CLIPTokenizer

    (token,) = CLIPTokenizer().encode("red")
    key = "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight"
    with safe_open(str(checkpoint), framework="pt") as f:
        red = f.get_tensor(key)[token]
    folder = data_dir / "models" / "embeddings"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"emb_params": red[None].float().contiguous()}, str(folder / "crimson.safetensors"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("a1111-loras") / "data"
    add_embedding(data, write_tiny_model(data, tmp_path_factory.getbasetemp()))
    add_lora(data)
    with Server(data) as s:
        yield s


def image_of(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def txt2img(server, prompt: str):
    r = httpx.post(server.url + "/sdapi/v1/txt2img", json={"prompt": prompt, **A1111},
                   timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def test_a1111_txt2img_applies_a_prompt_tag(server):
    assert [lo["name"] for lo in httpx.get(server.url + "/sdapi/v1/loras").json()] == ["style"]
    plain = image_of(txt2img(server, "a red circle")["images"][0])
    answer = txt2img(server, "a red circle <lora:style:0.75>")
    tagged = image_of(answer["images"][0])
    assert not np.array_equal(np.asarray(tagged), np.asarray(plain))
    again = image_of(txt2img(server, "a red circle")["images"][0])
    np.testing.assert_array_equal(np.asarray(again), np.asarray(plain))  # cache unharmed
    text = tagged.info["parameters"]
    assert text.startswith("a red circle <lora:style:0.75>\n")
    assert 'Lora hashes: "style: ' in text
    assert answer["info"].count("Lora hashes") >= 2  # infotexts and extra_generation_params
    native = httpx.post(server.url + "/api/generate", timeout=300, json={
        "prompt": "a red circle", "model": MODEL, "seed": 3, "width": 64, "height": 64,
        "steps": 2, "cfg_scale": 5, "sampler": "euler", "loras": [["style", 0.75]]})
    assert native.status_code == 200, native.text
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(native.content))),
                                  np.asarray(tagged))


def test_prompts_name_embeddings_in_models_embeddings(server):
    red = np.asarray(image_of(txt2img(server, "a red circle")["images"][0]))
    crimson = np.asarray(image_of(txt2img(server, "a embedding:crimson circle")["images"][0]))
    np.testing.assert_array_equal(crimson, red)
    blue = np.asarray(image_of(txt2img(server, "a blue circle")["images"][0]))
    assert not np.array_equal(blue, red)  # the words matter at this size
    r = httpx.post(server.url + "/sdapi/v1/txt2img", timeout=300,
                   json={"prompt": "a embedding:nope circle", **A1111})
    assert r.status_code >= 400 and "nope" in r.text


@pytest.fixture()
def client(tmp_path):
    add_lora(tmp_path / "data")
    config = ServerConfig(data_dir=tmp_path / "data")
    with TestClient(create_app(config, start_workers=False),
                    raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize("route, body, message", [
    ("/sdapi/v1/txt2img", {"prompt": "x <lora:nope:1>"},
     "names LoRA 'nope', which is not in"),
    ("/sdapi/v1/txt2img", {"prompt": "x <lora:style:abc>"}, "is not a finite number"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "negative_prompt": "<lora:../../queue.db:1>"},
     "must not contain '..'"),
    ("/sdapi/v1/txt2img", {"prompt": "x <lora:/etc/passwd:1>"}, "no absolute paths"),
    ("/api/generate", {"prompt": "x", "loras": [["../queue.db", 1]]}, "must not contain '..'"),
    ("/api/generate", {"prompt": "x", "loras": [["/etc/passwd", 1]]}, "no absolute paths"),
    ("/api/generate", {"prompt": "x", "loras_dir": "/etc"}, "loras_dir cannot be chosen"),
    ("/api/generate", {"prompt": "x", "embeddings_dir": "/etc"},
     "embeddings_dir cannot be chosen"),
    ("/api/generate", {"prompt": "x", "loras": [["style", "much"]]},
     "a weight must be a finite number"),
])
def test_bad_lora_requests_are_4xx_naming_the_problem(client, route, body, message):
    r = client.post(route, json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["detail"]
    if "which is not in" in message:
        assert "available: style" in r.json()["detail"]
