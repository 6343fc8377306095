"""Ultimate SD Upscale: UltimateSDUpscale, UltimateSDUpscaleNoUpscale and
UltimateSDUpscaleCustomSample with the names, inputs (order, defaults, ranges), category and
output of the custom node ssitu/ComfyUI_UltimateSDUpscale (v1.7.1), so workflows using it run
on noisecraft.

**Upscale step** (UltimateSDUpscale, and CustomSample given a model): the output is ``upscale_by``
times the input, each side rounded to the nearest multiple of 8
(:func:`noisecraft.upscale.scaled_size`; the real node's ``round_length``).  When that is larger
than the input, the UPSCALE_MODEL runs once over the batch as ImageUpscaleWithModel runs it
(tiled, :func:`noisecraft.upscale.upscale_with_model`); Lanczos then resizes to the exact size.
Without a model only Lanczos (the real node first enlarges by whole factors, then resizes).
The image stays float here between tiles, where the real node keeps 8-bit PIL images, so
results differ from ComfyUI's by rounding.

**Redraw and seam fix**: which regions, in which order, how they blend:
:mod:`noisecraft.nodes.usdu_tiles`.  Every region is redrawn by the node functions a graph would
use, VAEEncode -> KSampler (SamplerCustom for CustomSample given a sampler and sigmas) ->
VAEDecode (VAEDecodeTiled at 512 px with ``tiled_decode``), so there is one sampling code path.

**Seeds**: every tile uses the same ``seed``, as the real node does (it hands its seed to each
tile's sampler unchanged); within one sampler batch (an image batch, or ``batch_size`` > 1)
item i uses seed + i, the KSampler convention here.

**Faithful quirk**: seam-fix regions are sampled at ``denoise``.  The real node's seam fix sets
A1111's ``denoising_strength``, which its sampler never reads, so ``seam_fix_denoise`` changes
nothing there; it is accepted and likewise unused here.

**Conditioning**: ControlNet images are cropped to each tile (the tile's region mapped onto the
control image, resized to the sampling size with nearest-exact), as the real node does, so
ControlNet-tile workflows work.  Area and mask conditioning (which the real node also crops)
and InpaintModelConditioning's image (which it does not) are refused with an error naming
them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from noisecraft.graph.context import NodeContext
from noisecraft.graph.schema import (
    BOOLEAN,
    COMBO,
    CONDITIONING,
    FLOAT,
    IMAGE,
    INT,
    MAX_SEED,
    MODEL,
    SAMPLER,
    SIGMAS,
    VAE,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.nodes.control import CONTROL_KEY
from noisecraft.nodes.samplers import KSampler, SamplerCustom
from noisecraft.nodes.upscale import UPSCALE_MODEL, ImageUpscaleWithModel
from noisecraft.nodes.usdu_tiles import (
    REDRAW_MODES,
    SEAM_FIX_MODES,
    Size,
    Tile,
    TileSettings,
    redraw_and_fix_seams,
    resized,
)
from noisecraft.nodes.vae import VAEDecode, VAEDecodeTiled, VAEEncode
from noisecraft.samplers import sampler_names
from noisecraft.schedules import COMFY_SPACINGS
from noisecraft.upscale import scaled_size

MAX_RESOLUTION = 8192  # the real node's limit for tile and padding widgets
TILED_DECODE = (512, 64)  # VAEDecodeTiled tile size and overlap, the real node's
_REFUSED_CONDITIONING = {"area": "an area (ConditioningSetArea)",
                         "mask": "a mask (ConditioningSetMask)",
                         "concat_latent_image": "an inpainting image (InpaintModelConditioning)"}


def upscale_images(image: torch.Tensor, upscale_model: Any, upscale_by: float) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> [B, round8(H * s), round8(W * s), C]: the model (when enlarging),
    then Lanczos to the exact size."""
    h, w = image.shape[1:3]
    size = scaled_size(w, h, upscale_by)
    if upscale_model is not None and max(size) > max(w, h):
        (image,) = ImageUpscaleWithModel.execute(upscale_model, image)
    return resized(image, size)


