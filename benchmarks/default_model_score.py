"""How well the built-in default model draws what it is asked for: held-out shape prompts,
scored by the procedural shape checker.

For each prompt of ``noisecraft.training.shapes.heldout_prompts(200)`` (attribute combinations
the training data never shows) one image is generated through the normal engine path
(``Engine.generate``; image i uses seed ``--seed + i``), at each CFG scale, and
``noisecraft.training.shape_checker.score`` reads colour, shape, position, size and background
back from the pixels.  Prints a markdown table per CFG scale and writes JSON to
``benchmarks/results/default_model_score-<time>.json``.

    python benchmarks/default_model_score.py [--model PATH] [--limit N] [--cfg 1 7] [--steps 20]

``--model`` defaults to the built-in default model (``noisecraft/weights/default.safetensors``).
Chance level is roughly 1/8 colour, 1/3 shape, 1/9 position, 1/3 size; ``all`` counts images
matching every attribute their prompt states.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from noisecraft.engine import Engine
from noisecraft.request import GenerationRequest
from noisecraft.training.shape_checker import score
from noisecraft.training.shapes import OPTIONAL_ATTRIBUTES, heldout_specs

RESULTS = Path(__file__).parent / "results"
HELDOUT = 200
COLUMNS = ("color", "shape", "position", "size", "background", "all")
DEFAULT_CFG = next(f.default for f in dataclasses.fields(GenerationRequest)
                   if f.name == "cfg_scale")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None,
                   help="checkpoint file (default: the built-in default model)")
    p.add_argument("--limit", type=int, default=None,
                   help=f"score only the first N of the {HELDOUT} held-out prompts")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, DEFAULT_CFG],
                   help=f"CFG scales to compare (default 1.0 and {DEFAULT_CFG})")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance-rescale", type=float, default=0.0,
                   help="CFG rescale (Lin et al. 2023; 0.7 suits zero-terminal-SNR models)")
    p.add_argument("--grid", type=Path, default=None,
                   help="also save the first 16 images of each CFG as a PNG grid here")
    p.add_argument("--omit", default="",
                   help="comma-separated, from size,position,background: leave these out of "
                        "every prompt (short prompts such as 'a red circle'); unstated "
                        "attributes are not scored")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", type=Path, default=None, help="JSON path (default: in results/)")
    args = p.parse_args(argv)
    unknown = sorted(set(filter(None, args.omit.split(","))) - set(OPTIONAL_ATTRIBUTES))
    if unknown:
        p.error(f"--omit {','.join(unknown)}: choose from {','.join(OPTIONAL_ATTRIBUTES)}")
    if args.limit is not None and not 1 <= args.limit <= HELDOUT:
        p.error(f"--limit must be between 1 and {HELDOUT}, got {args.limit}")
    return args


def generate_all(engine: Engine, prompts: list[str], args, cfg: float) -> list:
    images = []
    for i, prompt in enumerate(prompts):
        request = GenerationRequest(prompt=prompt, model=args.model, steps=args.steps,
                                    cfg_scale=cfg, seed=args.seed + i, sampler=args.sampler,
                                    scheduler=args.scheduler,
                                    guidance_rescale=args.guidance_rescale)
        images.append(engine.generate(request).images[0].image)
    return images


def save_grid(images: list, path: Path, cols: int = 8) -> None:
    """``images`` side by side, ``cols`` per row, in prompt order."""
    from PIL import Image

    w, h = images[0].size
    rows = -(-len(images) // cols)
    sheet = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    sheet.save(path)


def _cell(value: float) -> str:
    return "-" if math.isnan(value) else f"{100 * value:.1f}%"


def markdown(rows: list[dict]) -> str:
    lines = ["| CFG | " + " | ".join(COLUMNS) + " | n |",
             "|---:|" + "---:|" * (len(COLUMNS) + 1)]
    for row in rows:
        cells = [_cell(row["scores"][c]) for c in COLUMNS]
        lines.append(f"| {row['cfg']:g} | " + " | ".join(cells) + f" | {int(row['scores']['n'])} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    omit = tuple(a for a in args.omit.split(",") if a)
    prompts = [spec.caption(omit=omit) for spec in heldout_specs(HELDOUT)[: args.limit]]
    engine = Engine(device="cpu")
    bundle = engine.model(args.model)
    rows = []
    for cfg in args.cfg:
        start = time.perf_counter()
        images = generate_all(engine, prompts, args, cfg)
        if args.grid is not None:
            save_grid(images[:16], args.grid.with_name(f"{args.grid.stem}-cfg{cfg:g}.png"))
        rows.append({"cfg": cfg, "scores": score(images, prompts),
                     "seconds": round(time.perf_counter() - start, 2)})
        print(f"cfg {cfg:g}: {len(images)} images in {rows[-1]['seconds']} s", flush=True)
    table = markdown(rows)
    print(f"\nmodel {bundle.name} ({bundle.short_hash}), {bundle.family.native_size}px, "
          f"{args.steps} steps {args.sampler}/{args.scheduler}, {len(prompts)} held-out prompts\n")
    print(table)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d-%H%M")
    out = args.out or RESULTS / f"default_model_score-{stamp}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "model": str(engine.default_model if args.model is None else args.model),
        "model_hash": bundle.short_hash, "native_size": bundle.family.native_size,
        "steps": args.steps, "sampler": args.sampler, "scheduler": args.scheduler,
        "guidance_rescale": args.guidance_rescale,
        "seed": args.seed, "prompts": len(prompts), "omit": list(omit), "rows": rows,
        "markdown": table,
    }
    out.write_text(json.dumps(result, indent=2, allow_nan=True) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    from noisecraft.request import InputError

    try:
        main()
    except InputError as e:  # e.g. DefaultModelMissing: the message says what to do
        raise SystemExit(f"default_model_score: {e}") from None
