"""UI-format (editor-saved) workflows written by hand after ComfyUI's published structure.

They run on the real built-in nodes with a tiny SD 1.x checkpoint in the real single-file
format (``tests/fixtures/checkpoints.py``)."""

import copy

import pytest

from noisecraft.graph import WorkflowFormatError, run_workflow, ui_to_api
from noisecraft.graph.run import load_workflow
from tests.nodes.test_model_nodes_support import make_context, write_models
from tests.nodes.test_model_nodes_support import registry as txt2img_registry

CKPT = "v1-5.safetensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_models(tmp_path_factory.mktemp("models"), {CKPT: "sd1"})

SUBGRAPH_ID = "6a3c0f4e-1b2d-4c5e-8f90-a1b2c3d4e5f6"


def node(id, type, inputs=(), outputs=(), widgets=None, mode=0, **extra):
    return {"id": id, "type": type, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": 0,
            "mode": mode, "inputs": list(inputs), "outputs": list(outputs),
            "properties": {"Node name for S&R": type}, "widgets_values": widgets, **extra}


def slot(name, type, link=None, widget=None):
    out = {"name": name, "type": type, "link": link}
    if widget:
        out["widget"] = {"name": widget}
    return out


def out(name, type, links):
    return {"name": name, "type": type, "links": links}


def txt2img_workflow():
    """Checkpoint -> (positive prompt inside a subgraph, negative prompt) -> KSampler whose seed
    comes from a PrimitiveNode and whose latent passes a bypassed LatentUpscaleBy -> VAEDecode
    -> Reroute -> SaveImage, plus a muted SaveImage, a Note and a MarkdownNote."""
    nodes = [
        node(4, "CheckpointLoaderSimple", [], [out("MODEL", "MODEL", [1]),
             out("CLIP", "CLIP", [3, 5]), out("VAE", "VAE", [8])], ["v1-5.safetensors"]),
        node(5, "EmptyLatentImage", [], [out("LATENT", "LATENT", [2])], [64, 48, 2]),
        node(11, "LatentUpscaleBy", [slot("samples", "LATENT", 2)],
             [out("LATENT", "LATENT", [12])], ["nearest-exact", 1.5], mode=4),
        node(3, "KSampler", [slot("model", "MODEL", 1), slot("positive", "CONDITIONING", 4),
             slot("negative", "CONDITIONING", 6), slot("latent_image", "LATENT", 12),
             slot("seed", "INT", 13, widget="seed")], [out("LATENT", "LATENT", [7])],
             [8566257, "randomize", 20, 8, "euler", "normal", 1]),
        node(20, SUBGRAPH_ID, [slot("clip", "CLIP", 3)],
             [out("CONDITIONING", "CONDITIONING", [4])], []),
        node(7, "CLIPTextEncode", [slot("clip", "CLIP", 5)],
             [out("CONDITIONING", "CONDITIONING", [6])], ["text, watermark"]),
        node(8, "VAEDecode", [slot("samples", "LATENT", 7), slot("vae", "VAE", 8)],
             [out("IMAGE", "IMAGE", [9])], []),
        node(10, "Reroute", [slot("", "*", 9)], [out("", "IMAGE", [10, 14])], None),
        node(9, "SaveImage", [slot("images", "IMAGE", 10)], [], ["noisecraft"]),
        node(12, "SaveImage", [slot("images", "IMAGE", 14)], [], ["muted"], mode=2),
        node(13, "PrimitiveNode", [], [{"name": "INT", "type": "INT", "links": [13],
             "widget": {"name": "seed"}}], [42, "fixed"], title="seed"),
        node(14, "Note", [], [], ["remember the seed"]),
        node(15, "MarkdownNote", [], [], ["# txt2img"]),
    ]
    links = [[1, 4, 0, 3, 0, "MODEL"], [2, 5, 0, 11, 0, "LATENT"], [3, 4, 1, 20, 0, "CLIP"],
             [4, 20, 0, 3, 1, "CONDITIONING"], [5, 4, 1, 7, 0, "CLIP"],
             [6, 7, 0, 3, 2, "CONDITIONING"], [7, 3, 0, 8, 0, "LATENT"], [8, 4, 2, 8, 1, "VAE"],
             [9, 8, 0, 10, 0, "*"], [10, 10, 0, 9, 0, "IMAGE"], [12, 11, 0, 3, 3, "LATENT"],
             [13, 13, 0, 3, 4, "INT"], [14, 10, 0, 12, 0, "IMAGE"]]
    subgraph = {
        "id": SUBGRAPH_ID, "version": 1, "name": "Positive prompt",
        "inputNode": {"id": -10, "bounding": [0, 0, 120, 60]},
        "outputNode": {"id": -20, "bounding": [400, 0, 120, 60]},
        "inputs": [{"id": "in-clip", "name": "clip", "type": "CLIP", "linkIds": [1]}],
        "outputs": [{"id": "out-cond", "name": "CONDITIONING", "type": "CONDITIONING",
                     "linkIds": [2]}],
        "widgets": [],
        "nodes": [node(1, "CLIPTextEncode", [slot("clip", "CLIP", 1)],
                       [out("CONDITIONING", "CONDITIONING", [2])], ["a red fox in snow"])],
        "links": [{"id": 1, "origin_id": -10, "origin_slot": 0, "target_id": 1,
                   "target_slot": 0, "type": "CLIP"},
                  {"id": 2, "origin_id": 1, "origin_slot": 0, "target_id": -20,
                   "target_slot": 0, "type": "CONDITIONING"}],
    }
    return {"id": "0f1e2d3c-0000-4000-8000-000000000000", "revision": 0, "last_node_id": 20,
            "last_link_id": 14, "nodes": nodes, "links": links,
            "groups": [{"id": 1, "title": "Sampling", "bounding": [0, 0, 500, 400]}],
            "definitions": {"subgraphs": [subgraph]}, "config": {},
            "extra": {"ds": {"scale": 1, "offset": [0, 0]}}, "version": 0.4}


