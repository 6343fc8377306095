"""ComfyUI's API against a real `noisecraft serve` with one worker process: upload, /prompt,
the websocket's events and binary previews, history, /view, interrupt, info routes."""

from __future__ import annotations

import io
import json
import struct

import httpx
import pytest
from PIL import Image
from websockets.sync.client import connect

from tests.server.harness import MODEL, Server, write_tiny_model

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("comfy") / "data"
    write_tiny_model(data, tmp_path_factory.getbasetemp())
    with Server(data) as s:
        yield s


def png(color, size=(16, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def invert_workflow(name: str) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": name}},
        "2": {"class_type": "ImageInvert", "inputs": {"image": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0],
                                                    "filename_prefix": "inv"}},
    }


def events_until(ws, prompt_id: str, last: str, limit: int = 2000):
    """Messages (JSON dicts, or bytes for binary frames) until ``last`` for ``prompt_id``."""
    seen = []
    for _ in range(limit):
        raw = ws.recv(timeout=300)
        msg = raw if isinstance(raw, bytes) else json.loads(raw)
        seen.append(msg)
        if isinstance(msg, dict) and msg["type"] == last and \
                msg["data"].get("prompt_id") == prompt_id:
            return seen
    raise AssertionError(f"no {last} among {len(seen)} messages")


def test_prompt_runs_on_a_worker_and_streams_events(server):
    up = httpx.post(server.url + "/upload/image",
                    files={"image": ("red.png", png((255, 0, 0)), "image/png")})
    assert up.status_code == 200 and up.json() == {"name": "red.png", "subfolder": "",
                                                   "type": "input"}
    with connect(server.url.replace("http", "ws") + "/ws?clientId=c1") as ws:
        first = json.loads(ws.recv(timeout=30))
        assert first["type"] == "status" and first["data"]["sid"] == "c1"
        r = httpx.post(server.url + "/prompt",
                       json={"prompt": invert_workflow("red.png"), "client_id": "c1"})
        assert r.status_code == 200, r.text
        answer = r.json()
        assert set(answer) == {"prompt_id", "number", "node_errors"}
        assert answer["node_errors"] == {}
        pid = answer["prompt_id"]
        msgs = events_until(ws, pid, "execution_success")
    types = [m["type"] for m in msgs if isinstance(m, dict)]
    for kind in ("execution_start", "execution_cached", "executing", "executed", "status"):
        assert kind in types
    executed = next(m for m in msgs if isinstance(m, dict) and m["type"] == "executed")
    assert executed["data"]["node"] == "3"
    history = httpx.get(server.url + f"/api/history/{pid}").json()
    entry = history[pid]
    assert entry["status"]["status_str"] == "success" and entry["status"]["completed"]
    image = entry["outputs"]["3"]["images"][0]
    view = httpx.get(server.url + "/view", params=image)
    assert view.status_code == 200 and view.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(view.content)).convert("RGB").getpixel((5, 5)) == (0, 255, 255)
    assert pid in httpx.get(server.url + "/history").json()


def test_invalid_prompt_answers_comfyui_node_errors(server):
    wf = invert_workflow("missing.png")
    wf["4"] = {"class_type": "NoSuchNode", "inputs": {}}
    r = httpx.post(server.url + "/prompt", json={"prompt": wf})
    assert r.status_code == 400
    body = r.json()
    assert body["error"]["type"] in ("prompt_outputs_failed_validation", "missing_node_type")
    assert body["node_errors"]
    r = httpx.post(server.url + "/prompt", json={"no_prompt": 1})
    assert r.status_code == 400 and "prompt" in r.json()["error"]["message"]


def test_generate_job_streams_progress_and_binary_previews(server):
    with connect(server.url.replace("http", "ws") + "/ws?clientId=c2") as ws:
        ws.recv(timeout=30)
        r = httpx.post(server.url + "/api/generate", json={
            "prompt": "a red circle", "model": MODEL, "steps": 2, "width": 64, "height": 64,
            "seed": 5, "wait": False, "client_id": "c2"})
        assert r.status_code == 202, r.text
        msgs = events_until(ws, r.json()["prompt_id"], "execution_success")
    progress = [m for m in msgs if isinstance(m, dict) and m["type"] == "progress"]
    assert [p["data"]["value"] for p in progress] == [1, 2]
    assert all(p["data"]["max"] == 2 for p in progress)
    frames = [m for m in msgs if isinstance(m, bytes)]
    assert len(frames) == 2
    for frame in frames:
        assert struct.unpack(">II", frame[:8]) == (1, 1)
        assert Image.open(io.BytesIO(frame[8:])).format == "JPEG"


def test_interrupt_stops_the_running_job(server):
    with connect(server.url.replace("http", "ws") + "/ws?clientId=c3") as ws:
        ws.recv(timeout=30)
        r = httpx.post(server.url + "/api/generate", json={
            "prompt": "x", "model": MODEL, "steps": 400, "width": 64, "height": 64,
            "wait": False, "client_id": "c3"})
        pid = r.json()["prompt_id"]
        events_until(ws, pid, "progress")
        assert httpx.post(server.url + "/interrupt", json={}).status_code == 200
        msgs = events_until(ws, pid, "execution_interrupted")
    assert msgs
    entry = httpx.get(server.url + f"/history/{pid}").json()[pid]
    assert entry["status"]["status_str"] == "error" and not entry["status"]["completed"]


def test_info_routes(server):
    info = httpx.get(server.url + "/object_info").json()
    assert "LoadImage" in info and "SaveImage" in info
    one = httpx.get(server.url + "/api/object_info/ImageInvert").json()
    assert list(one) == ["ImageInvert"]
    assert httpx.get(server.url + "/object_info/Nope").status_code == 404
    assert httpx.get(server.url + "/models/checkpoints").json() == [MODEL]
    assert httpx.get(server.url + "/models/nope").status_code == 404
    assert httpx.get(server.url + "/embeddings").json() == []
    stats = httpx.get(server.url + "/system_stats").json()
    assert stats["devices"][0]["type"] == "cpu" and "pytorch_version" in stats["system"]


def test_client_generate_image(server, monkeypatch):
    from noisecraft.client import ServerError, generate_image

    monkeypatch.setenv("NOISECRAFT_URL", server.url)
    image = generate_image("a blue square", model=MODEL, steps=2, width=64, height=64, seed=9)
    assert image.size == (64, 64) and image.info["seed"] == 9
    assert "Seed: 9" in image.info["parameters"]
    with pytest.raises(ServerError, match="unknown model"):
        generate_image("x", model="nope.safetensors")
