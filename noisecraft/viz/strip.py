"""The forward process as a picture: one image noised to increasing timesteps, side by side.

Pixels are mapped to [-1, 1] (the range Stable Diffusion's VAE and pixel-space DDPMs train on)
and noised with :func:`noisecraft.diffusion.q_sample`, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``
(Ho et al. 2020, eq. 4).  Every tile uses the same draw of ``eps``, so the strip shows one
noise pattern swallowing the signal as alpha_bar_t falls.
"""

from __future__ import annotations

import torch
from PIL import Image, ImageDraw

from noisecraft.diffusion import q_sample
from noisecraft.schedules import DiscreteSchedule

LABEL_HEIGHT = 18  # pixels of the caption band under each tile
GAP = 4  # pixels between tiles


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor [1, 3, H, W] in [-1, 1]."""
    data = torch.frombuffer(bytearray(image.convert("RGB").tobytes()), dtype=torch.uint8)
    x = data.reshape(image.height, image.width, 3).permute(2, 0, 1).float()
    return (x / 127.5 - 1).unsqueeze(0)


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """Tensor [3, H, W] in [-1, 1] (values outside are clipped) -> RGB image."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"expected a [3, H, W] tensor, got shape {tuple(x.shape)}")
    u8 = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return Image.fromarray(u8.permute(1, 2, 0).contiguous().numpy(), mode="RGB")


def fit(image: Image.Image, max_side: int = 256) -> Image.Image:
    """The image scaled down (never up) so its longer side is at most max_side pixels."""
    if max_side < 8:
        raise ValueError(f"max_side must be at least 8 pixels, got {max_side}")
    scale = max_side / max(image.width, image.height)
    if scale >= 1:
        return image
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(size, Image.Resampling.LANCZOS)


def as_schedule(schedule: DiscreteSchedule | str) -> DiscreteSchedule:
    """A schedule object, or one built by beta-schedule name with 1000 timesteps."""
    if isinstance(schedule, DiscreteSchedule):
        return schedule
    return DiscreteSchedule.from_betas(schedule)


def even_timesteps(n: int, num_timesteps: int) -> list[int]:
    """n integer timesteps evenly spaced from 0 to num_timesteps - 1, inclusive."""
    if n < 2:
        raise ValueError(f"a strip needs at least 2 tiles, got {n}")
    return [round(i * (num_timesteps - 1) / (n - 1)) for i in range(n)]


def forward_process(
    x0: torch.Tensor,
    schedule: DiscreteSchedule | str,
    ts: list[int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """x_t for each t in ts, all with one shared noise draw.

    x0: [C, H, W] (or [1, C, H, W]); returns [len(ts), C, H, W], not clipped.
    """
    if x0.ndim == 4 and x0.shape[0] == 1:
        x0 = x0[0]
    if x0.ndim != 3:
        raise ValueError(f"expected one image [C, H, W], got shape {tuple(x0.shape)}")
    if len(ts) == 0:
        raise ValueError("ts is empty; give at least one timestep")
    ac = as_schedule(schedule).alphas_cumprod
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32)
    batch = x0.expand(len(ts), *x0.shape)
    return q_sample(batch, noise.expand_as(batch), torch.tensor(ts), ac)


def forward_strip(
    image: Image.Image,
    schedule: DiscreteSchedule | str,
    ts: list[int],
    generator: torch.Generator | None = None,
) -> Image.Image:
    """The image noised to each timestep in ts, left to right, with ``t=...`` under each tile.

    Size: (len(ts) * W + (len(ts) - 1) * GAP, H + LABEL_HEIGHT); tile i starts at x = i*(W+GAP).
    """
    xs = forward_process(pil_to_tensor(image), schedule, ts, generator)
    w, h = image.width, image.height
    strip = Image.new("RGB", (len(ts) * w + (len(ts) - 1) * GAP, h + LABEL_HEIGHT), "white")
    draw = ImageDraw.Draw(strip)
    for i, (t, x) in enumerate(zip(ts, xs, strict=True)):
        left = i * (w + GAP)
        strip.paste(tensor_to_pil(x), (left, 0))
        label = f"t={t}"
        width = draw.textlength(label)
        draw.text((left + (w - width) / 2, h + 3), label, fill="black")
    return strip


def strip_tiles(strip: Image.Image, n: int) -> list[Image.Image]:
    """Cut a strip made by :func:`forward_strip` back into its n tiles (without labels)."""
    w = (strip.width - (n - 1) * GAP) // n
    h = strip.height - LABEL_HEIGHT
    return [strip.crop((i * (w + GAP), 0, i * (w + GAP) + w, h)) for i in range(n)]
