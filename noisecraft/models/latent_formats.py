"""Latent formats: how a family's VAE latents are scaled for the diffusion model, and previewed.

Two latent spaces meet here:

* the *image latent* ``z`` that ``AutoencoderKL.encode`` produces and ``decode`` consumes;
* the *diffusion latent* ``x = (z - shift_factor) * scaling_factor`` the U-Net and samplers see,
  scaled to roughly unit variance (Rombach et al. 2022, sec. 4.3.2 and appendix D.1).

``latent_to_rgb_preview`` approximates the VAE decoder by one linear map per pixel, from the
diffusion latent to RGB in [-1, 1] (at latent resolution): cheap enough for every sampler step.
The factors are the ones published in ComfyUI's ``comfy/latent_formats.py`` (classes ``SD15``
and ``SDXL``), where ``Latent2RGBPreviewer`` uses them the same way: ``rgb = x @ factors + bias``
on the diffusion latent, then ``(rgb + 1) / 2`` to [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = ["LatentFormat", "SD15", "SDXL", "fit_rgb_factors", "latent_to_rgb_preview",
           "latent_to_preview_image"]


@dataclass(frozen=True)
class LatentFormat:
    """Scaling of one VAE family's latents, and its linear latent->RGB preview.

    ``rgb_factors`` has one (R, G, B) row per latent channel; ``rgb_bias`` is added after.
    ``taesd`` names the matching TAESD weights (``<taesd>_decoder.safetensors``), if any.
    """

    channels: int
    scaling_factor: float
    shift_factor: float = 0.0
    rgb_factors: tuple[tuple[float, float, float], ...] = ()
    rgb_bias: tuple[float, float, float] = (0.0, 0.0, 0.0)
    taesd: str | None = None

    def __post_init__(self) -> None:
        if self.scaling_factor <= 0:
            raise ValueError(f"LatentFormat.scaling_factor must be > 0, got {self.scaling_factor}")
        rows = tuple(tuple(float(v) for v in row) for row in self.rgb_factors)
        if rows and (len(rows) != self.channels or any(len(r) != 3 for r in rows)):
            raise ValueError(
                f"LatentFormat.rgb_factors must be {self.channels} rows of (R, G, B), "
                f"got {len(rows)} rows of lengths {[len(r) for r in rows]}"
            )
        if len(self.rgb_bias) != 3:
            raise ValueError(f"LatentFormat.rgb_bias must be (R, G, B), got {self.rgb_bias}")
        object.__setattr__(self, "rgb_factors", rows)
        object.__setattr__(self, "rgb_bias", tuple(float(v) for v in self.rgb_bias))

    def process_in(self, z: torch.Tensor) -> torch.Tensor:
        """Image latent (VAE) -> diffusion latent: (z - shift) * scale."""
        return (z - self.shift_factor) * self.scaling_factor

    def process_out(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion latent -> image latent (VAE): x / scale + shift."""
        return x / self.scaling_factor + self.shift_factor


SD15 = LatentFormat(
    channels=4,
    scaling_factor=0.18215,
    rgb_factors=(
        #   R        G        B
        (0.3512, 0.2297, 0.3227),
        (0.3250, 0.4974, 0.2350),
        (-0.2829, 0.1762, 0.2721),
        (-0.2120, -0.2616, -0.7177),
    ),
    taesd="taesd",
)

SDXL = LatentFormat(
    channels=4,
    scaling_factor=0.13025,
    rgb_factors=(
        #   R        G        B
        (0.3651, 0.4232, 0.4341),
        (-0.2533, -0.0042, 0.1068),
        (0.1076, 0.1111, -0.0362),
        (-0.3165, -0.2492, -0.2188),
    ),
    rgb_bias=(0.1084, -0.0175, -0.0011),
    taesd="taesdxl",
)


def fit_rgb_factors(latents: torch.Tensor, images: torch.Tensor
                    ) -> tuple[tuple[tuple[float, ...], ...], tuple[float, ...]]:
    """Least-squares ``(rgb_factors, rgb_bias)`` for a new VAE: the linear map from diffusion
    latents [N, C, h, w] to ``images`` [N, 3, H, W] in [-1, 1] box-averaged to h x w (how
    ComfyUI's published factors were obtained). Use it on a few hundred encoded images."""
    if latents.ndim != 4 or images.ndim != 4 or images.shape[1] != 3 or \
            latents.shape[0] != images.shape[0]:
        raise ValueError(f"fit_rgb_factors: need latents [N, C, h, w] and images [N, 3, H, W] "
                         f"with the same N, got {tuple(latents.shape)} and {tuple(images.shape)}")
    h, w = latents.shape[-2:]
    target = torch.nn.functional.adaptive_avg_pool2d(images.double(), (h, w))
    x = latents.double().movedim(1, -1).reshape(-1, latents.shape[1])
    x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
    y = target.movedim(1, -1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x, y).solution  # [C + 1, 3]
    factors = tuple(tuple(float(v) for v in row) for row in solution[:-1])
    return factors, tuple(float(v) for v in solution[-1])


def latent_to_rgb_preview(latent: torch.Tensor, fmt: LatentFormat) -> torch.Tensor:
    """Diffusion latent (B, C, h, w) or (C, h, w) -> uint8 RGB (B, h, w, 3) or (h, w, 3), on CPU.

    A linear approximation of the decoder at latent resolution (8x smaller than the image).
    """
    if not fmt.rgb_factors:
        raise ValueError("latent_to_rgb_preview: this LatentFormat has no rgb_factors")
    if latent.ndim not in (3, 4) or latent.shape[-3] != fmt.channels:
        raise ValueError(
            f"latent_to_rgb_preview: expected a latent of shape (B, {fmt.channels}, h, w) or "
            f"({fmt.channels}, h, w), got {tuple(latent.shape)}"
        )
    x = latent.detach().to("cpu", torch.float32).movedim(-3, -1)  # (..., h, w, C)
    rgb = x @ torch.tensor(fmt.rgb_factors) + torch.tensor(fmt.rgb_bias)
    return ((rgb + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def latent_to_preview_image(latent: torch.Tensor, fmt: LatentFormat, scale: int = 1) -> Image.Image:
    """The first latent of a batch as a PIL RGB image, enlarged ``scale`` times (nearest)."""
    rgb = latent_to_rgb_preview(latent if latent.ndim == 3 else latent[0], fmt)
    image = Image.fromarray(np.ascontiguousarray(rgb.numpy()))  # (h, w, 3) uint8 -> RGB
    if scale != 1:
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    return image
