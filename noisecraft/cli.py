"""The command line.  Parses arguments and calls the engine; no diffusion logic lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    name="noisecraft",
    help="Diffusion-model image generation you can see into.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """Diffusion-model image generation you can see into."""


@app.command()
def samplers() -> None:
    """List the sampler and spacing (scheduler) names."""
    from noisecraft.samplers import sampler_names
    from noisecraft.schedules import COMFY_SPACINGS, SPACINGS

    typer.echo("samplers:  " + " ".join(sampler_names()))
    typer.echo("spacings:  " + " ".join(COMFY_SPACINGS))
    typer.echo(
        "diffusers timestep spacings:  "
        + " ".join(s for s in SPACINGS if s not in COMFY_SPACINGS)
    )


@app.command()
def noise(
    image: Annotated[Path, typer.Argument(help="Image to noise (any format Pillow reads).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Strip PNG to write.")],
    schedule: Annotated[str, typer.Option(help="scaled_linear | linear | cosine")] = (
        "scaled_linear"
    ),
    steps: Annotated[int, typer.Option(help="Tiles, t evenly from 0 to T-1.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of the noise draw.")] = 0,
    plot: Annotated[
        Path | None, typer.Option(help="Schedule plot PNG [default: OUT_schedule.png].")
    ] = None,
) -> None:
    """The forward process q(x_t | x0) as a strip of tiles, plus alpha_bar and log-SNR vs t."""
    from noisecraft.viz.figures import write_noise_figures

    try:
        paths = write_noise_figures(image, out, schedule, steps, seed, plot)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    typer.echo("wrote " + " and ".join(map(str, paths)))


@app.command()
def toy(
    data: Annotated[str, typer.Option(help="spiral | moons | eight (1-D, all 8s).")] = "moons",
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 50,
    sampler: Annotated[str, typer.Option(help="See `noisecraft samplers`.")] = "euler",
    train_steps: Annotated[int, typer.Option(help="Training steps of the MLP.")] = 3000,
    seed: Annotated[int, typer.Option(help="Seed of data, weights and sampling.")] = 0,
    out: Annotated[Path, typer.Option("-o", "--out", help="Picture PNG to write.")] = Path(
        "toy.png"
    ),
) -> None:
    """Train a tiny MLP diffusion model on toy data, sample it, and draw what it learned."""
    from noisecraft.viz.figures import write_toy_figure

    try:
        r = write_toy_figure(data, out, sampler, steps, train_steps, seed)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    mean = ", ".join(f"{v:.3f}" for v in r.sample_mean)
    typer.echo(
        f"trained in {r.train_seconds:.1f}s (loss {r.final_loss:.3f}); sample mean [{mean}], "
        f"mean distance to nearest data point {r.nn_distance:.3f}; wrote {r.path}"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