def _hint_crop(hint: torch.Tensor, region, canvas: Size, size: Size) -> torch.Tensor:
    """The control image [b, C, h, w] under ``region`` of the canvas (mapped onto the control
    image's size, rounded outwards), resized to ``size`` with nearest-exact."""
    x1, y1, x2, y2 = region
    sx, sy = hint.shape[-1] / canvas[0], hint.shape[-2] / canvas[1]
    rows = slice(math.floor(y1 * sy), math.ceil(y2 * sy))
    cols = slice(math.floor(x1 * sx), math.ceil(x2 * sx))
    return F.interpolate(hint[..., rows, cols], size=(size[1], size[0]), mode="nearest-exact")


def _tile_hints(hint: torch.Tensor, tiles: Sequence[Tile], canvas: Size, size: Size,
                images: int) -> torch.Tensor:
    """One crop per sampler-batch item (image-major); image b uses control image b (modulo
    the control batch)."""
    return torch.cat([_hint_crop(hint[b % hint.shape[0]][None], t.region, canvas, size)
                      for b in range(images) for t in tiles])


def tile_conditioning(conditioning: list, tiles: Sequence[Tile], canvas: Size, size: Size,
                      images: int, side: str) -> list:
    """CONDITIONING for one sampler batch (``images`` x ``tiles``, image-major): ControlNet
    images cropped to each tile; area, mask and inpainting-model conditioning refused."""
    out = []
    for context, opts in conditioning:
        for key, what in _REFUSED_CONDITIONING.items():
            if opts.get(key) is not None:
                raise ValueError(
                    f"the {side} conditioning carries {what}, which would have to be cut "
                    "to each tile; that is not supported here. Connect the prompt's "
                    "conditioning directly (ControlNets are cut to each tile).")
        controls = opts.get(CONTROL_KEY)
        if controls:
            opts = {**opts, CONTROL_KEY: tuple(
                replace(c, image=_tile_hints(c.image, tiles, canvas, size, images))
                for c in controls)}
        out.append([context, opts])
    return out


@dataclass(frozen=True)
class TileSampling:
    """The sampling inputs; called as a :data:`~noisecraft.nodes.usdu_tiles.TileSampler`:
    VAEEncode -> KSampler (or SamplerCustom) -> VAEDecode of a batch of crops."""

    context: NodeContext
    model: Any
    positive: list
    negative: list
    vae: Any
    seed: int
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    denoise: float
    tiled_decode: bool
    canvas: Size
    images: int
    custom_sampler: Any = None
    custom_sigmas: Any = None

    def __call__(self, crops: torch.Tensor, tiles: Sequence[Tile]) -> torch.Tensor:
        size = (crops.shape[2], crops.shape[1])
        pos, neg = (tile_conditioning(c, tiles, self.canvas, size, self.images, side)
                    for c, side in ((self.positive, "positive"), (self.negative, "negative")))
        (latent,) = VAEEncode.execute(crops, self.vae)
        if self.custom_sampler is not None and self.custom_sigmas is not None:
            latent, _ = SamplerCustom.execute(
                self.model, True, self.seed, self.cfg, pos, neg, self.custom_sampler,
                self.custom_sigmas, latent, context=self.context)
        else:
            (latent,) = KSampler.execute(
                self.model, self.seed, self.steps, self.cfg, self.sampler_name, self.scheduler,
                pos, neg, latent, self.denoise, context=self.context)
        if self.tiled_decode:
            return VAEDecodeTiled.execute(latent, self.vae, *TILED_DECODE)[0]
        return VAEDecode.execute(latent, self.vae)[0]


