"""What the engine takes and gives back: a frozen :class:`GenerationRequest`, progress events,
the cancel token, and :class:`GenerationResult`.

Every front door (``generate_image``, the CLI, graph nodes, server workers) builds a request and
hands it to :meth:`noisecraft.engine.Engine.generate`.  The request is plain data: it can be
compared, stored as JSON settings (:meth:`GenerationRequest.settings`) and rebuilt from them
(:meth:`GenerationRequest.from_settings`), which is how ``noisecraft generate --from`` works.

Sizes: width and height must be multiples of 8 (the VAE's downscale factor).  Other values are
refused, never silently rounded, and the error names the two nearest valid sizes.
"""

from __future__ import annotations

import math
import os
import threading
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, NamedTuple

import torch
from PIL import Image

from noisecraft import __version__
from noisecraft.guidance import SkipUncond

ImageInput = str | os.PathLike | Image.Image
"""An input image: a file path or a PIL image (validated by :mod:`noisecraft.images`)."""

SIZE_MULTIPLE = 8
HIRES_UPSCALERS = ("latent", "image")
OUTPAINT_FILLS = ("edge", "mean")
CONTROL_PREPROCESSORS = ("none", "canny")


class InputError(ValueError):
    """Bad user input (size, image, mask, names): the CLI exits with code 2 on it."""


class Interrupted(RuntimeError):
    """Raised when a :class:`CancelToken` is cancelled; no partial images are returned.

    ``step`` steps of ``total`` (of the current stage) had finished.
    """

    def __init__(self, step: int, total: int, stage: str = "sample"):
        super().__init__(f"generation interrupted after step {step} of {total} ({stage})")
        self.step, self.total, self.stage = step, total, stage


