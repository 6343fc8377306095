"""CPU benchmark of noisecraft's backends against diffusers and OpenVINO, in one run.

    python benchmarks/run.py --suite unet,vae_decode,vae_encode,text,txt2img [--quick]
    python benchmarks/run.py --suite unet --contenders eager,onednn,openvino --rounds 2
    python benchmarks/run.py --suite sdxl_unet            # SDXL base U-Net at 1024 (~10 GB)

Every contender runs in its own process on the same random weights (made once, in a temporary
folder) and the same inputs: median of ``--runs`` timed calls after ``--warmup`` calls (the
first one, compilation / conversion included, is reported as ``first_call_s``), peak RSS,
and the error against noisecraft's eager fp32 output (max abs, relative L2).  ``--rounds N``
interleaves the contenders N times (A B C A B C) and takes the median per contender, so a
load change on a shared machine hits them alike.

Writes ``benchmarks/results/<date>-<host>.json`` (machine: CPU model, native bf16, nproc,
load average before and after) and prints a markdown table (``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
from dataclasses import asdict
from datetime import datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import workloads as W  # noqa: E402
from benchmarks.contenders import SUITES, contenders_for  # noqa: E402
from benchmarks.report import markdown  # noqa: E402
from noisecraft.hardware import cpu_info  # noqa: E402

SUITE_MODELS = {"unet": ["sd15_unet"], "sdxl_unet": ["sdxl_unet"], "vae_decode": ["sd_vae"],
                "vae_encode": ["sd_vae"], "text": ["clip_l"],
                "txt2img": ["clip_l", "sd15_unet", "sd_vae"]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", default="unet,vae_decode,vae_encode,text,txt2img",
                   help=f"comma-separated, from {', '.join(SUITES)}")
    p.add_argument("--contenders", default="",
                   help="comma-separated labels to keep (default: all of each suite)")
    p.add_argument("--quick", action="store_true",
                   help="txt2img with 4 steps and 1 timed run; 1 warm-up everywhere")
    p.add_argument("--runs", type=int, default=3, help="timed runs per contender (>= 3)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up calls (the first call counts)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repetitions of the suite")
    p.add_argument("--latent", type=int, default=64, help="latent side (64 = 512 px)")
    p.add_argument("--steps", type=int, default=20, help="txt2img sampling steps")
    p.add_argument("--out", type=Path, default=None, help="result JSON path")
    p.add_argument("--timeout", type=float, default=7200, help="seconds per contender process")
    p.add_argument("--omp-wait-policy", choices=("default", "passive", "active"),
                   default="default",
                   help="OMP_WAIT_POLICY of the contender processes; 'passive' stops PyTorch's "
                        "OpenMP threads from spinning, which halves eager times on an "
                        "oversubscribed machine (measured 2x on VAE decode at load ~14)")
    return p.parse_args(argv)


def machine() -> dict:
    info = cpu_info().as_dict()
    return {**info, "nproc": os.cpu_count(), "affinity_cpus": info.pop("logical_cpus"),
            "host": socket.gethostname(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "versions": _versions()}


def _versions() -> dict:
    out = {}
    for name in ("diffusers", "transformers", "openvino"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def load_average() -> dict:
    one, five, fifteen = os.getloadavg()
    up = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    return {"loadavg_1_5_15": [one, five, fifteen], "uptime": up, "at": datetime.now().isoformat()}


def _spawn(spec: dict, timeout: float, omp_wait_policy: str) -> dict:
    env = dict(os.environ)
    if omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "worker.py"),
                           json.dumps(spec)], capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env=env)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
    return {"label": spec["label"], "suite": spec["suite"], "error": "\n".join(tail)}


def _errors(out: Path, ref: Path) -> dict:
    a, b = torch.load(out, weights_only=True), torch.load(ref, weights_only=True)
    if a.shape != b.shape:
        return {"max_abs": None, "rel_l2": None, "note": f"shape {a.shape} vs {b.shape}"}
    d = a - b
    return {"max_abs": d.abs().max().item(), "rel_l2": (d.norm() / b.norm()).item()}


def run_suite(suite: str, args, weights: dict, tmp: Path) -> list[dict]:
    keep = {c for c in args.contenders.split(",") if c}
    specs = [c for c in contenders_for(suite) if not keep or c["label"] in keep]
    sizes = W.Sizes(latent=args.latent, steps=4 if args.quick else args.steps)
    runs = 1 if (args.quick and suite == "txt2img") else args.runs
    rows: dict[str, list[dict]] = {}
    for rnd in range(args.rounds):
        for c in specs:
            out = tmp / f"{suite}-{c['label']}-{rnd}.pt"
            spec = {**c, "suite": suite, "sizes": asdict(sizes), "weights": weights,
                    "tmp": str(tmp), "out": str(out), "warmup": args.warmup, "runs": runs}
            print(f"[{suite}] round {rnd + 1}/{args.rounds}: {c['label']} ...", flush=True)
            res = _spawn(spec, args.timeout, args.omp_wait_policy)
            res["output"] = str(out)
            rows.setdefault(c["label"], []).append(res)
            msg = res.get("error") or f"median {res['median_s']:.2f}s"
            print(f"    {msg}", flush=True)
    return [_merge(suite, rs, rows, sizes, runs) for rs in rows.values()]


def _merge(suite, results, rows, sizes, runs) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    merged = dict(ok[0])
    merged["median_s"] = statistics.median(r["median_s"] for r in ok)
    merged["round_medians_s"] = [r["median_s"] for r in ok]
    merged["peak_rss_mb"] = max(r["peak_rss_mb"] for r in ok)
    merged["runs_per_round"], merged["sizes"] = runs, asdict(sizes)
    ref = next((r for r in rows.get("eager", []) if "error" not in r), None)
    if ref is not None:
        merged.update(_errors(Path(ok[0]["output"]), Path(ref["output"])))
    merged.pop("output", None)
    return merged


def main(argv=None) -> int:
    args = parse_args(argv)
    suites = [s for s in args.suite.split(",") if s]
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise SystemExit(f"unknown suite(s) {unknown}; choose from {', '.join(SUITES)}")
    if args.runs < 3 and not args.quick:
        raise SystemExit("--runs must be >= 3 (medians of fewer runs are noise)")
    result = {"machine": machine(), "load_before": load_average(),
              "args": vars(args) | {"out": None}, "results": {}}
    with tempfile.TemporaryDirectory(prefix="noisecraft-bench-") as tmp_name:
        tmp = Path(tmp_name)
        weights = {}
        for model in sorted({m for s in suites for m in SUITE_MODELS[s]}):
            weights[model] = str(tmp / f"{model}.safetensors")
            print(f"making random weights: {model}", flush=True)
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "workloads.py"), model,
                            weights[model]], check=True, cwd=ROOT)
        stamp = datetime.now().strftime("%Y-%m-%d-%H%M")
        out = args.out or ROOT / "benchmarks" / "results" / f"{stamp}-{socket.gethostname()}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        for suite in suites:
            result["results"][suite] = run_suite(suite, args, weights, tmp)
            result["load_after"] = load_average()
            out.write_text(json.dumps(result, indent=2))  # after each suite: partial results
    print(markdown(result))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
