"""Draw the pictures of docs/walkthrough.md from the built-in default model and its training run.

    python scripts/default_model_walkthrough.py [--run RUN_ROOT] [--out docs/walkthrough]

1. ``forward.png`` / ``forward_schedule.png``: the forward process q(x_t | x_0) on one training
   image of the shapes data (``noisecraft noise``).
2. ``training_loss.png`` and ``training_step_<N>.png``: the diffusion stage's loss curve and the
   sample grids the trainer wrote during the run (needs ``--run``; skipped when absent).
3. ``denoise.gif`` / ``denoise.png``: ``noisecraft generate --gif`` with the default model.
4. ``steps_cfg.png``: one prompt and seed at several step counts (rows) and CFG scales (columns).

Everything goes through the public entry points (CLI, ``Engine``), so the pictures show what a
user gets.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from pathlib import Path

from PIL import Image, ImageDraw

PROMPT = "a big red circle in the middle on a blue background"
SEED = 3
STEPS = (4, 8, 20, 40)
CFGS = (1.0, 3.0, 7.0, 12.0)


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "noisecraft.cli", *args], check=True)


def forward(out: Path) -> None:
    from noisecraft.training.shapes import ShapesDataset

    image = out / "training_image.png"
    ShapesDataset(count=1, size=128, seed=1).__getitem__(0).image.save(image)
    _cli("noise", str(image), "-o", str(out / "forward.png"), "--plot",
         str(out / "forward_schedule.png"))


def training(run: Path, out: Path) -> None:
    diffusion = run / "diffusion"
    samples = sorted((diffusion / "samples").glob("step_*.png"))
    for grid in samples:
        shutil.copyfile(grid, out / grid.name.replace("step_", "training_step_"))
    rows = list(csv.DictReader((diffusion / "metrics.csv").open()))
    if not rows:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [int(r["step"]) for r in rows]
    loss = [float(r["loss"]) for r in rows]
    k = 20  # moving average over 20 log points (200 steps)
    smooth = [sum(loss[max(0, i - k + 1): i + 1]) / len(loss[max(0, i - k + 1): i + 1])
              for i in range(len(loss))]
    fig, ax = plt.subplots(figsize=(6, 3), dpi=100)
    ax.plot(steps, loss, color="0.8", lw=0.8, label="loss (batch of 16)")
    ax.plot(steps, smooth, color="C0", lw=1.5, label="moving average")
    ax.set_xlabel("training step")
    ax.set_ylabel("min-SNR weighted eps MSE")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "training_loss.png")
    plt.close(fig)


def denoise(out: Path) -> None:
    _cli("generate", PROMPT, "--seed", str(SEED), "--steps", "20", "--gif",
         str(out / "denoise.gif"), "-o", str(out / "denoise.png"))


def steps_cfg(out: Path) -> None:
    from noisecraft.engine import Engine
    from noisecraft.request import GenerationRequest

    engine = Engine()
    tiles = {}
    for steps in STEPS:
        for cfg in CFGS:
            request = GenerationRequest(PROMPT, seed=SEED, steps=steps, cfg_scale=cfg)
            tiles[steps, cfg] = engine.generate(request).images[0].image
    size, label = next(iter(tiles.values())).width, 60
    sheet = Image.new("RGB", (label + size * len(CFGS), 20 + size * len(STEPS)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, cfg in enumerate(CFGS):
        draw.text((label + j * size + 4, 4), f"CFG {cfg:g}", fill="black")
    for i, steps in enumerate(STEPS):
        draw.text((4, 20 + i * size + size // 2), f"{steps} steps", fill="black")
        for j, cfg in enumerate(CFGS):
            sheet.paste(tiles[steps, cfg], (label + j * size, 20 + i * size))
    sheet.save(out / "steps_cfg.png")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, default=Path("~/noisecraft-runs/default").expanduser())
    p.add_argument("--out", type=Path, default=Path("docs/walkthrough"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    forward(args.out)
    if (args.run / "diffusion" / "metrics.csv").exists():
        training(args.run, args.out)
    denoise(args.out)
    steps_cfg(args.out)


if __name__ == "__main__":
    main()
