"""Time and peak memory of the two upscaling paths on a 512 x 512 image (issue #12's note).

    python benchmarks/upscale.py [--what model,sd] [--tile 512] [--sd-steps 20]

* ``model``: a 4x ESRGAN-sized RRDBNet (nf 64, 23 blocks, gc 32: the layout of
  RealESRGAN_x4plus / 4x-UltraSharp; random weights: speed and memory do not depend on the
  values) through ``upscale_with_model`` in ``--tile`` px tiles with 32 px overlap
  (ComfyUI's ImageUpscaleWithModel defaults), 512 -> 2048.
* ``sd``: ``sd_upscale_image`` 2x with the built-in default model (Lanczos, then img2img at
  strength 0.3 tile by tile at its native 128 px with 32 px overlap), 512 -> 1024.

Each runs in a fresh child process; peak memory is that process's maximum resident set
(``ru_maxrss``), which includes the interpreter and torch (~0.3-0.4 GB). Wall time on a
machine other jobs load measures waiting for a CPU: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_model(tile: int) -> dict:
    import torch

    from noisecraft.models.upscalers import RRDBNet
    from noisecraft.upscale import upscale_with_model

    torch.manual_seed(0)
    model = RRDBNet(in_nc=3, out_nc=3, nf=64, nb=23, gc=32, num_up=2).eval()
    image = torch.rand(1, 3, 512, 512, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.no_grad():
        out = upscale_with_model(model, image, tile=tile, overlap=32)
    return {"what": "4x RRDBNet, tiled", "tile": tile, "out": list(out.shape[-2:]),
            "seconds": time.perf_counter() - start}


def run_sd(steps: int) -> dict:
    import numpy as np
    from PIL import Image

    from noisecraft import sd_upscale_image

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8))
    start = time.perf_counter()
    result = sd_upscale_image(image, "a large red circle in the center on a blue background",
                              scale=2.0, overlap=32, strength=0.3, steps=steps, seed=0)
    out = result.image if hasattr(result, "image") else result
    return {"what": "2x SD upscale, default model", "steps": steps, "strength": 0.3,
            "out": [out.height, out.width], "seconds": time.perf_counter() - start}


def child(what: str, args) -> dict:
    result = run_model(args.tile) if what == "model" else run_sd(args.sd_steps)
    result["peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    return result


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="model,sd")
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--sd-steps", type=int, default=20)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return []
    results = []
    for what in args.what.split(","):
        if what not in ("model", "sd"):
            p.error(f"--what takes model and/or sd, got {what!r}")
        cmd = [sys.executable, __file__, "--child", what, "--tile", str(args.tile),
               "--sd-steps", str(args.sd_steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
