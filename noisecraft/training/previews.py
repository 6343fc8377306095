"""Sample grids during training: a few fixed prompts, a fixed seed, the real sampler with CFG.

The grid shows the same prompts and starting noise at every sample step, so the files of one
run form a progression.  Sampling draws from its own generator and never touches the
training RNG streams.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from noisecraft.diffusion import Denoiser
from noisecraft.guidance import cfg_denoiser
from noisecraft.models.family import Family
from noisecraft.samplers import sample
from noisecraft.schedules import spacing_sigmas

SHAPES_PROMPTS = (
    "a large red circle in the center on a blue background",
    "a small yellow square at the top left on a black background",
    "a medium green triangle at the bottom right on a white background",
    "a large purple square on the left on an orange background",
)


@dataclass(frozen=True)
class SampleConfig:
    """What the periodic sample grids show and how they are sampled."""

    prompts: tuple[str, ...] = SHAPES_PROMPTS
    seed: int = 0
    steps: int = 20
    sampler: str = "euler"
    spacing: str = "karras"
    cfg_scale: float = 4.0


@torch.no_grad()
def sample_images(cfg: SampleConfig, unet, text, vae, family: Family, size: int) -> torch.Tensor:
    """Images [N, 3, size, size] in [-1, 1] for ``cfg.prompts`` (float32, CPU)."""
    schedule = family.schedule()
    denoiser = family_denoiser(unet, family)
    f = 1 if vae is None else vae.config.downscale_factor
    shape = (1, family.latent.channels, size // f, size // f)
    sigmas = spacing_sigmas(cfg.spacing, schedule, cfg.steps).to(torch.float32)
    uncond = {"context": text.encode_prompt("").context}
    out = []
    for i, prompt in enumerate(cfg.prompts):
        g = torch.Generator().manual_seed(cfg.seed + i)
        x = torch.randn(shape, generator=g) * sigmas[0]
        cond = {"context": text.encode_prompt(prompt).context}
        bound = cfg_denoiser(denoiser, cond, uncond, cfg.cfg_scale)
        x0 = sample(cfg.sampler, bound, x, sigmas, generator=g)
        out.append(x0 if vae is None else vae.decode(family.latent.process_out(x0)))
    return torch.cat(out).clamp(-1, 1)


def family_denoiser(unet, family: Family) -> Denoiser:
    return Denoiser(unet, family.schedule(), family.prediction)


def image_grid(images: torch.Tensor, columns: int | None = None) -> Image.Image:
    """[N, 3, H, W] in [-1, 1] -> one RGB image, ``columns`` per row (default: all in a row)."""
    n, _, h, w = images.shape
    cols = columns or n
    rows = -(-n // cols)
    pixels = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    grid = np.zeros((rows * h, cols * w, 3), dtype=np.uint8)
    for i, img in enumerate(pixels):
        r, c = divmod(i, cols)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = img.permute(1, 2, 0).numpy()
    return Image.fromarray(grid)


def save_sample_grid(path: Path, cfg: SampleConfig, unet, text, vae, family: Family,
                     size: int) -> Path:
    images = sample_images(cfg, unet, text, vae, family, size)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    image_grid(images).save(tmp)
    tmp.replace(path)
    return path
