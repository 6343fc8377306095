"""CPU seconds of each phase of one generation through the engine, per compute backend, in one
process on one loaded SD 1.5-sized random checkpoint (``engine_generate.py`` writes it).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/engine_phases.py --checkpoint sd15.safetensors \
        --backends eager,onednn --threads 1 --rounds 2 --size 256 --steps 3

Phases: loading the checkpoint, each backend's one-off wrapping (oneDNN weight packing), then
per request (backends interleaved, ``--rounds`` times): text encoding + the first step, each
further sampler step (one batched cond/uncond U-Net call), and VAE decode + image conversion.
Times are ``time.process_time()`` (CPU seconds of the whole process, all threads): on a
machine other jobs load, wall time mostly measures how long the process waited for a CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.engine_generate import write_sd15_checkpoint  # noqa: E402
from noisecraft.engine import Engine  # noqa: E402
from noisecraft.request import GenerationRequest  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, required=True, help="written when missing")
    p.add_argument("--backends", default="eager,onednn")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.checkpoint.exists():
        write_sd15_checkpoint(args.checkpoint)
    start = time.process_time()
    engines = {name: Engine(device="cpu", backend=name) for name in args.backends.split(",")}
    bundle = next(iter(engines.values())).model(args.checkpoint)
    print(f"load: {time.process_time() - start:.2f} CPU s")
    for name, engine in engines.items():
        engine.register("m", bundle)
        start = time.process_time()
        engine.runnable(bundle)
        print(f"{name}: wrap {time.process_time() - start:.2f} CPU s")
    request = GenerationRequest("a lighthouse at dusk", model="m", steps=args.steps, seed=1,
                                width=args.size, height=args.size)
    for _ in range(args.rounds):
        for name, engine in engines.items():
            marks = [time.process_time()]
            engine.generate(request, callback=lambda event, m=marks: m.append(time.process_time()))
            marks.append(time.process_time())
            phases = [b - a for a, b in zip(marks, marks[1:], strict=False)]
            steps = ", ".join(f"{s:.2f}" for s in phases[1:-1])
            print(f"{name}: total {marks[-1] - marks[0]:.2f} | text + step 1 {phases[0]:.2f} | "
                  f"steps {steps} | decode {phases[-1]:.2f} CPU s", flush=True)


if __name__ == "__main__":
    main()
