"""Peak memory while loading a full-size SD 1.5 single-file checkpoint.

Writes a checkpoint with random weights in the real SD 1.5 layout and size (U-Net 860M, VAE
84M, CLIP-L 123M parameters: about 2.1 GB in float16, 4.3 GB in float32), then loads it with
``noisecraft.checkpoints.load_checkpoint`` in a fresh subprocess per case and reports that
process's peak resident set size (``VmHWM``), also after every weight has been touched once
(loading assigns memory-mapped tensors, so pages become resident when first used), against the
size of the file and of the loaded weights.

    python benchmarks/load_memory.py [--dir DIR] [--keep] [--fp32-case]

Cases: float16 file loaded as float16 (no conversion: the weights stay views of the file), and,
with ``--fp32-case``, the same file upcast to float32 (per-tensor conversion; the float16 pages
are released after each tensor). Target: peak under 1.3x the loaded weights' size.

Result (2 CPU cores, Linux, torch 2.13 CPU, safetensors 0.8; imports alone take 0.39 GB):

    float16 file -> float16: file 2.13 GB, loaded weights 2.13 GB
      peak RSS during load        0.46 GB (weights are mapped, not yet resident)
      peak RSS, all weights used  2.59 GB = 1.21x weights (1.03x above the imports)
    float16 file -> float32: loaded weights 4.26 GB
      peak RSS during load        4.69 GB = 1.10x weights (1.01x above the imports)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status() -> dict[str, int]:
    """VmRSS / VmHWM / RssAnon / RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[name] = int(value.split()[0]) * 1024
    return out


def write_checkpoint(path: Path) -> None:
    """Random float16 weights with every key and shape of a real SD 1.5 single file."""
    import torch
    from safetensors.torch import save_file

    from noisecraft.models.text import build_text_encoder
    from noisecraft.models.unet import UNetModel
    from noisecraft.models.unet_configs import UNET_PRESETS
    from noisecraft.models.vae import SD_VAE, AutoencoderKL

    parts = (("model.diffusion_model.", UNetModel(UNET_PRESETS["sd15"], device="meta")),
             ("first_stage_model.", AutoencoderKL(SD_VAE, device="meta")),
             ("cond_stage_model.", build_text_encoder("sd1", device="meta")))
    g = torch.Generator().manual_seed(0)
    sd = {}
    for prefix, module in parts:
        for k, v in module.state_dict().items():
            sd[prefix + k] = (torch.randn(v.shape, generator=g) * 0.02).half()
    save_file(sd, path)


def measure(path: Path, dtype: str) -> dict:
    """Run in a subprocess: load, report memory (bytes)."""
    import torch

    from noisecraft.checkpoints import load_checkpoint

    before = _status()
    bundle = load_checkpoint(path, dtype=getattr(torch, dtype), hash_file=False)
    after_load = _status()
    weights = 0
    checksum = 0.0
    for module in (bundle.unet, bundle.vae, bundle.text_encoder):
        for p in module.parameters():
            weights += p.numel() * p.element_size()
            checksum += float(p.float().sum()) if p.numel() < 2**24 else float(p.sum())
    touched = _status()
    return {"dtype": dtype, "before": before, "after_load": after_load, "touched": touched,
            "weights_bytes": weights, "file_bytes": path.stat().st_size}


def _run_case(path: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", str(path), dtype], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _report(r: dict) -> str:
    gb = 1e9
    w, f = r["weights_bytes"], r["file_bytes"]
    base = r["before"]["VmRSS"]
    load_peak = r["after_load"]["VmHWM"]
    touched_peak = r["touched"]["VmHWM"]
    return (
        f"float16 file -> {r['dtype']}: file {f / gb:.2f} GB, loaded weights {w / gb:.2f} GB, "
        f"RSS before load {base / gb:.2f} GB\n"
        f"  peak RSS during load      {load_peak / gb:.2f} GB = {load_peak / w:.2f}x weights "
        f"({(load_peak - base) / w:.2f}x above the imports)\n"
        f"  peak RSS, all weights used {touched_peak / gb:.2f} GB = {touched_peak / w:.2f}x "
        f"weights ({(touched_peak - base) / w:.2f}x above the imports); "
        f"file-backed {r['touched']['RssFile'] / gb:.2f} GB, anonymous "
        f"{r['touched']['RssAnon'] / gb:.2f} GB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=None, help="where to write the checkpoint")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoint")
    parser.add_argument("--fp32-case", action="store_true",
                        help="also load upcast to float32 (needs ~5 GB of free memory)")
    parser.add_argument("--write", type=Path, help=argparse.SUPPRESS)  # subprocess steps
    parser.add_argument("--measure", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        return write_checkpoint(args.write)
    if args.measure:
        return print(json.dumps(measure(Path(args.measure[0]), args.measure[1])))
    folder = Path(args.dir or tempfile.mkdtemp(prefix="noisecraft-bench-"))
    path = folder / "sd15-random-fp16.safetensors"
    if not path.exists():
        subprocess.run([sys.executable, __file__, "--write", str(path)], check=True, cwd=ROOT)
    try:
        for dtype in ("float16", *(("float32",) if args.fp32_case else ())):
            print(_report(_run_case(path, dtype)), flush=True)
    finally:
        if not args.keep:
            os.remove(path)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