EXPECTED = {
    "4": {"inputs": {"ckpt_name": "v1-5.safetensors"}, "class_type": "CheckpointLoaderSimple",
          "_meta": {"title": "Load Checkpoint"}},
    "5": {"inputs": {"width": 64, "height": 48, "batch_size": 2},
          "class_type": "EmptyLatentImage", "_meta": {"title": "Empty Latent Image"}},
    "3": {"inputs": {"seed": 42, "steps": 20, "cfg": 8, "sampler_name": "euler",
                     "scheduler": "normal", "denoise": 1, "model": ["4", 0],
                     "positive": ["20:1", 0], "negative": ["7", 0], "latent_image": ["5", 0]},
          "class_type": "KSampler", "_meta": {"title": "KSampler"}},
    "20:1": {"inputs": {"text": "a red fox in snow", "clip": ["4", 1]},
             "class_type": "CLIPTextEncode", "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "7": {"inputs": {"text": "text, watermark", "clip": ["4", 1]},
          "class_type": "CLIPTextEncode", "_meta": {"title": "CLIP Text Encode (Prompt)"}},
    "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode",
          "_meta": {"title": "VAE Decode"}},
    "9": {"inputs": {"filename_prefix": "noisecraft", "images": ["8", 0]},
          "class_type": "SaveImage", "_meta": {"title": "Save Image"}},
}


def test_txt2img_ui_workflow_converts_exactly():
    assert ui_to_api(txt2img_workflow(), txt2img_registry()) == EXPECTED


def test_converted_workflow_runs_and_saves(models, tmp_path):
    context = make_context(models, tmp_path)
    wf = txt2img_workflow()
    next(n for n in wf["nodes"] if n["id"] == 3)["widgets_values"][2] = 2  # steps: 2 suffice
    outputs = run_workflow(wf, registry=txt2img_registry(), context=context,
                           overrides={"3.seed": 7})
    assert outputs == {"9": {"images": [
        {"filename": "noisecraft_00001_.png", "subfolder": "", "type": "output"},
        {"filename": "noisecraft_00002_.png", "subfolder": "", "type": "output"}]}}
    assert (tmp_path / "output" / "noisecraft_00002_.png").is_file()


