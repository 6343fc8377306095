"""The ComfyUI editor (comfyui-frontend-package, unmodified) at /editor/ against a real
noisecraft server: it starts with no console error or failed request, lists noisecraft's
nodes and checkpoint, opens the default txt2img workflow for that checkpoint, and runs it
after the prompt is changed: progress arrives over its websocket and the output image
appears on the SaveImage node."""

from __future__ import annotations

import json

import pytest

from tests.web.browser import screenshot

pytestmark = pytest.mark.timeout(600)

TXT2IMG = ("CheckpointLoaderSimple", "CLIPTextEncode", "EmptyLatentImage", "KSampler",
           "VAEDecode", "SaveImage")
APP = "window.comfyAPI?.app?.app"
# The editor's start-up is over when its splash is removed: the spinner it shows from mounting
# the canvas until the first graph is loaded and restored tabs, URL templates and the
# first-run screen are settled (GraphView's finishStartup).  app.graph and app.canvas exist
# well before that, so a graph loaded as soon as they do can still be replaced.
EDITED = "a blue square, noisecraft editor test"
STARTED = f"""() => !document.getElementById('splash-loader') &&
  ({APP})?.graph?._nodes?.length > 0"""


def widget(page, node_id: int, name: str, value=None):
    """Read (or set, when value is given) a widget of a node in the editor's graph."""
    return page.evaluate(
        """([id, name, value]) => {
          const node = window.comfyAPI.app.app.graph.getNodeById(id);
          const w = node.widgets.find((w) => w.name === name);
          if (value !== null) { w.value = value; w.callback?.(value); }
          return w.value;
        }""", [node_id, name, value])


def test_editor_runs_the_default_txt2img_workflow(server, browser):
    info = server.get("/object_info")
    missing = [n for n in TXT2IMG if n not in info]
    if missing:
        pytest.skip(f"the server has no {', '.join(missing)} node(s) yet: no txt2img to run")
    page, watch = browser.page()
    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on(
        "framereceived", lambda f: frames.append(f) if isinstance(f, str) else None))
    page.goto(server.url + "/editor/")
    # A first visit opens the server's txt2img workflow (noisecraft's extension), not the
    # editor's stock graph.
    page.wait_for_function(STARTED, timeout=180_000)
    registered = page.evaluate("Object.keys(window.LiteGraph.registered_node_types)")
    assert set(info) <= set(registered)  # every noisecraft node is in the editor
    types = page.evaluate(f"{APP}.graph._nodes.map((n) => n.type).sort()")
    assert types == sorted(TXT2IMG + ("CLIPTextEncode",))
    assert widget(page, 4, "ckpt_name") == "tiny.safetensors"  # the server's checkpoint
    screenshot(page, "editor_1280", keep=True)

    widget(page, 6, "text", EDITED)
    widget(page, 5, "width", 64)
    widget(page, 5, "height", 64)
    widget(page, 3, "steps", 3)
    with page.expect_response(lambda r: r.request.method == "POST" and
                              r.url.endswith("/api/prompt")) as answer:
        page.evaluate(f"{APP}.queuePrompt(0, 1)")
    assert answer.value.ok, answer.value.text()
    sent = answer.value.request.post_data_json["prompt"]
    assert (sent["6"]["inputs"]["text"], sent["5"]["inputs"]["width"],
            sent["3"]["inputs"]["steps"]) == (EDITED, 64, 3)  # the edited graph was queued
    prompt_id = answer.value.json()["prompt_id"]
    page.wait_for_function(
        f"""() => {{
          const node = {APP}.graph.getNodeById(9);
          return (node.imgs?.length ?? 0) > 0 ||
            ({APP}.nodeOutputs?.["9"]?.images?.length ?? 0) > 0;
        }}""", timeout=300_000)
    ran = server.get(f"/history/{prompt_id}")[prompt_id]
    assert ran["status"]["completed"], ran["status"]
    assert ran["prompt"][2]["6"]["inputs"]["text"] == EDITED  # and the server ran it
    events = [json.loads(f) for f in frames]
    progress = [e["data"]["value"] for e in events if e.get("type") == "progress" and
                e["data"].get("prompt_id", prompt_id) == prompt_id]
    assert progress[:1] == [1] and progress[-1] == 3, progress  # step by step, 1..3
    page.wait_for_timeout(500)
    screenshot(page, "editor_output", keep=True)
    assert watch.problems() == [], (watch.console_errors, watch.failed)
    page.close()
