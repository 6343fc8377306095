"""``noisecraft train-lora``: LoRA fine-tuning of a checkpoint (registered on ``cli.app``).

Kept beside ``cli.py`` rather than in it so that file stays short; like it, this only parses
arguments and calls the engine (``noisecraft.training.lora_train``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

UNET_TARGETS_HELP = ("U-Net layers to adapt, comma-separated: to_q,to_k,to_v,to_out.0 (default), "
                     "proj_in, proj_out, ff.net.0.proj, ff.net.2, or 'all'.")
TEXT_TARGETS_HELP = ("Text-encoder layers to adapt, comma-separated: q_proj, k_proj, v_proj, "
                     "out_proj, fc1, fc2, or 'all' (default: none, U-Net only).")


def _targets(text: str, every: tuple[str, ...]) -> tuple[str, ...]:
    if text.strip() == "all":
        return every
    return tuple(t.strip() for t in text.split(",") if t.strip())


def train_lora(
    data: Annotated[str, typer.Argument(help="Image folder with captions (.txt or "
                                             "metadata.jsonl).")],
    base: Annotated[Path, typer.Option(help="Checkpoint to fine-tune (.safetensors, .ckpt or "
                                            "a diffusers folder).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
    name: Annotated[str, typer.Option(help="LoRA file name: OUT/NAME.safetensors.")] = "lora",
    rank: Annotated[int, typer.Option(help="LoRA rank (network dim).")] = 4,
    alpha: Annotated[float | None, typer.Option(help="LoRA alpha [default: the rank].")] = None,
    unet_targets: Annotated[str, typer.Option(help=UNET_TARGETS_HELP)] = "to_q,to_k,to_v,to_out.0",
    text_targets: Annotated[str, typer.Option(help=TEXT_TARGETS_HELP)] = "",
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per step.")] = 1,
    grad_accum: Annotated[int, typer.Option(help="Micro-batches per step.")] = 1,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    warmup_steps: Annotated[int, typer.Option(help="Linear lr warm-up steps.")] = 0,
    resolution: Annotated[int, typer.Option(help="Training image size.")] = 512,
    caption_dropout: Annotated[float, typer.Option(help="Probability of an empty caption.")] = (
        0.0
    ),
    random_crop: Annotated[bool, typer.Option(help="Random (not centre) square crops.")] = False,
    flip: Annotated[bool, typer.Option(help="Random horizontal flips.")] = False,
    min_snr: Annotated[float | None, typer.Option(help="Min-SNR gamma (e.g. 5).")] = None,
    family: Annotated[str | None, typer.Option(help="Override the detected family (sd2-v).")] = (
        None
    ),
    sample_prompt: Annotated[list[str] | None, typer.Option(
        help="Prompt of the sample grids (repeatable; none: no samples).")] = None,
    sample_every: Annotated[int, typer.Option(help="Sample-grid interval (0: none).")] = 500,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint interval.")] = 500,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of the adapters, noise and data order.")] = 0,
) -> None:
    """Fine-tune a LoRA on captioned images; writes a kohya-format LoRA file (what the
    project's LoRA loader, AUTOMATIC1111 and ComfyUI apply)."""
    from noisecraft.checkpoints.files import CheckpointError
    from noisecraft.cli_common import fail
    from noisecraft.training import lora_network as ln
    from noisecraft.training import lora_train as lt
    from noisecraft.training.datasets import DatasetError

    try:
        config = lt.LoRATrainConfig(
            base=base,
            data=lt.DataConfig(source=data, resolution=resolution, random_crop=random_crop,
                               random_flip=flip, caption_dropout=caption_dropout, seed=seed),
            network=ln.LoRANetworkConfig(
                rank=rank, alpha=alpha, unet_targets=_targets(unet_targets, ln.UNET_TARGETS),
                text_targets=_targets(text_targets, ln.TEXT_TARGETS)),
            optim=lt.OptimConfig(lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                                 warmup_steps=warmup_steps, ema_decay=None),
            run=lt.RunConfig(out_dir=out, steps=steps, seed=seed, resume=resume,
                             sample_every=sample_every if sample_prompt else 0,
                             checkpoint_every=checkpoint_every),
            samples=lt.SampleConfig(prompts=tuple(sample_prompt or ())),
            min_snr_gamma=min_snr, family=family, name=name,
        )
        result = lt.train_lora(config)
    except (CheckpointError, DatasetError, ValueError, FileExistsError, FileNotFoundError) as e:
        fail(str(e))
    typer.echo(f"step {result.step}: {result.model_path or 'unfinished; run again to resume'}")
