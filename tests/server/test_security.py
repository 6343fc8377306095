"""Auth, CORS, limits, traversal, and a bounded fuzz: malformed requests get a 4xx that says
what was wrong, never a 500; the queue stays intact.  In-process app, no worker (jobs stay
queued, which the queue-management routes need)."""

from __future__ import annotations

import base64
import io
import json
import random

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from noisecraft.server.app import create_app
from noisecraft.server.config import Auth, ConfigError, Limits, ServerConfig


def make_client(tmp_path, **kw) -> TestClient:
    config = ServerConfig(data_dir=tmp_path / "data", **kw)
    return TestClient(create_app(config, start_workers=False), raise_server_exceptions=False)


def png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def test_refuses_to_listen_beyond_localhost_without_auth(tmp_path):
    with pytest.raises(ConfigError, match="without authentication"):
        ServerConfig(host="0.0.0.0").check()
    ServerConfig(host="0.0.0.0", insecure=True).check()
    ServerConfig(host="0.0.0.0", auth=Auth.parse(api_key="k" * 16)).check()
    ServerConfig(host="::1").check()
    from noisecraft.cli import app

    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0", "--data-dir",
                                      str(tmp_path)])
    assert result.exit_code == 2 and "--api-auth" in result.output
    with pytest.raises(ConfigError, match="USER:PASSWORD"):
        Auth.parse(api_auth="nopassword")


def test_auth_basic_bearer_and_key(tmp_path):
    auth = Auth.parse(api_auth="ann:secret", api_key="key-12345678")
    with make_client(tmp_path, auth=auth) as c:
        assert c.get("/health").status_code == 200
        r = c.get("/queue")
        assert r.status_code == 401 and "authentication required" in r.json()["detail"]
        assert c.get("/queue", auth=("ann", "wrong")).status_code == 401
        assert c.get("/queue", auth=("ann", "secret")).status_code == 200
        assert c.get("/sdapi/v1/options",
                     headers={"Authorization": "Bearer key-12345678"}).status_code == 200
        assert c.get("/object_info", headers={"X-API-Key": "key-12345678"}).status_code == 200
        assert c.get("/queue", headers={"Authorization": "Basic !!!"}).status_code == 401
        from starlette.websockets import WebSocketDisconnect

        with pytest.raises(WebSocketDisconnect), c.websocket_connect("/ws?clientId=x") as ws:
            ws.receive_json()
        with c.websocket_connect("/ws?clientId=x&token=key-12345678") as ws:
            assert ws.receive_json()["type"] == "status"


