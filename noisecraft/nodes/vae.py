"""VAE nodes: pixels <-> latents through the engine's ``encode_images`` / ``decode_latents``.

LATENT values hold raw VAE latents (ComfyUI's convention); the sampler nodes scale them for the
model (``family.latent.process_in``) and back, so a VAE from ``VAELoader`` can decode any
model's latents.  IMAGE is [B, H, W, 3] in [0, 1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from noisecraft.graph.schema import (
    IMAGE,
    INT,
    LATENT,
    MASK,
    VAE,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.nodes.model_values import VaeValue
from noisecraft.pipelines.common import decode_latents, encode_images


def crop_to_multiple(pixels: torch.Tensor, factor: int) -> torch.Tensor:
    """IMAGE cropped (centred) to a multiple of the VAE factor, as ComfyUI's VAEEncode."""
    h, w = (pixels.shape[1] // factor) * factor, (pixels.shape[2] // factor) * factor
    if (h, w) == tuple(pixels.shape[1:3]):
        return pixels
    dy, dx = (pixels.shape[1] % factor) // 2, (pixels.shape[2] % factor) // 2
    return pixels[:, dy:dy + h, dx:dx + w, :]


def encode_pixels(vae: VaeValue, pixels: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] in [0, 1] -> raw latents [B, C, H/8, W/8] (posterior mode)."""
    device = next(vae.bundle.vae.parameters()).device
    x = pixels[..., :3].movedim(-1, 1).float().contiguous() * 2.0 - 1.0  # NCHW layout: the
    # engine's convolutions see the same memory format, so the same numbers
    with torch.inference_mode():
        return encode_images(vae.bundle, x, device).cpu()


def decode_to_pixels(vae: VaeValue, samples: torch.Tensor) -> torch.Tensor:
    """Raw latents -> IMAGE [B, H, W, 3] in [0, 1]."""
    device = next(vae.bundle.vae.parameters()).device
    with torch.inference_mode():
        x = decode_latents(vae.bundle, samples.to(device).float().contiguous())
    return ((x + 1.0) / 2.0).movedim(1, -1).cpu()


class VAEDecode(Node):
    schema = NodeSchema(
        name="VAEDecode", display_name="VAE Decode", category="latent",
        description="Decodes latent images back into pixel space images.",
        inputs=[Input("samples", LATENT, tooltip="The latent to be decoded."),
                Input("vae", VAE, tooltip="The VAE model used for decoding the latent.")],
        outputs=[Output(IMAGE, tooltip="The decoded image.")],
    )

    @classmethod
    def execute(cls, samples, vae):
        return (decode_to_pixels(vae, samples["samples"]),)


class VAEEncode(Node):
    schema = NodeSchema(
        name="VAEEncode", display_name="VAE Encode", category="latent",
        inputs=[Input("pixels", IMAGE), Input("vae", VAE)], outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, pixels, vae):
        return ({"samples": encode_pixels(vae, crop_to_multiple(pixels, vae.downscale))},)


def _ramp(n: int, overlap: int) -> torch.Tensor:
    """Blend weights along one tile side: rising over ``overlap`` at both ends, 1 inside."""
    w = torch.ones(n)
    for i in range(min(overlap, n // 2)):
        w[i] = w[n - 1 - i] = (i + 1) / (overlap + 1)
    return w


def tiled_map(x: torch.Tensor, fn, tile: int, lap: int, scale_in: int,
              scale_out: int) -> torch.Tensor:
    """``fn`` applied to overlapping tiles of x [B, C, H, W], blended into one output.

    Sizes are counted in grid units: a unit is ``scale_in`` input pixels and ``scale_out``
    output pixels (decode: 1 latent pixel -> f image pixels; encode: f image pixels -> 1
    latent pixel), so tiles start on whole units and their outputs line up exactly.  Tiles
    are ``tile`` units square, ``lap`` units overlap, the last row/column moved in to end at
    the border; outputs are blended with linear ramps over the overlap (:func:`_ramp`).
    ``fn`` maps [B, C, h, w] to [B, C', h / scale_in * scale_out, ...].  Memory is bounded by
    one tile; the seams are not exactly invisible (each tile's network sees only the tile).
    """
    h, w = x.shape[-2] // scale_in, x.shape[-1] // scale_in
    stride = max(1, tile - lap)
    out = weight = None
    for top in range(0, max(h - lap, 1), stride):
        for left in range(0, max(w - lap, 1), stride):
            y0, x0 = min(top, max(h - tile, 0)), min(left, max(w - tile, 0))
            part = fn(x[..., y0 * scale_in:(y0 + tile) * scale_in,
                        x0 * scale_in:(x0 + tile) * scale_in])
            if out is None:
                out = part.new_zeros(*part.shape[:2], h * scale_out, w * scale_out)
                weight = part.new_zeros(1, 1, h * scale_out, w * scale_out)
            ph, pw = part.shape[-2:]
            wgt = _ramp(ph, lap * scale_out)[:, None] * _ramp(pw, lap * scale_out)[None, :]
            region = (..., slice(y0 * scale_out, y0 * scale_out + ph),
                      slice(x0 * scale_out, x0 * scale_out + pw))
            out[region] += part * wgt
            weight[region] += wgt
    return out / weight.clamp(min=1e-8)


def tile_units(tile_size: int, overlap: int, factor: int) -> tuple[int, int]:
    """Pixel tile size and overlap -> latent units; the overlap is at most a quarter of the
    tile (ComfyUI's VAEDecodeTiled rule), so tiles always advance."""
    tile = max(1, tile_size // factor)
    return tile, min(overlap // factor, tile // 4)


_TILE_OVERLAP = Input("overlap", INT, default=64, min=0, max=4096, step=32)


class VAEDecodeTiled(Node):
    schema = NodeSchema(
        name="VAEDecodeTiled", display_name="VAE Decode (Tiled)", category="_for_testing",
        inputs=[
            Input("samples", LATENT), Input("vae", VAE),
            Input("tile_size", INT, default=512, min=64, max=4096, step=32),
            _TILE_OVERLAP,
            Input("temporal_size", INT, default=64, min=8, max=4096, step=4,
                  tooltip="Only used for video VAEs: frames to decode at a time."),
            Input("temporal_overlap", INT, default=8, min=4, max=4096, step=4,
                  tooltip="Only used for video VAEs: frames to overlap."),
        ],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, samples, vae, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        """Decode overlapping latent tiles of ``tile_size`` pixels and blend them linearly over
        ``overlap`` pixels (:func:`tiled_map`); one tile covering the latent is the plain
        decode."""
        z = samples["samples"]
        f = vae.downscale
        tile, lap = tile_units(tile_size, overlap, f)
        if z.shape[-2] <= tile and z.shape[-1] <= tile:
            return (decode_to_pixels(vae, z),)
        out = tiled_map(z, lambda part: decode_to_pixels(vae, part).movedim(-1, 1), tile, lap,
                        1, f)
        return (out.movedim(1, -1),)


class VAEEncodeTiled(Node):
    schema = NodeSchema(
        name="VAEEncodeTiled", display_name="VAE Encode (Tiled)", category="_for_testing",
        inputs=[
            Input("pixels", IMAGE), Input("vae", VAE),
            Input("tile_size", INT, default=512, min=64, max=4096, step=64),
            _TILE_OVERLAP,
            Input("temporal_size", INT, default=64, min=8, max=4096, step=4,
                  tooltip="Only used for video VAEs: Amount of frames to encode at a time."),
            Input("temporal_overlap", INT, default=8, min=4, max=4096, step=4,
                  tooltip="Only used for video VAEs: Amount of frames to overlap."),
        ],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, pixels, vae, tile_size, overlap, temporal_size=64, temporal_overlap=8):
        """Encode overlapping pixel tiles of ``tile_size`` pixels (cropped to a multiple of
        the VAE factor first, as VAEEncode) and blend their latents linearly over ``overlap``
        pixels (:func:`tiled_map`, tiles on whole latent pixels); one tile covering the image
        is the plain encode.  The temporal inputs only matter for video VAEs (none here).
        ComfyUI's tile grid and blend masks differ in detail, so its tiled latents and these
        differ slightly at the seams."""
        pixels = crop_to_multiple(pixels, vae.downscale)
        f = vae.downscale
        tile, lap = tile_units(tile_size, overlap, f)
        if pixels.shape[1] <= tile * f and pixels.shape[2] <= tile * f:
            return ({"samples": encode_pixels(vae, pixels)},)
        out = tiled_map(pixels[..., :3].movedim(-1, 1),
                        lambda part: encode_pixels(vae, part.movedim(1, -1)), tile, lap, f, 1)
        return ({"samples": out},)


class VAEEncodeForInpaint(Node):
    schema = NodeSchema(
        name="VAEEncodeForInpaint", display_name="VAE Encode (for Inpainting)",
        category="latent/inpaint",
        inputs=[Input("pixels", IMAGE), Input("vae", VAE), Input("mask", MASK),
                Input("grow_mask_by", INT, default=6, min=0, max=64, step=1)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, pixels, vae, mask, grow_mask_by=6):
        """The image with the masked part grey, encoded, with the mask grown by
        ``grow_mask_by`` pixels as the latent's noise mask (sample it at denoise 1.0)."""
        from noisecraft.nodes.conditioning import gray_masked, pixel_mask

        pixels = crop_to_multiple(pixels, vae.downscale)
        m = pixel_mask(mask, pixels.shape[1], pixels.shape[2])
        grown = m.round()
        if grow_mask_by > 0:
            kernel = torch.ones(1, 1, grow_mask_by, grow_mask_by)
            pad = math.ceil((grow_mask_by - 1) / 2)
            grown = F.conv2d(grown, kernel, padding=pad).clamp(0, 1)
            grown = grown[..., :m.shape[-2], :m.shape[-1]]
        latent = encode_pixels(vae, gray_masked(pixels, m[:, 0]))
        return ({"samples": latent, "noise_mask": grown.round()},)


VAE_NODES = [VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeTiled, VAEEncodeForInpaint]
