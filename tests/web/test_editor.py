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
# Known gap: the editor's stock default graph (z_image_turbo) is still loaded on a first visit
# and probes its model download on huggingface.co (no network here), which fails.
STOCK_FAILURE = ("huggingface.co", "ERR_NAME_NOT_RESOLVED")


def widget(page, node_id: int, name: str, value=None):
    """Read (or set, when value is given) a widget of a node in the editor's graph."""
    return page.evaluate(
        """([id, name, value]) => {
          const node = window.comfyAPI.app.app.graph.getNodeById(id);
          const w = node.widgets.find((w) => w.name === name);
          if (value !== null) { w.value = value; w.callback?.(value); }
          return w.value;
        }""", [node_id, name, value])


# Opt-in (`pytest -m editor`) until it is reliable: one run in two the queued prompt is not the
# edited one, and a 404 console error without a URL remains (issue 10 notes where it stands).
@pytest.mark.editor
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
    page.wait_for_function(f"({APP})?.graph !== undefined && ({APP}).canvas", timeout=180_000)
    page.wait_for_timeout(2000)
    # Open the server's txt2img workflow (the extension is meant to make it the default; with
    # comfyui-frontend-package 1.58.1 the stock graph still loads first: see STOCK_FAILURE).
    page.evaluate(f"""async () => {{
      const answer = await (await fetch('/api/noisecraft/default_workflow')).json();
      await {APP}.loadGraphData(answer.workflow);
    }}""")
    page.wait_for_function(f"({APP})?.graph?._nodes?.length >= 7", timeout=60_000)
    registered = page.evaluate("Object.keys(window.LiteGraph.registered_node_types)")
    assert set(info) <= set(registered)  # every noisecraft node is in the editor
    types = page.evaluate(f"{APP}.graph._nodes.map((n) => n.type).sort()")
    assert types == sorted(TXT2IMG + ("CLIPTextEncode",))
    assert widget(page, 4, "ckpt_name") == "tiny.safetensors"  # the server's checkpoint
    screenshot(page, "editor_1280", keep=True)

    widget(page, 6, "text", "a blue square, noisecraft editor test")
    widget(page, 5, "width", 64)
    widget(page, 5, "height", 64)
    widget(page, 3, "steps", 3)
    page.evaluate(f"{APP}.queuePrompt(0, 1)")
    page.wait_for_function(
        f"""() => {{
          const node = {APP}.graph.getNodeById(9);
          return (node.imgs?.length ?? 0) > 0 ||
            ({APP}.nodeOutputs?.["9"]?.images?.length ?? 0) > 0;
        }}""", timeout=300_000)
    history = server.get("/history")
    prompts = [entry["prompt"][2] for entry in history.values()]
    ran = [p for p in prompts if p.get("6", {}).get("inputs", {}).get("text") ==
           "a blue square, noisecraft editor test"]
    assert ran, "the changed prompt was not what the server ran"
    events = [json.loads(f) for f in frames]
    progress = [e["data"]["value"] for e in events if e.get("type") == "progress"]
    assert progress[:1] == [1] and progress[-1] == 3, progress  # step by step, 1..3
    page.wait_for_timeout(500)
    screenshot(page, "editor_output", keep=True)
    assert watch.problems(allow=STOCK_FAILURE) == [], watch.failed
    page.close()
