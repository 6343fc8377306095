"""Server throughput: jobs per second through `noisecraft serve` with N worker processes.

    python -m benchmarks.server_throughput --workers 2 --jobs 10 --steps 4

Starts a real server on 127.0.0.1 (free port, temporary data folder, a tiny random-weight SD1
checkpoint), queues JOBS txt2img jobs of 64x64 with ``wait: false``, waits until all are in
the history, and prints the wall time and jobs/s.  Measures queue + worker overhead around
small generations, not model speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tests.server.harness import MODEL, Server, wait_until, write_tiny_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=10)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        write_tiny_model(data, Path(tmp))
        with Server(data, workers=args.workers) as server:
            body = {"prompt": "a red circle", "model": MODEL, "steps": args.steps,
                    "width": 64, "height": 64, "wait": False}
            server.post("/api/generate", {**body, "seed": 0, "wait": True})  # warm up
            start = time.perf_counter()
            for i in range(args.jobs):
                status, answer = server.post("/api/generate", {**body, "seed": i + 1})
                assert status == 202, answer
            wait_until(lambda: len(server.get("/history")) >= args.jobs + 1, 3600, "all jobs",
                       interval=0.05)
            seconds = time.perf_counter() - start
    print(f"{args.jobs} jobs, {args.workers} worker(s), {args.steps} steps at 64x64: "
          f"{seconds:.2f} s, {args.jobs / seconds:.2f} jobs/s")


if __name__ == "__main__":
    main()
