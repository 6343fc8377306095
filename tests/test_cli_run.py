"""``noisecraft run``: a workflow file, --set overrides, models folder and config, exit codes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from noisecraft.cli import app
from noisecraft.engine import Engine
from tests.nodes.test_model_nodes_support import SD1_NAME, txt2img_prompt, write_models


@pytest.fixture(scope="module")
def engine():
    torch.set_num_threads(1)
    return Engine(device="cpu")


def _run(engine, *args):
    return CliRunner().invoke(app, ["run", *map(str, args)], obj={"engine": engine})


def test_run_saves_images_and_applies_sets(tmp_path, engine):
    models = write_models(tmp_path / "models")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(txt2img_prompt(steps=2)))
    out = tmp_path / "out"
    first = _run(engine, wf, "-o", out, "--models", models, "--set", "3.seed=11",
                 "--set", '6.text=a "quoted" cat', "--set", "9.filename_prefix=a/run")
    assert first.exit_code == 0, first.output
    files = sorted((out / "a").glob("run_*.png"))
    assert [f.name for f in files] == ["run_00001_.png"]
    assert "run_00001_.png" in first.output and "node 9" in first.output
    second = _run(engine, wf, "-o", out, "--models", models, "--set", "3.seed=12",
                  "--set", "9.filename_prefix=a/run")
    assert second.exit_code == 0, second.output
    a, b = (np.asarray(Image.open(out / "a" / f"run_0000{i}_.png")) for i in (1, 2))
    assert a.shape == (16, 16, 3) and not np.array_equal(a, b)


def test_run_reads_models_through_an_a1111_config(tmp_path, engine):
    webui = tmp_path / "stable-diffusion-webui"
    write_models(webui / "models", {"sd/" + SD1_NAME: "sd1"})
    (webui / "models" / "checkpoints").rename(webui / "models" / "Stable-diffusion")
    config = tmp_path / "extra_model_paths.yaml"
    config.write_text(f"a111:\n    base_path: {webui}\n")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(txt2img_prompt("sd/" + SD1_NAME, steps=1)))
    result = _run(engine, wf, "-o", tmp_path / "out", "--models", tmp_path / "none",
                  "--model-paths", config)
    assert result.exit_code == 0, result.output
    assert len(list((tmp_path / "out").glob("*.png"))) == 1


def test_run_refuses_invalid_workflows_with_exit_code_2(tmp_path, engine):
    models = write_models(tmp_path / "models")
    wf = tmp_path / "wf.json"
    wf.write_text(json.dumps(txt2img_prompt("missing.safetensors")))
    result = _run(engine, wf, "-o", tmp_path / "out", "--models", models)
    assert result.exit_code == 2
    assert "nothing ran" in result.output and "ckpt_name" in result.output \
        and SD1_NAME in result.output
    assert not list((tmp_path / "out").glob("*.png"))
    bad_set = _run(engine, wf, "-o", tmp_path / "out", "--set", "seed=1")
    assert bad_set.exit_code == 2 and "NODE.INPUT=VALUE" in bad_set.output
    no_node = _run(engine, wf, "-o", tmp_path / "out", "--set", "99.seed=1")
    assert no_node.exit_code == 2 and "no node '99'" in no_node.output
    wf.write_text("{not json")
    assert _run(engine, wf, "-o", tmp_path / "out").exit_code == 2
