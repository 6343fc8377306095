"""Wall time of ``noisecraft generate`` per compute backend (``--backend``), on an SD 1.5-sized
random-weight single-file checkpoint, in one run.

    python benchmarks/engine_generate.py                      # eager vs onednn, 256 px, 4 steps
    python benchmarks/engine_generate.py --backends eager,onednn,onednn_bf16 --rounds 3 \
        --size 512 --steps 20

The checkpoint (SD 1.5 U-Net, VAE and CLIP-L in the original single-file layout, seeded PyTorch
default init of every layer, ~4.3 GB float32) is written once to a temporary folder (or
``--checkpoint PATH``, kept).  Each backend runs ``python -m noisecraft.cli generate`` in its
own process: the times therefore include loading the checkpoint and the backend's one-off
wrapping (oneDNN weight packing), as a user of the command sees it; ``--rounds N`` interleaves
the backends (A B A B) and takes the median per backend, so a load change on a shared machine
hits them alike.  Reported per backend: median wall seconds and CPU seconds (user + system of
the process: on a machine other jobs load, a better measure of the work than wall time, with
``OMP_WAIT_POLICY=PASSIVE`` so that descheduled OpenMP threads do not spin), their ratios to
the first backend, the process's peak RSS, and the largest pixel difference of its image
from the first backend's.
Writes ``benchmarks/results/<date>-<host>-engine-generate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from noisecraft.checkpoints.text_keys import CHECKPOINT_PREFIX  # noqa: E402
from noisecraft.hardware import cpu_info  # noqa: E402
from noisecraft.models.text import build_text_encoder  # noqa: E402
from noisecraft.models.unet import UNetModel  # noqa: E402
from noisecraft.models.unet_configs import unet_preset  # noqa: E402
from noisecraft.models.vae import SD_VAE, AutoencoderKL  # noqa: E402


def write_sd15_checkpoint(path: Path, seed: int = 0) -> Path:
    """An SD 1.5-sized single file with random weights (every layer's default init)."""
    torch.manual_seed(seed)
    parts = (("model.diffusion_model.", UNetModel(unet_preset("sd15"))),
             ("first_stage_model.", AutoencoderKL(SD_VAE)),
             (CHECKPOINT_PREFIX["sd1"], build_text_encoder("sd1")))
    sd = {}
    for prefix, module in parts:
        for m in module.modules():
            if hasattr(m, "reset_parameters") and m is not module:
                m.reset_parameters()
        sd.update({prefix + k: v.contiguous() for k, v in module.state_dict().items()})
        del module
    save_file(sd, str(path))
    return path


def run_generate(checkpoint: Path, backend: str, out: Path, args) -> dict:
    cmd = [sys.executable, "-m", "noisecraft.cli", "generate", "a lighthouse at dusk",
           "-m", str(checkpoint), "-o", str(out), "--backend", backend, "--seed", "1",
           "--steps", str(args.steps), "-W", str(args.size), "-H", str(args.size)]
    log = out.with_suffix(".log")
    env = {**os.environ, "OMP_WAIT_POLICY": args.omp_wait_policy.upper()}
    with open(log, "wb") as sink:  # a file, not a pipe: a full pipe would block the child
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
    stderr = log.read_text(errors="replace")
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{backend}: noisecraft generate failed:\n{stderr[-2000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime,
            "peak_rss_mb": usage.ru_maxrss / 1024}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", default="eager,onednn")
    p.add_argument("--size", type=int, default=256, help="image side in pixels")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--checkpoint", type=Path, help="reuse (or write once) this checkpoint")
    p.add_argument("--omp-wait-policy", default="passive", choices=("passive", "active"),
                   help="OMP_WAIT_POLICY of the runs (passive: no spinning while descheduled)")
    args = p.parse_args(argv)
    backends = args.backends.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        checkpoint = args.checkpoint or tmp / "sd15-random.safetensors"
        if not checkpoint.exists():
            write_sd15_checkpoint(checkpoint)
        load_before = os.getloadavg()
        runs = {b: [] for b in backends}
        for _ in range(args.rounds):
            for b in backends:
                runs[b].append(run_generate(checkpoint, b, tmp / f"{b}.png", args))
        pixels = {b: np.asarray(Image.open(tmp / f"{b}.png").convert("RGB"), dtype=int)
                  for b in backends}
    ref = backends[0]
    def median(b, key):
        return statistics.median(r[key] for r in runs[b])

    rows = []
    for b in backends:
        rows.append({"backend": b, "median_s": round(median(b, "seconds"), 2),
                     "ratio_to_" + ref: round(median(b, "seconds") / median(ref, "seconds"), 3),
                     "median_cpu_s": round(median(b, "cpu_seconds"), 2),
                     "cpu_ratio_to_" + ref: round(median(b, "cpu_seconds")
                                                  / median(ref, "cpu_seconds"), 3),
                     "peak_rss_mb": round(max(r["peak_rss_mb"] for r in runs[b])),
                     "max_pixel_diff": int(np.abs(pixels[b] - pixels[ref]).max()),
                     "runs_s": [round(r["seconds"], 2) for r in runs[b]]})
    result = {"when": datetime.now().isoformat(timespec="seconds"), "host": socket.gethostname(),
              "machine": cpu_info().as_dict(), "torch_threads": torch.get_num_threads(),
              "load_before": load_before, "load_after": os.getloadavg(),
              "settings": {"size": args.size, "steps": args.steps, "rounds": args.rounds,
                           "sampler": "euler", "cfg": 7.0,
                           "omp_wait_policy": args.omp_wait_policy}, "rows": rows}
    out = ROOT / "benchmarks" / "results" / \
        f"{datetime.now():%Y-%m-%d-%H%M}-{socket.gethostname()}-engine-generate.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| backend | median wall s | x {ref} | median CPU s | x {ref} | peak RSS MB | "
          "max pixel diff | wall s per run |")
    print("|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['backend']} | {r['median_s']} | {r['ratio_to_' + ref]} | "
              f"{r['median_cpu_s']} | {r['cpu_ratio_to_' + ref]} | {r['peak_rss_mb']} | "
              f"{r['max_pixel_diff']} | {r['runs_s']} |")
    print(f"load average before {load_before}, after {result['load_after']}; wrote {out}")


if __name__ == "__main__":
    main()
