"""``noisecraft upscale``: tiled diffusion upscaling, AUTOMATIC1111's "SD upscale" (registered
on ``cli.app``).

Like ``cli.py`` this only parses arguments and calls the pipeline
(:func:`noisecraft.pipelines.sd_upscale.sd_upscale`, the one behind ``sd_upscale_image`` and the
A1111 API's "SD upscale" script)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from noisecraft.cli_common import BACKEND_HELP, Progress, fail, make_engine

UPSCALER_HELP = ("lanczos, none (no enlargement; A1111's None), or an upscaler model file "
                 "(ESRGAN / Real-ESRGAN .pth or .safetensors).")


def upscale(
    ctx: typer.Context,
    image: Annotated[Path, typer.Argument(help="Image to upscale (any format Pillow reads).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .png")] = Path(
        "upscaled.png"),
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="Prompt of every tile (style "
                                                                "and quality words).")] = "",
    negative: Annotated[str, typer.Option("--negative", "-n", help="Negative prompt.")] = "",
    model: Annotated[str | None, typer.Option("--model", "-m",
                                              help="Checkpoint path (default: built-in).")] = None,
    scale: Annotated[float, typer.Option(help="Enlargement factor.")] = 2.0,
    upscaler: Annotated[str, typer.Option(help=UPSCALER_HELP)] = "lanczos",
    tile: Annotated[int | None, typer.Option(
        help="Tile size, px, multiple of 8 (default: the model's native size).")] = None,
    overlap: Annotated[int, typer.Option(help="Tile overlap, px, multiple of 8.")] = 64,
    strength: Annotated[float, typer.Option(help="Denoising strength of each tile.")] = 0.3,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    cfg: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale.")] = 7.0,
    seed: Annotated[int | None, typer.Option(help="Seed (random if omitted).")] = None,
    sampler: Annotated[str, typer.Option(help="Sampler name (noisecraft samplers).")] = "euler",
    scheduler: Annotated[str, typer.Option(help="Spacing / scheduler name.")] = "normal",
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    backend: Annotated[str | None, typer.Option(help=BACKEND_HELP)] = None,
) -> None:
    """Upscale an image, then re-detail it by img2img tile by tile (A1111's SD upscale)."""
    from noisecraft.metadata import save_png
    from noisecraft.pipelines.sd_upscale import check_scale, check_tiles, sd_upscale
    from noisecraft.request import GenerationRequest, InputError

    try:
        if output.suffix.lower() != ".png":
            raise InputError(f"-o must name a .png file (it carries the settings), got {output}")
        if not image.is_file():
            raise InputError(f"input image {image} does not exist")
        check_scale(scale)
        if tile is not None:
            check_tiles(tile, overlap)
        request = GenerationRequest(
            prompt=prompt, negative_prompt=negative, model=model, steps=steps, cfg_scale=cfg,
            seed=seed, sampler=sampler, scheduler=scheduler, init_image=image,
            strength=strength)
        engine = make_engine(ctx, device, dtype, backend)
        progress = Progress(engine)
        try:
            result = sd_upscale(engine, request, scale=scale, upscaler=upscaler, tile=tile,
                                overlap=overlap, callback=progress)
        finally:
            progress.close()
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    save_png(result.image, output, result.settings)
    w, h = result.image.size
    typer.echo(f"{output}  {w}x{h}  seed {result.seed}")
