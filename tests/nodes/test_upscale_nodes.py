"""UpscaleModelLoader + ImageUpscaleWithModel (ComfyUI names) in a graph: the file comes from
the models folder's upscale_models, and the graph gives what the library call gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from noisecraft.graph import run_workflow_result
from noisecraft.graph.validate import PromptValidationError
from noisecraft.nodes.upscale import ImageUpscaleWithModel
from noisecraft.upscale import load_upscale_model, upscale_with_model
from tests.nodes.test_model_nodes_support import make_context, registry
from tests.test_upscalers import _SequentialESRGAN

NAME = "4x_tiny_esrgan.safetensors"


@pytest.fixture
def context(tmp_path):
    torch.set_num_threads(1)
    models = tmp_path / "models"
    (models / "upscale_models").mkdir(parents=True)
    save_file(_SequentialESRGAN(2, nb=1).state_dict(), models / "upscale_models" / NAME)
    ctx = make_context(models, tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 20, 3), dtype=np.uint8)).save(
        ctx.input_dir / "small.png")
    return ctx


def _prompt(model_name: str = NAME) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": "small.png"}},
        "2": {"class_type": "UpscaleModelLoader", "inputs": {"model_name": model_name}},
        "3": {"class_type": "ImageUpscaleWithModel",
              "inputs": {"upscale_model": ["2", 0], "image": ["1", 0]}},
        "4": {"class_type": "SaveImage", "inputs": {"images": ["3", 0],
                                                    "filename_prefix": "up"}},
    }


def test_graph_upscale_equals_the_library_call(context):
    run = run_workflow_result(_prompt(), registry=registry(), context=context)
    (image,) = run.values["3"]
    assert image.shape == (1, 48, 80, 3)  # IMAGE [B, H, W, C], x4
    model = load_upscale_model(context.resources["models"].resolve("upscale_models", NAME))
    pixels = torch.from_numpy(np.asarray(Image.open(context.input_dir / "small.png"),
                                         dtype=np.float32) / 255).permute(2, 0, 1)[None]
    want = upscale_with_model(model, pixels).movedim(1, -1)
    torch.testing.assert_close(image, want, rtol=0, atol=1e-5)
    assert 0 <= float(image.min()) and float(image.max()) <= 1
    assert float(image.std()) > 0.01


def test_loader_lists_the_folder_and_refuses_unknown_names(context):
    info = registry().get("UpscaleModelLoader").schema.object_info(context)
    assert info["input"]["required"]["model_name"][0] == [NAME]
    assert ImageUpscaleWithModel.schema.name == "ImageUpscaleWithModel"
    with pytest.raises(PromptValidationError) as e:
        run_workflow_result(_prompt("nope.pth"), registry=registry(), context=context)
    assert "model_name" in str(e.value.result.as_response()) and "nope.pth" in str(
        e.value.result.as_response())
