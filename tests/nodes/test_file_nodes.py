from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.graph import (
    ExecutionContext,
    Executor,
    NodeContext,
    PromptValidationError,
    UnsafePathError,
    run_workflow,
)
from noisecraft.nodes import builtin_registry
from noisecraft.nodes.files import LoadImage, LoadImageMask, PreviewImage, SaveImage


def node_context(tmp_path, events=None):
    execution = ExecutionContext(input_dir=tmp_path / "in", output_dir=tmp_path / "out",
                                 temp_dir=tmp_path / "tmp")
    sink = events if events is not None else []
    return NodeContext("1", "p", execution, lambda n, d: sink.append((n, d)))


def test_save_then_load_round_trip(tmp_path):
    ctx = node_context(tmp_path)
    levels = torch.arange(2 * 4 * 5 * 3, dtype=torch.float32).reshape(2, 4, 5, 3) % 256 / 255
    result = SaveImage.execute(levels, "runs/cat", context=ctx)
    assert result.values == ()
    assert result.ui == {"images": [
        {"filename": "cat_00001_.png", "subfolder": "runs", "type": "output"},
        {"filename": "cat_00002_.png", "subfolder": "runs", "type": "output"}]}
    again = SaveImage.execute(levels[:1], "runs/cat", context=ctx)
    assert again.ui["images"][0]["filename"] == "cat_00003_.png"
    assert not list((tmp_path / "out" / "runs").glob("*.part"))
    image, mask = LoadImage.execute("runs/cat_00002_.png [output]", context=ctx)
    assert image.shape == (1, 4, 5, 3) and mask.shape == (1, 64, 64) and mask.sum() == 0
    assert torch.allclose(image[0], levels[1], atol=1 / 255 + 1e-6)


def test_load_image_alpha_becomes_mask_and_mask_channels(tmp_path):
    ctx = node_context(tmp_path)
    (tmp_path / "in").mkdir()
    rgba = np.zeros((3, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    rgba[0, :, 3] = 255  # first row opaque
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in" / "a.png")
    image, mask = LoadImage.execute("a.png", context=ctx)
    assert image.shape == (1, 3, 4, 3) and torch.equal(mask[0, 0], torch.zeros(4))
    assert torch.equal(mask[0, 1:], torch.ones(2, 4))
    (red,) = LoadImageMask.execute("a.png", "red", context=ctx)
    assert red.shape == (1, 3, 4) and (red == 1).all()
    (alpha,) = LoadImageMask.execute("a.png", "alpha", context=ctx)
    assert torch.equal(alpha, mask)


def test_preview_writes_to_temp(tmp_path):
    ui = PreviewImage.execute(torch.zeros(1, 2, 2, 3), context=node_context(tmp_path)).ui
    entry = ui["images"][0]
    assert entry["type"] == "temp" and (tmp_path / "tmp" / entry["filename"]).is_file()


@pytest.mark.parametrize("prefix", ["../escape", "/etc/x", "a/../../b", "C:/x", "..\\up"])
def test_save_refuses_traversal(tmp_path, prefix):
    with pytest.raises(UnsafePathError, match="filename_prefix"):
        SaveImage.execute(torch.zeros(1, 2, 2, 3), prefix, context=node_context(tmp_path))
    assert not (tmp_path / "escape_00001_.png").exists()


def test_load_refuses_traversal_at_validation_and_runs_nothing(tmp_path):
    (tmp_path / "secret.png").write_bytes(b"not really")
    context = ExecutionContext(input_dir=tmp_path / "in", output_dir=tmp_path / "out")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "../secret.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0]}},
              "3": {"class_type": "LoadImage", "inputs": {"image": "missing.png"}},
              "4": {"class_type": "PreviewImage", "inputs": {"images": ["3", 0]}}}
    with pytest.raises(PromptValidationError) as info:
        run_workflow(prompt, registry=builtin_registry(), context=context)
    errors = info.value.result.node_errors
    assert errors["1"]["errors"][0]["type"] == "custom_validation_failed"
    assert "'..'" in errors["1"]["errors"][0]["message"]
    assert "missing.png" in errors["3"]["errors"][0]["message"]
    assert "filename_prefix" in errors["2"]["errors"][0]["message"]  # required, not given
    assert not (tmp_path / "out").exists()


def test_load_image_is_re_read_when_the_file_changes(tmp_path):
    (tmp_path / "in").mkdir()
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "in" / "x.png")
    context = ExecutionContext(input_dir=tmp_path / "in", output_dir=tmp_path / "out")
    prompt = {"1": {"class_type": "LoadImage", "inputs": {"image": "x.png"}},
              "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0],
                                                          "filename_prefix": "x"}}}
    executor = Executor(builtin_registry())
    assert executor.execute(prompt, context).executed == ["1", "2"]
    assert executor.execute(prompt, context).executed == []
    Image.new("RGB", (4, 4), (0, 255, 0)).save(tmp_path / "in" / "x.png")
    assert executor.execute(prompt, context).executed == ["1", "2"]
    assert len(list((tmp_path / "out").glob("x_*.png"))) == 2
    assert Counter(p.suffix for p in (tmp_path / "out").iterdir()) == Counter({".png": 2})