def test_workflow_file_in_either_format(tmp_path):
    import json
    registry = txt2img_registry()
    ui_file = tmp_path / "ui.json"
    ui_file.write_text(json.dumps(txt2img_workflow()))
    api_file = tmp_path / "api.json"
    api_file.write_text(json.dumps(EXPECTED))
    assert load_workflow(ui_file, registry)[0] == EXPECTED
    assert load_workflow(api_file, registry) == (EXPECTED, None)
    with pytest.raises(WorkflowFormatError, match="not a ComfyUI workflow"):
        load_workflow({"foo": 1}, registry)


def test_bypass_without_matching_input_and_links_to_muted_nodes_are_dropped():
    wf = txt2img_workflow()
    by_id = {n["id"]: n for n in wf["nodes"]}
    by_id[5]["mode"] = 2  # mute the latent source: the bypass leads to a muted node
    api = ui_to_api(wf, txt2img_registry())
    assert "5" not in api and "latent_image" not in api["3"]["inputs"]
    by_id[5]["mode"] = 0
    by_id[11]["inputs"][0]["type"] = "IMAGE"  # no input of the consumer's type to pass on
    api = ui_to_api(wf, txt2img_registry())
    assert "latent_image" not in api["3"]["inputs"]


def test_widget_forms_dict_values_upload_widget_and_missing_values():
    registry = txt2img_registry()
    wf = {"nodes": [
        node(1, "LoadImage", [], [out("IMAGE", "IMAGE", [1]), out("MASK", "MASK", [])],
             ["cat.png", "image"]),
        node(2, "ImageScale", [slot("image", "IMAGE", 1)], [out("IMAGE", "IMAGE", [2])],
             {"upscale_method": "bilinear", "width": 32, "height": 0, "crop": "center"}),
        node(3, "RandomNoise", [], [out("NOISE", "NOISE", [])], [5, "increment"]),
        node(4, "GrowMask", [], [out("MASK", "MASK", [])], [3]),  # tapered_corners missing
    ], "links": [[1, 1, 0, 2, 0, "IMAGE"]]}
    api = ui_to_api(wf, registry)
    assert api["1"]["inputs"] == {"image": "cat.png"}
    assert api["2"]["inputs"] == {"upscale_method": "bilinear", "width": 32, "height": 0,
                                  "crop": "center", "image": ["1", 0]}
    assert api["3"]["inputs"] == {"noise_seed": 5}
    assert api["4"]["inputs"] == {"expand": 3, "tapered_corners": True}


def test_subgraph_promoted_widget_and_nesting():
    registry = txt2img_registry()
    wf = txt2img_workflow()
    sub = wf["definitions"]["subgraphs"][0]
    inner = sub["nodes"][0]
    inner["inputs"].append(slot("text", "STRING", 3, widget="text"))
    sub["inputs"].append({"id": "in-text", "name": "text", "type": "STRING", "linkIds": [3]})
    sub["links"].append({"id": 3, "origin_id": -10, "origin_slot": 1, "target_id": 1,
                         "target_slot": 1, "type": "STRING"})
    instance = next(n for n in wf["nodes"] if n["id"] == 20)
    instance["inputs"].append(slot("text", "STRING", None, widget="text"))
    instance["widgets_values"] = ["a promoted prompt"]
    api = ui_to_api(wf, registry)
    assert api["20:1"]["inputs"]["text"] == "a promoted prompt"
    # the same subgraph used inside another subgraph: ids nest as "30:20:1"
    outer = {"id": "outer-graph", "name": "outer", "inputNode": {"id": -10},
             "outputNode": {"id": -20}, "inputs": [], "outputs": [], "widgets": [],
             "nodes": [copy.deepcopy(instance)], "links": []}
    outer["nodes"][0]["inputs"][0]["link"] = None
    wf["definitions"]["subgraphs"].append(outer)
    wf["nodes"].append(node(30, "outer-graph", [], [], []))
    api = ui_to_api(wf, registry)
    assert api["30:20:1"]["inputs"] == {"text": "a promoted prompt"}
