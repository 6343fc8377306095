"""The command line.  Parses arguments and calls the engine; no diffusion logic lives here."""

from __future__ import annotations

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
