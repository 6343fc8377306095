"""The command line.  Parses arguments and calls the engine; no diffusion logic lives here."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from noisecraft.cli_common import BACKEND_HELP, Progress, fail, make_engine
from noisecraft.cli_lora import train_lora
from noisecraft.cli_upscale import upscale

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
    train_steps: Annotated[int, typer.Option(help="Training steps of the MLP.")] = 2000,
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


def _parse_outpaint(text: str | None) -> tuple[int, int, int, int]:
    if not text:
        return (0, 0, 0, 0)
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) == 1:
        values = values * 4
    if len(values) != 4:
        raise typer.BadParameter(
            f"--outpaint takes N or LEFT,TOP,RIGHT,BOTTOM pixel counts, got {text!r}"
        )
    return tuple(values)


def _parse_controlnet(spec: str):
    """``MODEL:IMAGE[:STRENGTH]`` -> a ControlNetUnit (paths without ':')."""
    from noisecraft.request import ControlNetUnit

    parts = spec.split(":")
    strength = 1.0
    if len(parts) == 3:
        try:
            strength = float(parts[2])
        except ValueError:
            parts = []
    if len(parts) not in (2, 3) or not all(parts[:2]):
        raise typer.BadParameter(
            f"--controlnet takes MODEL:IMAGE[:STRENGTH] (a ControlNet file, a control image, "
            f"an optional number; paths without ':'), got {spec!r}"
        )
    return ControlNetUnit(parts[0], parts[1], strength)


def _parse_lora(spec: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]`` (a LoRA file, or a name in --loras-dir) -> (path, weight)."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            return head, float(tail)
        except ValueError:
            if not Path(spec).is_file():
                raise typer.BadParameter(
                    f"--lora takes PATH[:WEIGHT] (a LoRA file or a name in --loras-dir, an "
                    f"optional number), got {spec!r}") from None
    return spec, 1.0


def _output_paths(out: Path, n: int) -> list[Path]:
    return [out] if n == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def _engine_names(ctx: typer.Context) -> tuple[str, ...]:
    """Model/ControlNet names on an engine handed in via ``ctx.obj`` (a new one has none)."""
    engine = (ctx.obj or {}).get("engine")
    return (*engine.cached_models, *engine.cached_controlnets) if engine is not None else ()


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Argument(help="The prompt (weighting syntax ok).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output .png")] = Path("out.png"),
    negative: Annotated[str, typer.Option("--negative", "-n", help="Negative prompt.")] = "",
    model: Annotated[str | None, typer.Option("--model", "-m",
                                              help="Checkpoint path (default: built-in).")] = None,
    steps: Annotated[int, typer.Option(help="Sampling steps.")] = 20,
    cfg: Annotated[float, typer.Option("--cfg", help="Classifier-free guidance scale.")] = 7.0,
    ngms: Annotated[float, typer.Option(
        "--ngms", help="A1111's Negative Guidance minimum sigma: below this sigma every other "
                       "step skips the negative-prompt pass (0 = off).")] = 0.0,
    ngms_all_steps: Annotated[bool, typer.Option(
        "--ngms-all-steps", help="With --ngms: skip on every step below it, not every other "
                                 "(A1111's 'NGMS all steps').")] = False,
    seed: Annotated[int | None, typer.Option(help="Seed (random if omitted).")] = None,
    sampler: Annotated[str, typer.Option(help="Sampler name (noisecraft samplers).")] = "euler",
    scheduler: Annotated[str, typer.Option(help="Spacing / scheduler name.")] = "normal",
    steps_offset: Annotated[int | None, typer.Option(
        help="diffusers' steps_offset of --scheduler leading (default: the model's, 1 for SD).")
    ] = None,
    width: Annotated[int | None, typer.Option("--width", "-W", help="Multiple of 8.")] = None,
    height: Annotated[int | None, typer.Option("--height", "-H", help="Multiple of 8.")] = None,
    batch: Annotated[int, typer.Option("--batch", help="Images (seeds seed..seed+n-1).")] = 1,
    init: Annotated[Path | None, typer.Option("--init", help="Init image (img2img).")] = None,
    strength: Annotated[float, typer.Option(help="img2img / inpaint denoising strength.")] = 0.75,
    mask: Annotated[Path | None, typer.Option(help="Inpainting mask (white = repaint).")] = None,
    mask_blur: Annotated[int, typer.Option(help="Mask blur, pixels.")] = 4,
    mask_grow: Annotated[int, typer.Option(help="Mask grow (<0 shrink), pixels.")] = 0,
    outpaint: Annotated[str | None, typer.Option(help="N or LEFT,TOP,RIGHT,BOTTOM px.")] = None,
    hires_scale: Annotated[float, typer.Option(help="Hires fix factor (1 = off).")] = 1.0,
    hires_upscale: Annotated[str, typer.Option(help="latent or image.")] = "latent",
    hires_steps: Annotated[int | None, typer.Option(help="Hires pass steps.")] = None,
    hires_strength: Annotated[float, typer.Option(help="Hires pass strength.")] = 0.5,
    clip_skip: Annotated[int | None, typer.Option(help="1 = last layer.")] = None,
    controlnet: Annotated[list[str] | None, typer.Option(
        "--controlnet", help="MODEL:IMAGE[:STRENGTH] ControlNet file, control image, strength "
                             "(default 1); repeat for several.")] = None,
    embeddings: Annotated[Path | None, typer.Option(
        "--embeddings", help="Folder of textual-inversion embeddings the prompt may name.")
    ] = None,
    lora: Annotated[list[str] | None, typer.Option(
        "--lora", help="PATH[:WEIGHT] LoRA file (or name in --loras-dir) and weight (default "
                       "1); repeat for several.")] = None,
    loras_dir: Annotated[Path | None, typer.Option(
        "--loras-dir", help="Folder of LoRA files that <lora:NAME:WEIGHT> tags name.")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    backend: Annotated[str | None, typer.Option(help=BACKEND_HELP)] = None,
    gif: Annotated[Path | None, typer.Option(help="Write the denoising animation.")] = None,
    preview: Annotated[Path | None, typer.Option(help="Folder for live preview.png.")] = None,
    taesd: Annotated[Path | None, typer.Option(help="TAESD decoder for previews.")] = None,
    from_image: Annotated[Path | None, typer.Option(
        "--from", help="Re-create an image from its metadata (other flags but -o, -m ignored; "
                       "relative paths in it: from the current folder, else the image's).")
    ] = None,
) -> None:
    """Generate images: txt2img, img2img (--init), inpaint (--mask), outpaint, hires fix."""
    from noisecraft.metadata import read_settings, save_png
    from noisecraft.request import GenerationRequest, InputError
    from noisecraft.settings_paths import resolve_settings_paths

    try:
        if output.suffix.lower() != ".png":
            raise InputError(f"-o must name a .png file (it carries the settings), got {output}")
        if from_image is not None:
            overrides = {"model": model} if model is not None else {}
            settings = resolve_settings_paths(read_settings(from_image), from_image,
                                              names=_engine_names(ctx), skip=overrides)
            request = GenerationRequest.from_settings(settings, **overrides)
        elif prompt is None:
            raise InputError("give a PROMPT, or --from IMAGE.png")
        else:
            request = GenerationRequest(
                prompt=prompt, negative_prompt=negative, model=model, steps=steps,
                cfg_scale=cfg, uncond_min_sigma=ngms, uncond_min_sigma_all_steps=ngms_all_steps,
                seed=seed, sampler=sampler, scheduler=scheduler,
                steps_offset=steps_offset, width=width,
                height=height, batch_size=batch, clip_skip=clip_skip, init_image=init,
                strength=strength, mask=mask, mask_blur=mask_blur, mask_grow=mask_grow,
                outpaint=_parse_outpaint(outpaint), hires_scale=hires_scale,
                hires_upscale=hires_upscale, hires_steps=hires_steps,
                hires_strength=hires_strength,
                controlnets=tuple(_parse_controlnet(c) for c in controlnet or ()),
                embeddings_dir=embeddings,
                loras=tuple(_parse_lora(spec) for spec in lora or ()), loras_dir=loras_dir,
            )
        engine = make_engine(ctx, device, dtype, backend)
        if from_image is not None and settings.get("sd_upscale"):
            _rerun_sd_upscale(engine, request, settings["sd_upscale"], output)
            return
        progress = Progress(engine, engine.model(request.model), gif, preview, taesd)
        try:
            result = engine.generate(request, callback=progress)
        finally:
            progress.close()
    except (ValueError, FileNotFoundError, typer.BadParameter) as e:
        fail(str(e))
    for path, item in zip(_output_paths(output, len(result.images)), result.images, strict=True):
        save_png(item.image, path, item.settings)
        typer.echo(f"{path}  seed {item.seed}")
    progress.write_gif()


def _rerun_sd_upscale(engine, request, upscale: dict, output: Path) -> None:
    """``--from`` an image made by SD upscale: the same tiled run, not a plain img2img."""
    from noisecraft.metadata import save_png
    from noisecraft.pipelines.sd_upscale import sd_upscale

    progress = Progress(engine)
    try:
        result = sd_upscale(engine, request, scale=upscale["scale"],
                            upscaler=upscale["upscaler"], tile=tuple(upscale["tile"]),
                            overlap=upscale["overlap"], callback=progress)
    finally:
        progress.close()
    save_png(result.image, output, result.settings)
    typer.echo(f"{output}  seed {result.seed}")


QUEUE_HELP = "Job queue: sqlite (queue.db in the data folder) or redis (workers anywhere)."
REDIS_URL_HELP = "Redis of --queue redis: redis://[:PASSWORD@]HOST:PORT/DB."


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port (ComfyUI's default 8188).")] = 8188,
    data_dir: Annotated[Path, typer.Option(help="Queue, inputs, outputs and models.")] = Path(
        "noisecraft-data"
    ),
    api_auth: Annotated[str | None, typer.Option(help="HTTP Basic USER:PASSWORD.")] = None,
    api_key: Annotated[str | None, typer.Option(help="Key for 'Authorization: Bearer'.")] = None,
    insecure: Annotated[bool, typer.Option(help="Allow non-local listening without auth.")] = (
        False
    ),
    cors_allow: Annotated[
        list[str] | None, typer.Option(help="Allowed CORS origin (repeatable); none by default.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Worker processes to start (0: none).")] = 1,
    device: Annotated[str | None, typer.Option(help="Workers' device (cpu, cuda).")] = None,
    backend: Annotated[str | None, typer.Option(help=BACKEND_HELP)] = None,
    lease_seconds: Annotated[float, typer.Option(help="Job lease; renewed while running.")] = (
        30.0
    ),
    web_dir: Annotated[Path | None, typer.Option(help="Static web UI folder, served at /.")] = (
        None
    ),
    queue: Annotated[str, typer.Option(help=QUEUE_HELP)] = "sqlite",
    redis_url: Annotated[str | None, typer.Option(help=REDIS_URL_HELP,
                                                  envvar="NOISECRAFT_REDIS_URL")] = None,
) -> None:
    """Serve the ComfyUI and AUTOMATIC1111 APIs; workers run the jobs."""
    from noisecraft.server.config import Auth, ConfigError, QueueConfig, ServerConfig

    try:
        config = ServerConfig(
            host=host, port=port, data_dir=data_dir, auth=Auth.parse(api_auth, api_key),
            insecure=insecure, cors_allow=tuple(cors_allow or ()), workers=workers,
            device=device, web_dir=web_dir, compute_backend=backend,
            queue=QueueConfig(lease_seconds=lease_seconds, backend=queue, redis_url=redis_url),
        ).check()
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    from noisecraft.server.app import serve as run_server

    run_server(config)


@app.command()
def worker(
    data_dir: Annotated[Path, typer.Option(help="The server's data folder.")] = Path(
        "noisecraft-data"
    ),
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    lease_seconds: Annotated[float, typer.Option(help="Job lease; renewed while running.")] = (
        30.0
    ),
    poll_seconds: Annotated[float, typer.Option(help="Idle wait between queue polls.")] = 0.2,
    max_jobs: Annotated[int | None, typer.Option(help="Exit after this many jobs.")] = None,
    backend: Annotated[str | None, typer.Option(help=BACKEND_HELP)] = None,
    queue: Annotated[str, typer.Option(help=QUEUE_HELP)] = "sqlite",
    redis_url: Annotated[str | None, typer.Option(help=REDIS_URL_HELP,
                                                  envvar="NOISECRAFT_REDIS_URL")] = None,
) -> None:
    """Run jobs from a server's queue (the server starts these; run more on other machines
    that share the data folder, with --queue redis)."""
    from noisecraft.server.config import ConfigError, QueueConfig, WorkerConfig
    from noisecraft.server.worker import run_worker_process

    try:
        queue_config = QueueConfig(lease_seconds=lease_seconds, poll_seconds=poll_seconds,
                                   backend=queue, redis_url=redis_url)
        config = WorkerConfig(data_dir=data_dir, device=device, max_jobs=max_jobs,
                              queue=queue_config, compute_backend=backend).check()
    except ConfigError as e:
        raise typer.BadParameter(str(e)) from None
    run_worker_process(config)


@app.command()
def train(
    data: Annotated[str, typer.Argument(help="Image folder with captions, or 'shapes'.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run directory.")],
    steps: Annotated[int, typer.Option(help="Optimiser steps.")] = 1000,
    batch_size: Annotated[int, typer.Option(help="Images per step and process.")] = 8,
    lr: Annotated[float, typer.Option(help="AdamW learning rate.")] = 1e-4,
    resolution: Annotated[int, typer.Option(help="Training image size.")] = 128,
    objective: Annotated[str, typer.Option(help="eps or v.")] = "eps",
    min_snr: Annotated[float | None, typer.Option(help="Min-SNR gamma (e.g. 5).")] = None,
    ema: Annotated[float | None, typer.Option(help="EMA decay (e.g. 0.999).")] = 0.999,
    vae: Annotated[Path | None, typer.Option(help="Trained VAE file (latent space).")] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint.")] = True,
    seed: Annotated[int, typer.Option(help="Seed of weights, noise and data order.")] = 0,
    sample_every: Annotated[int, typer.Option(help="Sample-grid interval (0: none).")] = 500,
    checkpoint_every: Annotated[int, typer.Option(help="Checkpoint interval.")] = 500,
) -> None:
    """Train the default text-to-image architecture on captioned images (DDP under torchrun)."""
    from noisecraft.training import default_model as dm
    from noisecraft.training import trainer as t
    from noisecraft.training.datasets import DatasetError

    try:
        config = t.TrainConfig(
            model=dm.model_config(vae),
            data=t.DataConfig(source=data, resolution=resolution, seed=seed),
            objective=t.ObjectiveConfig(prediction=objective, min_snr_gamma=min_snr),
            optim=t.OptimConfig(lr=lr, batch_size=batch_size, ema_decay=ema),
            run=t.RunConfig(out_dir=out, steps=steps, seed=seed, resume=resume,
                            sample_every=sample_every, checkpoint_every=checkpoint_every),
        )
        result = t.train(config)
    except (DatasetError, ValueError, FileExistsError) as e:
        fail(str(e))
    typer.echo(f"step {result.step}: {result.model_path or 'unfinished; run again to resume'}")


app.command("train-lora")(train_lora)
app.command()(upscale)


def _parse_sets(items: list[str]) -> dict:
    """``NODE.INPUT=VALUE`` pairs; VALUE is JSON when it parses (42, 7.5, true, "x"), else text."""
    import json

    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or "." not in key:
            raise ValueError(f"--set {item!r} must look like NODE.INPUT=VALUE, e.g. 3.seed=42")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


@app.command()
def run(
    ctx: typer.Context,
    workflow: Annotated[Path, typer.Argument(help="Workflow JSON (ComfyUI API or editor format).")],
    sets: Annotated[list[str] | None, typer.Option(
        "--set", help="Override an input: NODE.INPUT=VALUE (repeatable).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="Output folder.")] = Path("output"),
    models: Annotated[Path, typer.Option(help="Models folder (ComfyUI layout).")] = Path("models"),
    model_paths: Annotated[Path | None, typer.Option(
        help="extra_model_paths.yaml/.toml naming ComfyUI or A1111 model folders.")] = None,
    input_dir: Annotated[Path | None, typer.Option(
        "--input", help="Folder LoadImage reads from (default: the workflow's folder).")] = None,
    device: Annotated[str | None, typer.Option(help="cpu, cuda, ...")] = None,
    backend: Annotated[str | None, typer.Option(help=BACKEND_HELP)] = None,
) -> None:
    """Run a ComfyUI workflow through noisecraft's nodes; images go to the output folder."""
    from tqdm import tqdm

    from noisecraft.engine import Engine
    from noisecraft.graph import ExecutionContext, NodeExecutionError, PromptValidationError
    from noisecraft.graph import run_workflow as run_graph
    from noisecraft.graph.registry import NodeRegistry
    from noisecraft.graph.ui_graph import WorkflowFormatError
    from noisecraft.models_folder import ModelFolders
    from noisecraft.nodes import register_builtin_nodes

    bars: dict[str, tqdm] = {}

    def on_event(name: str, data: dict) -> None:
        if name == "progress":
            bar = bars.get(data["node"])
            if bar is None:
                bar = bars[data["node"]] = tqdm(total=data["max"], desc=f"node {data['node']}",
                                                unit="step")
            bar.update(data["value"] - bar.n)

    try:
        folders = ModelFolders.load(models, model_paths)
        context = ExecutionContext(
            input_dir=input_dir or workflow.parent, output_dir=output,
            resources={"engine": (ctx.obj or {}).get("engine")
                       or Engine(device=device, backend=backend),
                       "models": folders})
        output.mkdir(parents=True, exist_ok=True)
        outputs = run_graph(workflow, registry=register_builtin_nodes(NodeRegistry()),
                            context=context, overrides=_parse_sets(sets or []),
                            on_event=on_event)
    except PromptValidationError as e:
        fail(f"the workflow is not valid; nothing ran:\n{e}")
    except (WorkflowFormatError, KeyError, ValueError) as e:
        fail(str(e))
    except NodeExecutionError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1) from None
    finally:
        for bar in bars.values():
            bar.close()
    for node_id, ui in outputs.items():
        for image in ui.get("images", []):
            folder = context.folder(image.get("type", "output")) / image.get("subfolder", "")
            typer.echo(f"{folder / image['filename']}  (node {node_id})")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
