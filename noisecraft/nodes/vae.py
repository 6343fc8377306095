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


class VAEDecodeTiled(Node):
    schema = NodeSchema(
        name="VAEDecodeTiled", display_name="VAE Decode (Tiled)", category="_for_testing",
        inputs=[
            Input("samples", LATENT), Input("vae", VAE),
            Input("tile_size", INT, default=512, min=64, max=4096, step=32),
            Input("overlap", INT, default=64, min=0, max=4096, step=32),
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
        ``overlap`` pixels: memory bounded by one tile (the seams are not exactly invisible)."""
        z = samples["samples"]
        f = vae.downscale
        tile, lap = max(1, tile_size // f), min(overlap // f, tile_size // f // 4)
        h, w = z.shape[-2:]
        if h <= tile and w <= tile:
            return (decode_to_pixels(vae, z),)
        stride = max(1, tile - lap)
        out = torch.zeros(z.shape[0], h * f, w * f, 3)
        weight = torch.zeros(1, h * f, w * f, 1)
        for top in range(0, max(h - lap, 1), stride):
            for left in range(0, max(w - lap, 1), stride):
                y0, x0 = min(top, max(h - tile, 0)), min(left, max(w - tile, 0))
                part = z[..., y0:y0 + tile, x0:x0 + tile]
                pixels = decode_to_pixels(vae, part)
                ph, pw = pixels.shape[1:3]
                wgt = _ramp(ph, lap * f)[:, None] * _ramp(pw, lap * f)[None, :]
                region = (slice(None), slice(y0 * f, y0 * f + ph), slice(x0 * f, x0 * f + pw))
                out[region] += pixels * wgt[None, :, :, None]
                weight[region] += wgt[None, :, :, None]
        return (out / weight.clamp(min=1e-8),)


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


VAE_NODES = [VAEDecode, VAEEncode, VAEDecodeTiled, VAEEncodeForInpaint]
