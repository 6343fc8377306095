"""Data-parallel training: ``train()`` under ``torchrun --nproc_per_node 2`` (gloo, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

from noisecraft.training.state import load_trained_model, read_metadata
from noisecraft.training.trainer import train
from tests.training.test_trainer import quiet, tiny_config

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import sys
from pathlib import Path
from noisecraft.training.trainer import train
from tests.training.test_trainer import tiny_config

result = train(tiny_config(Path(sys.argv[1]), steps=2, latent=True), progress=lambda e: None)
print("RESULT", result.step, result.finished)
"""


def test_two_process_run_saves_a_model_like_the_single_process_one(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", str(script), str(tmp_path / "ddp")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("RESULT 2 True") == 2

    ddp_file = tmp_path / "ddp/model.safetensors"
    single = train(tiny_config(tmp_path / "single", steps=2, latent=True), progress=quiet)
    a, b = load_file(str(ddp_file)), load_file(str(single.model_path))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert read_metadata(ddp_file)["noisecraft.unet_config"] == read_metadata(
        single.model_path)["noisecraft.unet_config"]
    bundle = load_trained_model(ddp_file)
    assert bundle.vae is not None and bundle.unet.config.in_channels == 4
    ckpt = tmp_path / "ddp/checkpoints/step_00000002"
    assert (ckpt / "rng_rank0.safetensors").exists() and (ckpt / "rng_rank1.safetensors").exists()
    rows = (tmp_path / "ddp/metrics.csv").read_text().splitlines()
    assert len(rows) == 3  # header + 2 steps, written once (by rank 0)
