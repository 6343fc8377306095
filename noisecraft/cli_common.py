"""What the commands of ``noisecraft`` share: the error exit, the engine they run on, the
step progress bars.  Kept out of ``cli.py`` so the commands in their own modules
(``cli_lora.py``, ``cli_upscale.py``) import it without importing the whole command line."""

from __future__ import annotations

from pathlib import Path

import typer

DTYPES = ("float32", "bfloat16", "float16")
BACKEND_HELP = ("Compute backend: onednn (default on CPU, float32-exact), eager, compiled, "
                "openvino, or *_bf16 of these (see noisecraft.backends).")


def fail(message: str) -> None:
    """Exit 2 with ``error: message`` on stderr (bad input: no traceback)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def make_engine(ctx: typer.Context, device: str | None, dtype: str, backend: str | None):
    """The engine handed in via ``ctx.obj["engine"]`` (tests), else a new one."""
    import torch

    from noisecraft.engine import Engine
    from noisecraft.request import InputError

    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    return (ctx.obj or {}).get("engine") or Engine(
        device=device, dtype=getattr(torch, dtype), backend=backend)


class Progress:
    """tqdm bar per stage (step, it/s, ETA), GIF frames and live previews from step events."""

    def __init__(self, engine, bundle=None, gif: Path | None = None,
                 preview: Path | None = None, taesd: Path | None = None):
        self.engine, self.bundle, self.gif, self.preview_dir = engine, bundle, gif, preview
        self.decoder = engine.preview_decoder(taesd) if taesd else None
        self.frames: list = []
        self.bar, self.stage = None, None

    def __call__(self, event) -> None:
        from tqdm import tqdm

        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=event.stage, unit="step")
        self.bar.update(1)
        if self.gif is None and self.preview_dir is None:
            return
        frame = self.engine.preview(self.bundle, event.x0[:1], self.decoder)[0]
        if self.gif is not None:
            self.frames.append(frame)
        if self.preview_dir is not None:
            from noisecraft.metadata import save_png

            save_png(frame, self.preview_dir / "preview.png", None)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def write_gif(self) -> None:
        if self.gif is not None and self.frames:
            self.gif.parent.mkdir(parents=True, exist_ok=True)
            self.frames[0].save(self.gif, save_all=True, append_images=self.frames[1:],
                                duration=120, loop=0)
