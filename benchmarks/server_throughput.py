"""Server throughput and latency: CLIENTS concurrent generations through ``noisecraft serve``,
against the same generations through the Python API in one process.

    python benchmarks/server_throughput.py --model default --clients 50 --workers 1
    python benchmarks/server_throughput.py --model tiny --clients 5 --steps 2     # quick check

``--model default`` is the built-in default model (``noisecraft/weights/default.safetensors``,
128x128): the server is given no checkpoint and the requests name none, so its workers load
the default model as ``model=None`` does.  ``--model tiny`` is a tiny random-weight SD1
checkpoint (64x64): it measures the server's own costs around small generations, not model
speed.

1. **API baseline**: the same CLIENTS generations (same prompts, seeds, size, steps) through
   ``Engine().generate(GenerationRequest(...))``, one after the other, after one warm-up call
   (model loading is not timed).
2. **Server**: a real ``noisecraft serve`` on 127.0.0.1 (``tests/server/harness.py``) with
   ``--workers`` worker processes, warmed up by one job per worker (before the first round);
   then CLIENTS threads are released at once, each calling
   ``noisecraft.client.generate_image``: the native route ``POST /api/generate`` with
   ``wait`` and a JSON answer, as the Python client and the web page (queued variant) use it
   (``/sdapi/v1/txt2img`` builds the same job payload), timing submit -> image decoded.  The
   job history (``GET /history/{id}``) gives each job's start and end, which split the latency
   into queue wait, execution, and the way back (job done -> client has the image).

``--rounds R`` alternates the two phases R times on the same engine and server (A S A S ...),
so that a load change on a shared machine hits both alike: walls are medians over the rounds,
the overhead is the median of the rounds' own overheads, latency percentiles pool every
round's jobs.

Reports throughput (jobs over the wall time from the first submission to the last answer),
p50/p95/max latency, the queue/execution split, and the server's overhead over the API:
``(server wall - API wall) / CLIENTS`` per job and as a percentage of the API's time; with one
worker that is what the HTTP layer, the queue and the worker process cost.  Workers run with
``OMP_NUM_THREADS=--threads`` and the API baseline with ``torch.set_num_threads(--threads)``;
the server process (HTTP, SQLite queue, event log) and several workers share the machine's
cores with them, as they do in use.  CPU seconds (user + system of the server process and its
workers, from /proc, against this process's during the API phase) are a second measure of
the overhead that other jobs on a shared machine disturb less than wall time, though
OpenMP threads spinning while descheduled inflate them.  Prints a markdown table and writes JSON to
``benchmarks/results/server_throughput-<time>.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.run import load_average, machine  # noqa: E402
from tests.server.harness import MODEL, Server, write_tiny_model  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
NATIVE_SIZE = {"default": 128, "tiny": 64}
PROMPTS = ("a red circle", "a blue square", "a green triangle", "a yellow circle")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(NATIVE_SIZE), default="default",
                   help="the built-in default model, or a tiny random SD1 checkpoint")
    p.add_argument("--clients", type=int, default=50, help="concurrent submissions")
    p.add_argument("--workers", type=int, default=1, help="server worker processes")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=None,
                   help="width and height (default: the model's native size, "
                        + ", ".join(f"{k} {v}" for k, v in NATIVE_SIZE.items()) + ")")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads per worker and for the API baseline (default: nproc)")
    p.add_argument("--rounds", type=int, default=1,
                   help="alternate the API and server phases this many times (A S A S ...): "
                        "walls are medians over rounds, latencies pool all rounds' jobs")
    p.add_argument("--seed", type=int, default=1, help="job i uses seed SEED + i")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per request")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: in results/)")
    args = p.parse_args(argv)
    for name in ("clients", "workers", "steps", "threads", "rounds"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.size is None:
        args.size = NATIVE_SIZE[args.model]
    if args.size < 8 or args.size % 8:
        p.error(f"--size must be a positive multiple of 8, got {args.size}")
    return args


# ---- statistics -------------------------------------------------------------------------

def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks
    (numpy's default): percentile([1, 2, 3, 4], 50) == 2.5."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"q must be within 0..100, got {q}")
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(values) -> dict[str, float]:
    """p50, p95, max and mean of a list of seconds."""
    values = list(values)
    return {"p50": percentile(values, 50), "p95": percentile(values, 95), "max": max(values),
            "mean": sum(values) / len(values)}


def overhead(server_wall: float, api_wall: float, jobs: int) -> dict[str, float]:
    """The server's extra time over the API: per job in seconds, and in % of the API's."""
    return {"per_job_s": (server_wall - api_wall) / jobs,
            "percent": 100 * (server_wall - api_wall) / api_wall}


# ---- the two runs -----------------------------------------------------------------------

def job_settings(args, i: int) -> dict:
    """Settings of job i, alike for the server and the API (the model is added by each)."""
    return {"prompt": PROMPTS[i % len(PROMPTS)], "seed": args.seed + i, "steps": args.steps,
            "width": args.size, "height": args.size}


def check_default_model() -> Path:
    from noisecraft.engine import DEFAULT_MODEL_PATH

    if not DEFAULT_MODEL_PATH.is_file():
        raise SystemExit(
            f"--model default: the built-in default model {DEFAULT_MODEL_PATH} does not exist "
            "yet (it is written when its training finishes); run with --model tiny meanwhile")
    return DEFAULT_MODEL_PATH


def api_generator(args, model: Path | None):
    """``generate(i)``: job i through ``Engine().generate`` in this process (model loaded and
    warmed up here, untimed)."""
    import torch

    from noisecraft.engine import Engine
    from noisecraft.request import GenerationRequest

    torch.set_num_threads(args.threads)
    engine = Engine()
    ref = None if model is None else str(model)

    def generate(i: int) -> None:
        engine.generate(GenerationRequest(**job_settings(args, i), model=ref))

    generate(-1)
    return generate


def api_round(args, generate) -> list[float]:
    """Seconds of each of the CLIENTS generations, one after the other."""
    seconds = []
    for i in range(args.clients):
        start = time.perf_counter()
        generate(i)
        seconds.append(time.perf_counter() - start)
    return seconds


def _submit(url: str, settings: dict, timeout: float, gate: threading.Barrier | None) -> dict:
    from noisecraft.client import generate_image

    if gate is not None:
        gate.wait()
    submitted, start = time.time(), time.perf_counter()
    image = generate_image(url=url, timeout=timeout, **settings)
    return {"prompt_id": image.info["prompt_id"], "submitted": submitted, "start": start,
            "latency_s": time.perf_counter() - start, "received": time.time()}


def _timestamps(server: Server, prompt_id: str) -> tuple[float, float]:
    """(started, finished) of a job in epoch seconds, from its history entry."""
    entry = server.get(f"/history/{prompt_id}")[prompt_id]
    stamps = {kind: data["timestamp"] / 1000 for kind, data in entry["status"]["messages"]}
    return stamps["execution_start"], stamps["execution_success"]


def server_round(args, server: Server, pool: ThreadPoolExecutor, extra: dict) -> list[dict]:
    """CLIENTS requests released at once; each job's times (epoch seconds) and latency."""
    gate = threading.Barrier(args.clients)
    futures = [pool.submit(_submit, server.url, {**job_settings(args, i), **extra},
                           args.timeout, gate) for i in range(args.clients)]
    jobs = [f.result() for f in futures]
    for job in jobs:
        job["started"], job["finished"] = _timestamps(server, job["prompt_id"])
    return jobs


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of the live processes ``pids`` (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
    return total


def server_wall(jobs: list[dict]) -> float:
    """First submission to last answer."""
    return max(j["received"] for j in jobs) - min(j["submitted"] for j in jobs)


def run_rounds(args, data: Path, api_model: Path | None, server_model: str | None) -> dict:
    """``--rounds`` x (API phase, server phase) on one engine and one warmed-up server."""
    extra = {} if server_model is None else {"model": server_model}
    generate = api_generator(args, api_model)
    rounds = []
    with Server(data, workers=args.workers, env={"OMP_NUM_THREADS": str(args.threads)}) as server, \
            ThreadPoolExecutor(max_workers=max(args.workers, args.clients)) as pool:
        warm = [{**job_settings(args, -1 - w), **extra} for w in range(args.workers)]
        list(pool.map(lambda s: _submit(server.url, s, args.timeout, None), warm))
        for r in range(args.rounds):
            print(f"round {r + 1}/{args.rounds}: API, {args.clients} generations ...", flush=True)
            cpu = time.process_time()
            api = api_round(args, generate)
            api_cpu = time.process_time() - cpu
            pids = [server.proc.pid, *server.worker_pids()]
            cpu = cpu_seconds(pids)
            print(f"round {r + 1}/{args.rounds}: server, {args.clients} concurrent clients, "
                  f"{args.workers} worker(s) ...", flush=True)
            jobs = server_round(args, server, pool, extra)
            rounds.append({"api_s": api, "api_wall_s": sum(api), "api_cpu_s": api_cpu,
                           "jobs": jobs, "server_wall_s": server_wall(jobs),
                           "server_cpu_s": cpu_seconds(pids) - cpu})
    return summarize(rounds, args.clients)


def summarize(rounds: list[dict], clients: int) -> dict:
    """Walls and CPU times: medians over rounds; overheads: the medians of each round's
    (server - API), both phases of a round being close in time; latencies: percentiles over
    all rounds' jobs."""
    jobs = [j for r in rounds for j in r["jobs"]]
    paired = [overhead(r["server_wall_s"], r["api_wall_s"], clients) for r in rounds]
    paired_cpu = [overhead(r["server_cpu_s"], r["api_cpu_s"], clients) for r in rounds]
    wall = statistics.median(r["server_wall_s"] for r in rounds)
    return {
        "api": {"wall_s": statistics.median(r["api_wall_s"] for r in rounds),
                "cpu_s": statistics.median(r["api_cpu_s"] for r in rounds),
                "round_walls_s": [r["api_wall_s"] for r in rounds],
                "round_cpu_s": [r["api_cpu_s"] for r in rounds],
                "per_job": summary(s for r in rounds for s in r["api_s"])},
        "server": {
            "wall_s": wall, "jobs_per_s": clients / wall,
            "cpu_s": statistics.median(r["server_cpu_s"] for r in rounds),
            "round_walls_s": [r["server_wall_s"] for r in rounds],
            "round_cpu_s": [r["server_cpu_s"] for r in rounds],
            "latency": summary(j["latency_s"] for j in jobs),
            "queue_wait": summary(max(0.0, j["started"] - j["submitted"]) for j in jobs),
            "execution": summary(j["finished"] - j["started"] for j in jobs),
            "return": summary(max(0.0, j["received"] - j["finished"]) for j in jobs),
            "jobs": [{k: j[k] for k in ("prompt_id", "submitted", "started", "finished",
                                        "received", "latency_s")} for j in jobs],
        },
        "overhead": _median_overhead(paired), "round_overheads": paired,
        "cpu_overhead": _median_overhead(paired_cpu), "round_cpu_overheads": paired_cpu,
    }


def _median_overhead(paired: list[dict]) -> dict[str, float]:
    return {key: statistics.median(o[key] for o in paired) for key in ("per_job_s", "percent")}


# ---- report -----------------------------------------------------------------------------

def markdown(result: dict) -> str:
    a, s, o, c = result["args"], result["server"], result["overhead"], result["cpu_overhead"]
    api = result["api"]

    def row(name: str, d: dict) -> str:
        return f"| {name} | {d['p50']:.3f} | {d['p95']:.3f} | {d['max']:.3f} | {d['mean']:.3f} |"

    rounds = "" if a["rounds"] == 1 else f" (median of {a['rounds']} rounds)"
    lines = [
        f"{a['clients']} concurrent `POST /api/generate` clients, {a['workers']} worker(s) x "
        f"{a['threads']} thread(s), model {result['model']}, {a['size']}x{a['size']}, "
        f"{a['steps']} steps; load average before/after "
        f"{result['load_before']['loadavg_1_5_15'][0]:.1f} / "
        f"{result['load_after']['loadavg_1_5_15'][0]:.1f} on {result['machine']['nproc']} CPUs",
        "",
        f"| | wall s{rounds} | jobs/s | CPU s |", "|---|---:|---:|---:|",
        f"| server (HTTP process + workers) | {s['wall_s']:.2f} | {s['jobs_per_s']:.3f} | "
        f"{s['cpu_s']:.1f} |",
        f"| Python API, sequential | {api['wall_s']:.2f} | {a['clients'] / api['wall_s']:.3f} | "
        f"{api['cpu_s']:.1f} |",
        f"| server overhead per job{' (median)' if a['rounds'] > 1 else ''} | "
        f"{o['per_job_s'] * 1000:+.0f} ms ({o['percent']:+.1f} %) | | "
        f"{c['per_job_s'] * 1000:+.0f} ms ({c['percent']:+.1f} %) |",
        "",
        "| seconds per job | p50 | p95 | max | mean |", "|---|---:|---:|---:|---:|",
        row("server latency (submit -> image)", s["latency"]),
        row("- queue wait (submit -> start)", s["queue_wait"]),
        row("- execution (start -> end)", s["execution"]),
        row("- way back (end -> image)", s["return"]),
        row("Python API generate()", api["per_job"]),
    ]
    if a["rounds"] > 1:
        walls = ", ".join(f"{x:.1f}" for x in s["round_walls_s"])
        api_walls = ", ".join(f"{x:.1f}" for x in api["round_walls_s"])
        each = ", ".join(f"{o['per_job_s'] * 1000:+.0f} ms ({o['percent']:+.1f} %)"
                         for o in result["round_overheads"])
        lines += ["", f"Walls per round: server {walls} s; API {api_walls} s; overhead per "
                  f"job {each}."]
    if a["workers"] > 1:
        lines += ["", f"With {a['workers']} workers the overhead row compares parallel server "
                  "work with sequential API calls on the same cores: not the server's cost."]
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    api_model = check_default_model() if args.model == "default" else None
    result = {"machine": machine(), "load_before": load_average(), "args": vars(args)}
    with tempfile.TemporaryDirectory(prefix="noisecraft-server-bench-") as tmp:
        data = Path(tmp) / "data"
        if args.model == "tiny":
            api_model = write_tiny_model(data, Path(tmp))
        result["model"] = str(api_model)
        result |= run_rounds(args, data, None if args.model == "default" else api_model,
                             MODEL if args.model == "tiny" else None)
    result["load_after"] = load_average()
    result["markdown"] = markdown(result)
    print(result["markdown"])
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out = args.out or RESULTS / f"server_throughput-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "args": {**vars(args), "out": None}}, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