def ultimate_sd_upscale(image, model, positive, negative, vae, upscale_by, seed, steps, cfg,
                        sampler_name, scheduler, denoise, upscale_model, mode_type, tile_width,
                        tile_height, mask_blur, tile_padding, seam_fix_mode, seam_fix_denoise,
                        seam_fix_width, seam_fix_mask_blur, seam_fix_padding,
                        force_uniform_tiles, tiled_decode, batch_size=1, custom_sampler=None,
                        custom_sigmas=None, context: NodeContext = None,
                        node: str = "UltimateSDUpscale") -> tuple[torch.Tensor]:
    """The three nodes' shared body (``seam_fix_denoise`` is unused: see the module notes)."""
    settings = TileSettings(mode_type, (tile_width, tile_height), tile_padding, mask_blur,
                            seam_fix_mode, seam_fix_width, seam_fix_padding,
                            seam_fix_mask_blur, bool(force_uniform_tiles), int(batch_size))
    try:
        settings.check()
        big = upscale_images(image[..., :3].float(), upscale_model, upscale_by)
        sampling = TileSampling(context, model, positive, negative, vae, seed, steps, cfg,
                                sampler_name, scheduler, denoise, bool(tiled_decode),
                                (big.shape[2], big.shape[1]), big.shape[0], custom_sampler,
                                custom_sigmas)
        return (redraw_and_fix_seams(big, settings, sampling).clamp(0, 1),)
    except ValueError as e:
        raise ValueError(f"{node}: {e}") from None


def _inputs(*, upscale: bool = True) -> list[Input]:
    """The real node's inputs in its order; NoUpscale drops upscale_by and upscale_model and
    calls the image ``upscaled_image``."""
    image = Input("image", IMAGE, tooltip="The image to upscale.") if upscale else \
        Input("upscaled_image", IMAGE, tooltip="The image to refine (already upscaled).")
    sizes = {"min": 0, "max": MAX_RESOLUTION, "step": 8}
    inputs = [
        image,
        Input("model", MODEL, tooltip="The model each tile is redrawn with."),
        Input("positive", CONDITIONING, tooltip="The positive conditioning of every tile."),
        Input("negative", CONDITIONING, tooltip="The negative conditioning of every tile."),
        Input("vae", VAE, tooltip="The VAE that encodes and decodes the tiles."),
        Input("upscale_by", FLOAT, default=2, min=0.05, max=4, step=0.05,
              tooltip="Output size = input size x this, each side rounded to a multiple of 8."),
        Input("seed", INT, default=0, min=0, max=MAX_SEED,
              tooltip="The seed of every tile's sampler (the same for all tiles)."),
        Input("steps", INT, default=20, min=1, max=10000, step=1,
              tooltip="Sampling steps per tile (as KSampler: steps / denoise schedule)."),
        Input("cfg", FLOAT, default=8.0, min=0.0, max=100.0,
              tooltip="Classifier-free guidance scale of every tile."),
        Input("sampler_name", COMBO, choices=lambda context: sampler_names(),
              tooltip="The sampler of every tile."),
        Input("scheduler", COMBO, choices=COMFY_SPACINGS, tooltip="The scheduler of every tile."),
        Input("denoise", FLOAT, default=0.2, min=0.0, max=1.0, step=0.01,
              tooltip="Denoising strength per tile (also used by the seam fix)."),
        Input("upscale_model", UPSCALE_MODEL, tooltip="The model that enlarges the image."),
        Input("mode_type", COMBO, choices=REDRAW_MODES,
              tooltip="Tile order of the redraw: row by row, checkerboard, or no redraw."),
        Input("tile_width", INT, default=512, min=64, max=MAX_RESOLUTION, step=8,
              tooltip="Tile width in pixels."),
        Input("tile_height", INT, default=512, min=64, max=MAX_RESOLUTION, step=8,
              tooltip="Tile height in pixels."),
        Input("mask_blur", INT, default=8, min=0, max=64, step=1,
              tooltip="Gaussian blur radius of the mask a redrawn tile is blended in with."),
        Input("tile_padding", INT, default=32, **sizes,
              tooltip="Context around each tile, in pixels, redrawn with it and blended."),
        Input("seam_fix_mode", COMBO, choices=SEAM_FIX_MODES,
              tooltip="Redraw the tile edges afterwards: bands over them, half-tile-shifted "
                      "tiles, or those plus the corners."),
        Input("seam_fix_denoise", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01,
              tooltip="Unused, as in the real node, whose seam fix samples at denoise."),
        Input("seam_fix_width", INT, default=64, **sizes,
              tooltip="Width of the Band Pass bands."),
        Input("seam_fix_mask_blur", INT, default=8, min=0, max=64, step=1,
              tooltip="Mask blur radius of the Half Tile seam fix."),
        Input("seam_fix_padding", INT, default=16, **sizes,
              tooltip="Context around each seam-fix region, in pixels."),
        Input("force_uniform_tiles", BOOLEAN, default=True,
              tooltip="Grow tiles cut off by the border inwards so every tile is sampled at "
                      "tile + padding; off: sample each at its own size (multiple of 8)."),
        Input("tiled_decode", BOOLEAN, default=False,
              tooltip="Decode tiles with VAEDecodeTiled (512 px)."),
        Input("batch_size", INT, default=1, min=1, max=4096, step=1, optional=True,
              tooltip="Tiles sampled per batch in the redraw (needs force_uniform_tiles; "
                      "gives other results than 1). Optional, as workflows saved before the "
                      "real node had it lack it."),
    ]
    if not upscale:
        inputs = [i for i in inputs if i.name not in ("upscale_by", "upscale_model")]
    return inputs