class CancelToken:
    """Interruption flowing in: call :meth:`cancel` from any thread; the engine checks it
    before it starts and after every sampler step, and raises :class:`Interrupted`."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass(frozen=True)
class ProgressEvent:
    """Progress flowing out, once per sampler step.

    ``stage`` is ``"sample"`` (the main pass) or ``"hires"`` (the second pass of hires fix);
    ``step`` counts from 1 to ``total`` within the stage.  ``x`` is the state after the step and
    ``x0`` the model's clean estimate, both diffusion latents [B, C, h, w] (decode them with
    :meth:`noisecraft.engine.Engine.preview`).
    """

    stage: str
    step: int
    total: int
    sigma: float
    sigma_next: float
    x: torch.Tensor
    x0: torch.Tensor


def check_size(value: int, name: str) -> int:
    """Refuse a size that is not a positive multiple of 8, naming the nearest valid ones."""
    if not isinstance(value, int) or isinstance(value, bool) or value < SIZE_MULTIPLE:
        raise InputError(f"{name} must be a whole number >= {SIZE_MULTIPLE}, got {value!r}")
    if value % SIZE_MULTIPLE:
        lo = value - value % SIZE_MULTIPLE
        hi = lo + SIZE_MULTIPLE
        raise InputError(
            f"{name}={value} is not a multiple of {SIZE_MULTIPLE}; nearest valid sizes: "
            f"{lo} or {hi}"
        )
    return value


@dataclass(frozen=True)
class ControlNetUnit:
    """One ControlNet of a request (plain data, so requests stay serialisable).

    ``model``: a ControlNet file or folder path, or a name registered with
    ``Engine.register_controlnet``.  ``image``: the control image (path or PIL image), used as
    it is (``preprocessor="none"``: a ready edge/depth/pose map) or turned into Canny edges
    first (``"canny"``, ComfyUI's default thresholds).  ``strength`` scales the residuals; the
    ControlNet acts from ``start_percent`` to ``end_percent`` of the schedule (ComfyUI's rule).
    """

    model: str
    image: ImageInput
    strength: float = 1.0
    start_percent: float = 0.0
    end_percent: float = 1.0
    preprocessor: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.model, str | os.PathLike) or not os.fspath(self.model):
            raise InputError(f"a ControlNet's model must be a path or registered name, got "
                             f"{self.model!r}")
        object.__setattr__(self, "model", os.fspath(self.model))
        if not isinstance(self.image, str | os.PathLike | Image.Image):
            raise InputError(f"ControlNet {self.model!r}: image must be a path or PIL image, "
                             f"got {type(self.image).__name__}")
        for name in ("start_percent", "end_percent"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise InputError(f"ControlNet {self.model!r}: {name} must lie in [0, 1], got "
                                 f"{getattr(self, name)}")
        if self.preprocessor not in CONTROL_PREPROCESSORS:
            raise InputError(f"ControlNet {self.model!r}: unknown preprocessor "
                             f"{self.preprocessor!r}; choose one of: "
                             f"{', '.join(CONTROL_PREPROCESSORS)}")

    @classmethod
    def of(cls, entry: Any) -> ControlNetUnit:
        """A unit from a unit, a settings dict, or a tuple ``(model, image[, strength[,
        start_percent, end_percent]])``."""
        if isinstance(entry, cls):
            return entry
        if isinstance(entry, dict):
            names = {f.name for f in fields(cls)}
            unknown = sorted(set(entry) - names)
            if unknown:
                raise InputError(f"unknown ControlNet setting(s) {', '.join(unknown)}; known: "
                                 f"{', '.join(sorted(names))}")
            if entry.get("image") == "<image>":
                raise InputError("these settings were made from an in-memory ControlNet image; "
                                 "pass the image again")
            return cls(**entry)
        if isinstance(entry, tuple | list) and len(entry) in (2, 3, 5):
            return cls(*entry)
        raise InputError(
            "each controlnets entry must be a ControlNetUnit, a dict of its fields, or a tuple "
            f"(model, image[, strength[, start_percent, end_percent]]), got {entry!r:.80}"
        )

    def settings(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["image"] = "<image>" if isinstance(self.image, Image.Image) else os.fspath(self.image)
        return out


class LoraEntry(NamedTuple):
    """One LoRA of a request: ``name`` is a LoRA file's path or a name in the request's
    ``loras_dir``; its weights for the U-Net and the text encoder(s)."""

    name: str
    unet_weight: float = 1.0
    text_encoder_weight: float = 1.0

    @classmethod
    def of(cls, entry: Any) -> LoraEntry:
        """An entry from a path or name (weight 1), ``(name, weight)`` (both parts), or
        ``(name, unet_weight, text_encoder_weight)``."""
        forms = ("each loras entry must be a path or name, (path, weight) or (path, "
                 "unet_weight, text_encoder_weight)")
        if isinstance(entry, str | os.PathLike):
            entry = (entry,)
        if not isinstance(entry, tuple | list) or not 1 <= len(entry) <= 3:
            raise InputError(f"{forms}, got {entry!r:.80}")
        name = entry[0]
        if not isinstance(name, str | os.PathLike) or not os.fspath(name):
            raise InputError(f"{forms}; the first item must be a non-empty path or name, got "
                             f"{name!r:.80}")
        weights = list(entry[1:]) or [1.0]
        for w in weights:
            if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w):
                raise InputError(f"LoRA {os.fspath(name)!r}: a weight must be a finite number, "
                                 f"got {w!r:.40}")
        unet, text = float(weights[0]), float(weights[-1])
        return cls(os.fspath(name), unet, text)


@dataclass(frozen=True)
class GenerationRequest:
    """One generation job.  See :func:`noisecraft.api.generate_image` for each field.

    Task selection: ``init_image`` set -> img2img; plus ``mask`` -> inpainting; ``outpaint``
    (left, top, right, bottom pixels) non-zero -> outpainting of ``init_image``;
    ``hires_scale > 1`` -> a second, img2img pass at the larger size (hires fix).
    """

    prompt: str
    negative_prompt: str = ""
    model: str | None = None
    steps: int = 20
    cfg_scale: float = 7.0
    guidance_rescale: float = 0.0
    uncond_min_sigma: float = 0.0
    uncond_min_sigma_all_steps: bool = False
    seed: int | None = None
    sampler: str = "euler"
    scheduler: str = "normal"
    steps_offset: int | None = None
    width: int | None = None
    height: int | None = None
    batch_size: int = 1
    clip_skip: int | None = None
    init_image: ImageInput | None = None
    strength: float = 0.75
    mask: ImageInput | None = None
    mask_blur: int = 4
    mask_grow: int = 0
    outpaint: tuple[int, int, int, int] = (0, 0, 0, 0)
    outpaint_fill: str = "edge"
    hires_scale: float = 1.0
    hires_upscale: str = "latent"
    hires_steps: int | None = None
    hires_strength: float = 0.5
    eta: float | None = None
    controlnets: tuple[ControlNetUnit, ...] = ()
    embeddings_dir: str | None = None
    loras: tuple[LoraEntry, ...] = ()
    loras_dir: str | None = None

    def __post_init__(self) -> None:
        for name in ("embeddings_dir", "loras_dir"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, os.fspath(getattr(self, name)))
        if isinstance(self.loras, str | os.PathLike):
            raise InputError("loras must be a list of entries, e.g. [('style.safetensors', "
                             f"0.8)], got the single {self.loras!r:.80}")
        object.__setattr__(self, "loras", tuple(LoraEntry.of(e) for e in self.loras or ()))
        object.__setattr__(self, "controlnets",
                           tuple(ControlNetUnit.of(c) for c in self.controlnets or ()))
        for name in ("prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise InputError(f"{name} must be a string, got "
                                 f"{type(getattr(self, name)).__name__}")
        if not isinstance(self.steps, int) or self.steps < 1:
            raise InputError(f"steps must be a whole number >= 1, got {self.steps!r}")
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise InputError(f"batch_size must be a whole number >= 1, got {self.batch_size!r}")
        if self.cfg_scale < 0:
            raise InputError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise InputError(f"guidance_rescale must lie in [0, 1], got {self.guidance_rescale}")
        self._check_uncond_min_sigma()
        if self.steps_offset is not None:
            if isinstance(self.steps_offset, bool) or not isinstance(self.steps_offset, int) \
                    or self.steps_offset < 0:
                raise InputError(f"steps_offset must be a whole number >= 0, got "
                                 f"{self.steps_offset!r}")
            if self.scheduler != "leading":
                raise InputError(
                    f"steps_offset applies to scheduler='leading' only (diffusers' "
                    f"timestep_spacing='leading'), got scheduler={self.scheduler!r}; drop "
                    f"steps_offset or use scheduler='leading'"
                )
        if self.seed is not None and not 0 <= int(self.seed) < 2**63:
            raise InputError(f"seed must lie in [0, 2**63), got {self.seed}")
        for name in ("width", "height"):
            if getattr(self, name) is not None:
                check_size(getattr(self, name), name)
        if not 0.0 < self.strength <= 1.0:
            raise InputError(f"strength must lie in (0, 1], got {self.strength}")
        if not 0.0 < self.hires_strength <= 1.0:
            raise InputError(f"hires_strength must lie in (0, 1], got {self.hires_strength}")
        if self.mask is not None and self.init_image is None:
            raise InputError("a mask needs an init_image to inpaint")
        outpaint = tuple(int(v) for v in self.outpaint)
        if len(outpaint) != 4 or any(v < 0 for v in outpaint):
            raise InputError(
                f"outpaint must be 4 pixel counts >= 0 (left, top, right, bottom), got {outpaint}"
            )
        object.__setattr__(self, "outpaint", outpaint)
        for side, v in zip(("left", "top", "right", "bottom"), outpaint, strict=True):
            if v % SIZE_MULTIPLE:
                raise InputError(
                    f"outpaint {side}={v} is not a multiple of {SIZE_MULTIPLE}; nearest valid: "
                    f"{v - v % SIZE_MULTIPLE} or {v - v % SIZE_MULTIPLE + SIZE_MULTIPLE}"
                )
        if any(outpaint) and self.init_image is None:
            raise InputError("outpaint needs an init_image to extend")
        if any(outpaint) and self.mask is not None:
            raise InputError("outpaint builds its own mask; do not pass mask with outpaint")
        if self.outpaint_fill not in OUTPAINT_FILLS:
            raise InputError(
                f"unknown outpaint_fill {self.outpaint_fill!r}; choose one of: "
                f"{', '.join(OUTPAINT_FILLS)}"
            )
        if self.mask_blur < 0:
            raise InputError(f"mask_blur must be >= 0 pixels, got {self.mask_blur}")
        if self.hires_scale < 1.0:
            raise InputError(f"hires_scale must be >= 1 (1 = off), got {self.hires_scale}")
        if self.hires_upscale not in HIRES_UPSCALERS:
            raise InputError(
                f"unknown hires_upscale {self.hires_upscale!r}; choose one of: "
                f"{', '.join(HIRES_UPSCALERS)}"
            )
        if self.hires_scale > 1 and self.init_image is not None:
            raise InputError("hires fix (hires_scale > 1) is for txt2img; drop init_image or "
                             "set hires_scale to 1")
        if self.hires_steps is not None and self.hires_steps < 1:
            raise InputError(f"hires_steps must be >= 1, got {self.hires_steps}")

    def _check_uncond_min_sigma(self) -> None:
        value = self.uncond_min_sigma
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not math.isfinite(value) or value < 0:
            raise InputError(
                f"uncond_min_sigma (A1111's NGMS, Negative Guidance minimum sigma) must be a "
                f"finite number >= 0: 0 = off, else the unconditional pass is skipped while "
                f"sigma < it; got {value!r:.40}")
        object.__setattr__(self, "uncond_min_sigma", float(value))
        if not isinstance(self.uncond_min_sigma_all_steps, bool):
            raise InputError(f"uncond_min_sigma_all_steps must be true or false (false = skip "
                             f"every other step, as A1111's NGMS), got "
                             f"{self.uncond_min_sigma_all_steps!r:.40}")

    @property
    def skip_uncond(self) -> SkipUncond:
        """A1111's NGMS of this request, for :func:`noisecraft.guidance.cfg_denoiser`."""
        return SkipUncond(self.uncond_min_sigma, self.uncond_min_sigma_all_steps)

    @property
    def task(self) -> str:
        """``txt2img``, ``img2img``, ``inpaint`` or ``outpaint``."""
        if self.init_image is None:
            return "txt2img"
        if any(self.outpaint):
            return "outpaint"
        return "inpaint" if self.mask is not None else "img2img"

    def with_seed(self, seed: int) -> GenerationRequest:
        return replace(self, seed=seed)

    def settings(self) -> dict[str, Any]:
        """JSON-ready settings (images as their paths; in-memory images as ``"<image>"``)."""
        out = asdict(self)
        for name in ("init_image", "mask"):
            value = getattr(self, name)
            if isinstance(value, Image.Image):
                out[name] = "<image>"
            elif value is not None:
                out[name] = os.fspath(value)
        out["outpaint"] = list(self.outpaint)
        out["controlnets"] = [c.settings() for c in self.controlnets]
        out["loras"] = [list(e) for e in self.loras]
        return out

    @classmethod
    def from_settings(cls, settings: dict[str, Any], **overrides: Any) -> GenerationRequest:
        """Rebuild a request from :meth:`settings` (extra keys, e.g. ``model_hash``, ignored)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in settings.items() if k in names}
        kwargs.update(overrides)
        for name in ("init_image", "mask"):
            if kwargs.get(name) == "<image>":
                raise InputError(
                    f"these settings were made from an in-memory {name}; pass the image again"
                )
        if "outpaint" in kwargs:
            kwargs["outpaint"] = tuple(kwargs["outpaint"])
        return cls(**kwargs)


@dataclass(frozen=True)
class GeneratedImage:
    """One output image with the seed it came from and its full settings (PNG metadata)."""

    image: Image.Image
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class GenerationResult:
    """What :meth:`Engine.generate` returns: the images (batch order; image i used seed+i),
    the final diffusion latents [B, C, h, w], and the request with its seed filled in."""

    images: tuple[GeneratedImage, ...]
    latents: torch.Tensor
    request: GenerationRequest

    @property
    def pil_images(self) -> list[Image.Image]:
        return [g.image for g in self.images]

    @property
    def seeds(self) -> list[int]:
        return [g.seed for g in self.images]

    @property
    def seed(self) -> int:
        return self.images[0].seed


def image_settings(
    request: GenerationRequest, seed: int, width: int, height: int, model_name: str,
    model_hash: str | None, lora_hashes: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The settings one output image carries: the request with this image's seed, batch 1,
    the resolved first-pass size (as AUTOMATIC1111's ``Size``: before hires fix or outpainting
    enlarge it), the model's name and hash, the LoRAs' ``{name: short hash}`` (when any), and
    the noisecraft version."""
    out = request.settings()
    out.update(
        seed=seed, batch_size=1, width=width, height=height, model_name=model_name,
        model_hash=model_hash, version=__version__,
    )
    if lora_hashes:
        out["lora_hashes"] = dict(lora_hashes)
    return out
