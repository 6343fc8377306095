"""Model families and the bundle of loaded networks that a pipeline runs.

A :class:`Family` is everything about a released model line that is not in its weights: what
the U-Net predicts, its training noise schedule, its latent format, its native size and which
text encoders it uses.  A :class:`ModelBundle` is one loaded checkpoint: the three networks plus
the family, its name and its file hash.  Loaders build bundles; pipelines and the trainer use them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from noisecraft.diffusion import Denoiser
from noisecraft.models.latent_formats import SD15, SDXL, LatentFormat
from noisecraft.schedules import DiscreteSchedule


@dataclass(frozen=True)
class Family:
    """What a model line fixes besides its weights.

    ``text`` names the text-encoder arrangement: ``sd1`` (CLIP ViT-L), ``sd2`` (OpenCLIP ViT-H),
    ``sdxl`` (CLIP-L + OpenCLIP bigG, pooled + size conditioning), ``sdxl_refiner`` (bigG only,
    aesthetic score), ``clip`` (one CLIP-architecture encoder of any size, e.g. noisecraft's own).

    ``steps_offset`` is the ``steps_offset`` of the line's diffusers scheduler config (1 for
    SD 1.x, 2.x and SDXL; a diffusers folder's own ``scheduler_config.json`` overrides it): the
    offset of the ``leading`` spacing when a request does not set one.
    """

    name: str
    prediction: str = "eps"
    text: str = "sd1"
    latent: LatentFormat = SD15
    native_size: int = 512
    beta_schedule: str = "scaled_linear"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    num_train_timesteps: int = 1000
    zero_terminal_snr: bool = False
    default_clip_skip: int = 1
    steps_offset: int = 1

    def schedule(self) -> DiscreteSchedule:
        return DiscreteSchedule.from_betas(
            self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end,
            self.zero_terminal_snr,
        )

    def with_overrides(self, **changes: Any) -> Family:
        """E.g. ``family.with_overrides(prediction="v")`` for a v-prediction fine-tune."""
        return replace(self, **changes)


FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1"),
    "sd2": Family("sd2", text="sd2"),
    "sd2-v": Family("sd2-v", prediction="v", text="sd2", native_size=768),
    "sdxl": Family("sdxl", text="sdxl", latent=SDXL, native_size=1024),
    "sdxl-refiner": Family("sdxl-refiner", text="sdxl_refiner", latent=SDXL, native_size=1024),
}


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown model family {name!r}; choose one of: {', '.join(FAMILIES)}") \
            from None


@dataclass(eq=False)
class ModelBundle:
    """One loaded model: U-Net, VAE and text encoder(s), with the family they belong to.

    ``inpaint`` is true for 9-channel inpainting U-Nets.  ``extras`` carries optional parts
    (e.g. a TAESD preview decoder).
    """

    family: Family
    unet: nn.Module
    vae: nn.Module
    text_encoder: nn.Module
    name: str = "model"
    sha256: str | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def inpaint(self) -> bool:
        return getattr(getattr(self.unet, "config", None), "in_channels", 4) == 9

    @property
    def short_hash(self) -> str | None:
        """AUTOMATIC1111's 10-character model hash (the start of the file's SHA-256)."""
        return self.sha256[:10] if self.sha256 else None

    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, self.family.schedule(), self.family.prediction)
