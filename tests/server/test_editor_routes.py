"""Files the ComfyUI editor asks for by absolute path, as ComfyUI (which serves the editor at
``/``) answers them.  In-process app, no worker."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from noisecraft.server.app import create_app
from noisecraft.server.config import ServerConfig
from noisecraft.web import editor_dir


@pytest.fixture
def client(tmp_path):
    if editor_dir() is None:
        pytest.skip("comfyui-frontend-package is not installed (pip install -e '.[web]')")
    config = ServerConfig(data_dir=tmp_path / "data")
    with TestClient(create_app(config, start_workers=False),
                    raise_server_exceptions=False) as c:
        yield c


def test_favicon_at_the_absolute_path_the_editor_sets(client):
    # The editor's layout resets the page icon to /assets/favicon.ico (not /editor/...).
    r = client.get("/assets/favicon.ico")
    assert r.status_code == 200
    assert r.content == (editor_dir() / "assets" / "favicon.ico").read_bytes()
    assert client.get("/editor/assets/favicon.ico").content == r.content


def test_editor_icons_stay_inside_the_editor_folder(client):
    assert client.get("/assets/images/favicon_progress_16x16/frame_0.png").status_code == 200
    r = client.get("/assets/images/..%2F..%2Findex.html")
    assert r.status_code in (400, 404), r.text
