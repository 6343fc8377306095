"""One real `noisecraft serve` (tiny random SD1 checkpoint, one worker) and one headless
Chromium for the web UI tests; both are skipped (outside CI) when Chromium is absent."""

from __future__ import annotations

import pytest

from tests.server.harness import Server, write_tiny_model
from tests.web.browser import Browser, need_chromium


@pytest.fixture(scope="package")
def server(tmp_path_factory):
    need_chromium()
    data = tmp_path_factory.mktemp("web") / "data"
    write_tiny_model(data, tmp_path_factory.getbasetemp())
    with Server(data) as s:
        yield s


@pytest.fixture(scope="package")
def browser(server):
    with Browser() as b:
        yield b