_DESCRIPTION = "Upscales an image and runs image-to-image on tiles from the input image."


class UltimateSDUpscale(Node):
    schema = NodeSchema(
        name="UltimateSDUpscale", display_name="Ultimate SD Upscale",
        category="image/upscaling", description=_DESCRIPTION, needs_context=True,
        inputs=_inputs(), outputs=[Output(IMAGE, tooltip="The final upscaled image.")],
    )

    @classmethod
    def execute(cls, context: NodeContext = None, **inputs):
        return ultimate_sd_upscale(**inputs, context=context)


class UltimateSDUpscaleNoUpscale(Node):
    schema = NodeSchema(
        name="UltimateSDUpscaleNoUpscale", display_name="Ultimate SD Upscale (No Upscale)",
        category="image/upscaling", needs_context=True,
        description="Runs image-to-image on tiles from the input image.",
        inputs=_inputs(upscale=False),
        outputs=[Output(IMAGE, tooltip="The final refined image.")],
    )

    @classmethod
    def execute(cls, upscaled_image, context: NodeContext = None, **inputs):
        """Upscale by 1 without a model: only rounds the sides to multiples of 8."""
        return ultimate_sd_upscale(upscaled_image, upscale_by=1.0, upscale_model=None,
                                   context=context, node=cls.schema.name, **inputs)


def _custom_sample_inputs() -> list[Input]:
    inputs = [i for i in _inputs() if i.name != "upscale_model"]
    return [*inputs,
            Input("upscale_model", UPSCALE_MODEL, optional=True,
                  tooltip="The model that enlarges the image; without one, Lanczos."),
            Input("custom_sampler", SAMPLER, optional=True,
                  tooltip="Used instead of sampler_name when custom_sigmas is given too."),
            Input("custom_sigmas", SIGMAS, optional=True,
                  tooltip="Used instead of steps / scheduler / denoise when custom_sampler "
                          "is given too.")]


class UltimateSDUpscaleCustomSample(Node):
    schema = NodeSchema(
        name="UltimateSDUpscaleCustomSample", display_name="Ultimate SD Upscale (Custom Sample)",
        category="image/upscaling", needs_context=True,
        description="Runs image-to-image on tiles from the input image.",
        inputs=_custom_sample_inputs(),
        outputs=[Output(IMAGE, tooltip="The final upscaled image.")],
    )

    @classmethod
    def execute(cls, upscale_model=None, context: NodeContext = None, **inputs):
        return ultimate_sd_upscale(upscale_model=upscale_model, context=context,
                                   node=cls.schema.name, **inputs)


ULTIMATE_SD_UPSCALE_NODES = (UltimateSDUpscale, UltimateSDUpscaleNoUpscale,
                             UltimateSDUpscaleCustomSample)
