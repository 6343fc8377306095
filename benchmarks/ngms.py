"""Skipping the unconditional pass in late steps (AUTOMATIC1111's NGMS): speed and image change.

On the built-in default model (``Engine()``, model None) at 128 px, 20 euler steps, CFG 7,
held-out shape prompts (``noisecraft.training.shapes.heldout_prompts``, image i seed
``--seed + i``), each configuration generates every prompt ``--rounds`` times, the
configurations interleaved prompt by prompt so they share the machine's load; one generation
before them (which also reads the step sigmas) is the warm-up.  Reported per configuration:
median wall and CPU seconds per image (in-process), U-Net image-evaluations per
image (counted with a forward hook on the engine's U-Net: a CFG step is 2, a skipped one 1),
the pixel change against the exact run (mean and max absolute difference, 0-255) and the shape
checker's accuracy (``noisecraft.training.shape_checker.score``).

Thresholds are chosen from the run's own sigmas: midway between two step sigmas, so that the
last ~25 % / ~50 % of the steps lie strictly below them; each in A1111's default mode (every
other call below the threshold skips) and in "all steps" mode (every call below it skips).

    python benchmarks/ngms.py [--prompts 3] [--rounds 1] [--steps 20] [--size 128]

The machine may be shared (a training job): the load average is recorded before and after,
and speed is only meaningful as a ratio between configurations of one run; CPU seconds
(``time.process_time``) suffer less from a niced process being descheduled than wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from noisecraft.engine import Engine
from noisecraft.request import GenerationRequest
from noisecraft.training.shape_checker import score
from noisecraft.training.shapes import heldout_prompts

RESULTS = Path(__file__).parent / "results"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompts", type=int, default=3, help="held-out prompts (one seed each)")
    p.add_argument("--rounds", type=int, default=1, help="timed rounds (after one warm-up)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5],
                   help="fractions of the steps (the last ones) to put below a threshold")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: in results/)")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.prompts < 1:
        p.error("--rounds and --prompts must be >= 1")
    return args


def step_sigmas(engine: Engine, request: GenerationRequest) -> list[float]:
    """The sigma of each sampler step of ``request`` (from its progress events); this first
    generation is also the warm-up (model load, backend wrapping)."""
    sigmas: list[float] = []
    engine.generate(request, callback=lambda e: sigmas.append(float(e.sigma)))
    return sigmas


def threshold_below(sigmas: list[float], fraction: float) -> float:
    """A threshold midway between two step sigmas with the last ``fraction`` of steps below."""
    k = len(sigmas) - round(fraction * len(sigmas))  # steps k.. are skipped-eligible
    return (sigmas[k - 1] + sigmas[k]) / 2


def configurations(sigmas: list[float], fractions: list[float]) -> list[dict]:
    configs = [{"name": "exact", "uncond_min_sigma": 0.0, "uncond_min_sigma_all_steps": False}]
    for f in fractions:
        t = round(threshold_below(sigmas, f), 4)
        below = sum(s < t for s in sigmas)
        for every in (False, True):
            configs.append({"name": f"NGMS {t:g} ({'all' if every else 'alternate'}, "
                                    f"{below}/{len(sigmas)} steps below)",
                            "uncond_min_sigma": t, "uncond_min_sigma_all_steps": every})
    return configs


def run(args) -> dict:
    torch.manual_seed(0)
    engine = Engine()
    prompts = heldout_prompts(args.prompts)
    base = {"model": None, "steps": args.steps, "cfg_scale": args.cfg, "sampler": "euler",
            "width": args.size, "height": args.size}
    sigmas = step_sigmas(engine, GenerationRequest(prompt=prompts[0], seed=args.seed, **base))
    configs = configurations(sigmas, args.fractions)
    unet = engine.runnable(engine.model(None)).unet
    evals: list[int] = []
    hook = unet.register_forward_pre_hook(lambda m, a: evals.append(a[0].shape[0]))
    load_before = os.getloadavg()
    times = {c["name"]: [] for c in configs}
    cpu = {c["name"]: [] for c in configs}
    images: dict[str, list] = {c["name"]: [] for c in configs}
    unet_evals: dict[str, list[int]] = {c["name"]: [] for c in configs}
    try:
        for r in range(args.rounds):
            for i, prompt in enumerate(prompts):
                for c in configs:
                    request = GenerationRequest(
                        prompt=prompt, seed=args.seed + i, **base,
                        uncond_min_sigma=c["uncond_min_sigma"],
                        uncond_min_sigma_all_steps=c["uncond_min_sigma_all_steps"])
                    evals.clear()
                    t0, c0 = time.perf_counter(), time.process_time()
                    image = engine.generate(request).images[0].image
                    times[c["name"]].append(time.perf_counter() - t0)
                    cpu[c["name"]].append(time.process_time() - c0)
                    if r == args.rounds - 1:
                        images[c["name"]].append(image)
                        unet_evals[c["name"]].append(sum(evals))
    finally:
        hook.remove()
    load_after = os.getloadavg()
    exact = [np.asarray(im.convert("RGB"), np.int16) for im in images["exact"]]
    rows = []
    for c in configs:
        name = c["name"]
        diffs = [np.abs(np.asarray(im.convert("RGB"), np.int16) - e)
                 for im, e in zip(images[name], exact, strict=True)]
        rows.append({
            **c,
            "median_s_per_image": statistics.median(times[name]),
            "median_cpu_s_per_image": statistics.median(cpu[name]),
            "unet_evals_per_image": statistics.mean(unet_evals[name]),
            "mean_abs_diff": float(np.mean([d.mean() for d in diffs])),
            "max_abs_diff": int(max(d.max() for d in diffs)),
            "shape_score": score(images[name], prompts),
        })
    for row in rows:
        row["time_ratio"] = row["median_s_per_image"] / rows[0]["median_s_per_image"]
        row["cpu_ratio"] = row["median_cpu_s_per_image"] / rows[0]["median_cpu_s_per_image"]
    return {
        "benchmark": "ngms", "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": {**base, "model": "built-in default", "prompts": prompts,
                     "seeds": [args.seed + i for i in range(len(prompts))],
                     "timed_rounds": args.rounds,
                     "threads": torch.get_num_threads()},
        "step_sigmas": sigmas, "load_average_before": load_before,
        "load_average_after": load_after, "rows": rows,
        "note": "shared machine (a training job runs): speed is a ratio within this run",
    }


def markdown(result: dict) -> str:
    lines = ["| configuration | wall s/image | x exact | CPU s/image | x exact "
             "| U-Net evals/image | mean diff | max diff | shape all | color | shape |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        s = r["shape_score"]
        lines.append(f"| {r['name']} | {r['median_s_per_image']:.2f} | {r['time_ratio']:.2f} | "
                     f"{r['median_cpu_s_per_image']:.2f} | {r['cpu_ratio']:.2f} | "
                     f"{r['unet_evals_per_image']:.0f} | {r['mean_abs_diff']:.2f} | "
                     f"{r['max_abs_diff']} | {100 * s['all']:.0f}% | {100 * s['color']:.0f}% | "
                     f"{100 * s['shape']:.0f}% |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    sigmas = ", ".join(f"{s:.3f}" for s in result["step_sigmas"])
    print(f"step sigmas ({len(result['step_sigmas'])}): {sigmas}")
    print(f"load average before {result['load_average_before']}, after "
          f"{result['load_average_after']} ({os.cpu_count()} CPUs; shared machine, so compare "
          f"ratios within this run)")
    print(markdown(result))
    out = args.out or RESULTS / f"ngms-{datetime.now(UTC).strftime('%Y-%m-%d-%H%M')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1, default=float) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