def test_cors_off_by_default_and_allow_list(tmp_path):
    with make_client(tmp_path) as c:
        r = c.get("/queue", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    with make_client(tmp_path, cors_allow=("https://ok.example",)) as c:
        ok = c.get("/queue", headers={"Origin": "https://ok.example"})
        assert ok.headers["access-control-allow-origin"] == "https://ok.example"
        bad = c.get("/queue", headers={"Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in bad.headers


def test_size_and_pixel_limits(tmp_path):
    limits = Limits(max_body_bytes=20_000, max_image_pixels=64 * 64)
    with make_client(tmp_path, limits=limits) as c:
        r = c.post("/prompt", content=b"{" + b" " * 30_000 + b"}")
        assert r.status_code == 413 and "limit" in r.json()["detail"]
        r = c.post("/upload/image", files={"image": ("big.png", png((100, 100)), "image/png")})
        assert r.status_code == 413 and "pixels" in r.json()["detail"]
        r = c.post("/upload/image", files={"image": ("ok.png", png(), "image/png")})
        assert r.status_code == 200


def test_no_path_traversal(tmp_path):
    with make_client(tmp_path) as c:
        for params in ({"filename": "../queue.db"}, {"filename": "/etc/passwd"},
                       {"filename": "x.png", "subfolder": "../../"},
                       {"filename": "queue.db", "type": "../"},
                       {"filename": "..\\..\\queue.db"}):
            r = c.get("/view", params=params)
            assert r.status_code == 400, (params, r.text)
        r = c.post("/upload/image", files={"image": ("../../evil.png", png(), "image/png")})
        assert r.status_code == 200 and r.json()["name"] == "evil.png"
        assert (tmp_path / "data" / "input" / "evil.png").is_file()
        r = c.post("/upload/image", data={"subfolder": "../x"},
                   files={"image": ("a.png", png(), "image/png")})
        assert r.status_code == 400
        r = c.post("/api/generate", json={"prompt": "x", "model": "../queue.db"})
        assert r.status_code == 400 and "unknown model" in r.json()["detail"]
        r = c.post("/upload/image", files={"image": ("x.png", b"PK\x03\x04pickle", "image/png")})
        assert r.status_code == 400 and "not a readable image" in r.json()["detail"]


def test_queue_routes_delete_clear_front_and_history(tmp_path):
    wf = {"1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64,
                                                             "batch_size": 1}}}
    with make_client(tmp_path) as c:
        if c.post("/prompt", json={"prompt": wf}).status_code != 400:
            pytest.fail("a prompt without output nodes must be refused")
        wf["2"] = {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}
        wf["3"] = {"class_type": "ImageInvert", "inputs": {"image": ["4", 0]}}
        wf["4"] = {"class_type": "LoadImage", "inputs": {"image": "a.png"}}
        c.post("/upload/image", files={"image": ("a.png", png(), "image/png")})
        ids = [c.post("/prompt", json={"prompt": wf}).json()["prompt_id"] for _ in range(3)]
        front = c.post("/prompt", json={"prompt": wf, "front": True}).json()
        pending = [item[1] for item in c.get("/queue").json()["queue_pending"]]
        assert pending == [front["prompt_id"], *ids]
        assert c.post("/queue", json={"front": ids[2]}).status_code == 200
        assert c.post("/queue", json={"delete": [ids[0]]}).status_code == 200
        pending = [item[1] for item in c.get("/api/queue").json()["queue_pending"]]
        assert pending == [ids[2], front["prompt_id"], ids[1]]
        assert c.post("/queue", json={"clear": True}).status_code == 200
        assert c.get("/queue").json() == {"queue_running": [], "queue_pending": []}
        assert c.get("/history").json() == {}
        assert c.post("/interrupt").status_code == 200


FUZZ_PATHS = ["/prompt", "/api/prompt", "/queue", "/history", "/interrupt", "/api/generate",
              "/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdapi/v1/options",
              "/sdapi/v1/png-info", "/upload/image", "/upload/mask"]


def fuzz_bodies(rng: random.Random) -> list[bytes]:
    junk = base64.b64encode(png())[:-7].decode()  # truncated image
    values = [None, 1, -1, 1e308, "x" * 5000, [], {}, [1, 2], {"a": [1]}, True, "../../etc",
              "not base64!", junk, "data:image/png;base64,!!"]
    keys = ["prompt", "client_id", "delete", "clear", "front", "steps", "width", "height",
            "seed", "init_images", "mask", "image", "sampler_name", "model", "batch_size",
            "sd_model_checkpoint", "prompt_id", "extra_data", "n_iter", "cfg_scale", "outpaint",
            "denoising_strength", "inpainting_fill", "response", "timeout", "wait"]
    bodies = [b"", b"{", b"[1,2]", b"null", b"\xff\xfe", b'{"prompt": {"1": 5}}',
              b'{"prompt": {"1": {"class_type": 7}}}', b"[" * 5000 + b"]" * 5000,
              b'{"prompt": {"1": {"class_type": "LoadImage", "inputs": {"image": "../x"}}}}']
    for _ in range(60):
        body = {rng.choice(keys): rng.choice(values) for _ in range(rng.randint(1, 4))}
        bodies.append(json.dumps(body).encode())
    return bodies


def test_fuzz_all_4xx_and_queue_intact(tmp_path):
    rng = random.Random(1234)
    # no worker runs here: with one job queued and max_queue=1, a request that happens to be
    # valid is answered 503 queue_full at once instead of waiting for its image
    with make_client(tmp_path, limits=Limits(max_queue=1)) as c:
        keep = c.post("/api/generate", json={"prompt": "keep me", "wait": False,
                                             "width": 64, "height": 64})
        assert keep.status_code == 202
        statuses = []
        for body in fuzz_bodies(rng):
            path = rng.choice(FUZZ_PATHS)
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
            answer = r.json()
            if r.status_code == 503:
                assert answer["error"]["type"] == "queue_full"
                continue
            assert 200 <= r.status_code < 500, (path, body[:200], r.text[:300])
            if r.status_code >= 400:
                assert answer["error"]["message"], (path, body[:200])
            statuses.append(r.status_code)
        assert sum(400 <= s < 500 for s in statuses) > len(statuses) // 2
        for path in ("/view?filename=%00", "/history?max_items=-1", "/history?max_items=x",
                     "/object_info/..%2f", "/view?type=output&filename=..%2fqueue.db",
                     "/models/..%2f..%2f"):
            r = c.get(path)
            assert 400 <= r.status_code < 500, (path, r.text[:300])
        pending = [item[1] for item in c.get("/queue").json()["queue_pending"]]
        assert keep.json()["prompt_id"] in pending
        assert c.get("/health").json()["ok"]
