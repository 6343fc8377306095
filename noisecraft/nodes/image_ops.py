"""Image nodes that need no model: crop, flip, rotate, batch, composite, blank images, blend
modes, Gaussian blur and sharpen, seeded noise, scaling to a pixel count.

IMAGE is [B, H, W, C] float in [0, 1].  Names, inputs, defaults, ranges and categories are
ComfyUI's (``nodes.py``, ``comfy_extras/nodes_images.py``, ``nodes_mask.py`` and
``nodes_post_processing.py``), and so are the results, formula for formula.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from noisecraft.graph.schema import (
    BOOLEAN,
    COMBO,
    FLOAT,
    IMAGE,
    INT,
    MASK,
    MAX_RESOLUTION,
    MAX_SEED,
    PIXEL_POSITION,
    PIXEL_SIZE,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.nodes.latent_ops import ROTATIONS, quarter_turns
from noisecraft.nodes.tensors import IMAGE_UPSCALE_METHODS, alpha_fix, composite, resize

_POS, _SIZE = PIXEL_POSITION, PIXEL_SIZE


def _resized_like(image: torch.Tensor, like: torch.Tensor, method: str) -> torch.Tensor:
    """IMAGE ``image`` resized (centre crop to the aspect ratio) to ``like``'s height x width."""
    x = resize(image.movedim(-1, 1), like.shape[2], like.shape[1], method, "center")
    return x.movedim(1, -1)


class ImageCrop(Node):
    schema = NodeSchema(
        name="ImageCrop", category="image/transform",
        inputs=[Input("image", IMAGE), Input("width", INT, **_SIZE),
                Input("height", INT, **_SIZE), Input("x", INT, **_POS), Input("y", INT, **_POS)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, width, height, x, y):
        """The width x height block at (x, y), cut at the image's edges; a corner past the
        image is moved onto its last row/column (so at least one pixel remains)."""
        x = min(x, image.shape[2] - 1)
        y = min(y, image.shape[1] - 1)
        return (image[:, y:y + height, x:x + width, :],)


class ImageFlip(Node):
    schema = NodeSchema(
        name="ImageFlip", category="image/transform",
        inputs=[Input("image", IMAGE),
                Input("flip_method", COMBO, choices=["x-axis: vertically",
                                                     "y-axis: horizontally"])],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, flip_method):
        return (torch.flip(image, dims=[1 if flip_method.startswith("x") else 2]),)


class ImageRotate(Node):
    schema = NodeSchema(
        name="ImageRotate", category="image/transform",
        inputs=[Input("image", IMAGE), Input("rotation", COMBO, choices=ROTATIONS)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, rotation):
        """Clockwise by 0/90/180/270 degrees."""
        return (torch.rot90(image, k=quarter_turns(rotation), dims=[2, 1]),)


class ImageBatch(Node):
    schema = NodeSchema(
        name="ImageBatch", display_name="Batch Images", category="image",
        inputs=[Input("image1", IMAGE), Input("image2", IMAGE)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image1, image2):
        """image1's images then image2's, resized (bilinear, centre crop) to image1's size."""
        if image1.shape[-1] != image2.shape[-1]:
            raise ValueError(f"ImageBatch: image1 has {image1.shape[-1]} channels, image2 "
                             f"{image2.shape[-1]}; batch images with the same channels")
        if image1.shape[1:] != image2.shape[1:]:
            image2 = _resized_like(image2, image1, "bilinear")
        return (torch.cat((image1, image2), dim=0),)


class RepeatImageBatch(Node):
    schema = NodeSchema(
        name="RepeatImageBatch", category="image/batch",
        inputs=[Input("image", IMAGE), Input("amount", INT, default=1, min=1, max=4096)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, amount):
        return (image.repeat((amount, 1, 1, 1)),)


class ImageFromBatch(Node):
    schema = NodeSchema(
        name="ImageFromBatch", category="image/batch",
        inputs=[Input("image", IMAGE),
                Input("batch_index", INT, default=0, min=-MAX_RESOLUTION, max=MAX_RESOLUTION),
                Input("length", INT, default=1, min=1, max=4096)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, batch_index, length):
        """Images [batch_index, batch_index + length), clamped to the batch; a negative index
        counts from the end."""
        n = image.shape[0]
        start = batch_index + n if batch_index < 0 else batch_index
        start = max(0, min(n - 1, start))
        return (image[start:start + min(n - start, length)].clone(),)


class ImageAddNoise(Node):
    schema = NodeSchema(
        name="ImageAddNoise", category="image",
        inputs=[Input("image", IMAGE),
                Input("seed", INT, default=0, min=0, max=MAX_SEED, control_after_generate=True,
                      tooltip="The random seed used for creating the noise."),
                Input("strength", FLOAT, default=0.5, min=0.0, max=1.0, step=0.01)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, seed, strength):
        """clip(image + strength * n, 0, 1) with n ~ N(0, 1) of the image's shape, drawn in
        float32 from a CPU generator seeded with ``seed`` - ComfyUI's numbers (it seeds the
        global generator, ``torch.manual_seed(seed)``; this one is private, same stream)."""
        gen = torch.Generator("cpu").manual_seed(int(seed))
        noise = torch.randn(image.shape, generator=gen, dtype=torch.float32).to(image)
        return ((image + strength * noise).clamp(0.0, 1.0),)


class ImageCompositeMasked(Node):
    schema = NodeSchema(
        name="ImageCompositeMasked", category="image",
        inputs=[Input("destination", IMAGE), Input("source", IMAGE),
                Input("x", INT, **_POS), Input("y", INT, **_POS),
                Input("resize_source", BOOLEAN, default=False),
                Input("mask", MASK, optional=True)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, destination, source, x, y, resize_source, mask=None):
        """``source`` pasted with its corner at pixel (x, y), weighted by ``mask`` (resized to
        the source); an RGBA/RGB mismatch is settled as ComfyUI does (see ``alpha_fix``)."""
        destination, source = alpha_fix(destination, source)
        out = composite(destination.clone().movedim(-1, 1), source.movedim(-1, 1), x, y, mask,
                        1, resize_source)
        return (out.movedim(1, -1),)


class EmptyImage(Node):
    schema = NodeSchema(
        name="EmptyImage", category="image",
        inputs=[Input("width", INT, **_SIZE), Input("height", INT, **_SIZE),
                Input("batch_size", INT, default=1, min=1, max=4096),
                Input("color", INT, default=0, min=0, max=0xFFFFFF, step=1,
                      extra={"display": "color"})],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, width, height, batch_size=1, color=0):
        """A batch filled with ``color`` (0xRRGGBB)."""
        rgb = [((color >> shift) & 0xFF) / 0xFF for shift in (16, 8, 0)]
        return (torch.tensor(rgb).expand(batch_size, height, width, 3).clone(),)


BLEND_MODES = ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]


def blend_layers(a: torch.Tensor, b: torch.Tensor, mode: str) -> torch.Tensor:
    """Layer ``b`` over ``a`` in one of :data:`BLEND_MODES` (soft light: the W3C formula)."""
    if mode == "normal":
        return b
    if mode == "multiply":
        return a * b
    if mode == "screen":
        return 1 - (1 - a) * (1 - b)
    if mode == "overlay":
        return torch.where(a <= 0.5, 2 * a * b, 1 - 2 * (1 - a) * (1 - b))
    if mode == "soft_light":
        g = torch.where(a <= 0.25, ((16 * a - 12) * a + 4) * a, torch.sqrt(a))
        return torch.where(b <= 0.5, a - (1 - 2 * b) * a * (1 - a), a + (2 * b - 1) * (g - a))
    if mode == "difference":
        return a - b
    raise ValueError(f"unknown blend_mode {mode!r}; choose one of: {', '.join(BLEND_MODES)}")


class ImageBlend(Node):
    schema = NodeSchema(
        name="ImageBlend", category="image/postprocessing",
        inputs=[Input("image1", IMAGE), Input("image2", IMAGE),
                Input("blend_factor", FLOAT, default=0.5, min=0.0, max=1.0, step=0.01),
                Input("blend_mode", COMBO, choices=BLEND_MODES)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image1, image2, blend_factor, blend_mode):
        """image1 * (1 - f) + mode(image1, image2) * f, clamped to [0, 1]; image2 is resized
        (bicubic, centre crop) to image1's size if they differ; image1's alpha is kept."""
        image1, image2 = alpha_fix(image1, image2)
        if image1.shape != image2.shape:
            image2 = _resized_like(image2, image1, "bicubic")
        out = image1 * (1 - blend_factor) + blend_layers(image1, image2, blend_mode) * blend_factor
        out = out.clamp(0, 1)
        if image1.shape[-1] == 4:
            out[..., 3] = image1[..., 3]
        return (out,)


def gaussian_kernel(size: int, sigma: float) -> torch.Tensor:
    """[size, size] Gaussian weights summing to 1, on ComfyUI's grid: coordinates spaced
    evenly over [-1, 1] (not pixels), so ``sigma`` is relative to the kernel radius."""
    axis = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(axis, axis, indexing="ij")
    g = torch.exp(-(x * x + y * y) / (2.0 * sigma * sigma))
    return g / g.sum()


def filter_image(image: torch.Tensor, kernel: torch.Tensor, radius: int, node: str):
    """IMAGE convolved per channel with ``kernel`` [2r+1, 2r+1], edges reflected."""
    _, h, w, c = image.shape
    if radius >= h or radius >= w:
        raise ValueError(f"{node}: a radius of {radius} needs an image larger than {radius} "
                         f"pixels each way (reflected edges); this one is {w}x{h}")
    x = F.pad(image.movedim(-1, 1), (radius,) * 4, mode="reflect")
    weights = kernel.to(image).expand(c, 1, *kernel.shape)
    return F.conv2d(x, weights, groups=c).movedim(1, -1)


class ImageBlur(Node):
    schema = NodeSchema(
        name="ImageBlur", category="image/postprocessing",
        inputs=[Input("image", IMAGE),
                Input("blur_radius", INT, default=1, min=1, max=31, step=1),
                Input("sigma", FLOAT, default=1.0, min=0.1, max=10.0, step=0.1)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, blur_radius, sigma):
        """Gaussian blur over a (2 r + 1)^2 window (see :func:`gaussian_kernel`)."""
        if blur_radius == 0:
            return (image,)
        kernel = gaussian_kernel(blur_radius * 2 + 1, sigma)
        return (filter_image(image, kernel, blur_radius, "ImageBlur"),)


class ImageSharpen(Node):
    schema = NodeSchema(
        name="ImageSharpen", category="image/postprocessing",
        inputs=[Input("image", IMAGE),
                Input("sharpen_radius", INT, default=1, min=1, max=31, step=1),
                Input("sigma", FLOAT, default=1.0, min=0.1, max=10.0, step=0.01),
                Input("alpha", FLOAT, default=1.0, min=0.0, max=5.0, step=0.01)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, sharpen_radius, sigma, alpha):
        """Unsharp mask: the Gaussian scaled by -10 alpha, with the centre weight raised so the
        kernel sums to 1; clamped to [0, 1]."""
        if sharpen_radius == 0:
            return (image,)
        size = sharpen_radius * 2 + 1
        kernel = gaussian_kernel(size, sigma) * -(alpha * 10)
        kernel[size // 2, size // 2] += 1.0 - kernel.sum()
        return (filter_image(image, kernel, sharpen_radius, "ImageSharpen").clamp(0, 1),)


class ImageScaleToTotalPixels(Node):
    schema = NodeSchema(
        name="ImageScaleToTotalPixels", category="image/upscaling",
        inputs=[Input("image", IMAGE),
                Input("upscale_method", COMBO, choices=IMAGE_UPSCALE_METHODS),
                Input("megapixels", FLOAT, default=1.0, min=0.01, max=16.0, step=0.01),
                # newer ComfyUI (optional here so older workflows, without it, still run)
                Input("resolution_steps", INT, default=1, min=1, max=256, optional=True)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, upscale_method, megapixels, resolution_steps=1):
        """Same aspect ratio, about ``megapixels`` x 2^20 pixels; each side rounded to a
        multiple of ``resolution_steps``."""
        h, w = image.shape[1:3]
        scale = math.sqrt(megapixels * 1024 * 1024 / (w * h))
        width = max(1, round(w * scale / resolution_steps)) * resolution_steps
        height = max(1, round(h * scale / resolution_steps)) * resolution_steps
        return (resize(image.movedim(-1, 1), width, height, upscale_method).movedim(1, -1),)


IMAGE_OP_NODES = [ImageCrop, ImageFlip, ImageRotate, ImageBatch, RepeatImageBatch,
                  ImageFromBatch, ImageAddNoise, ImageCompositeMasked, EmptyImage, ImageBlend,
                  ImageBlur, ImageSharpen, ImageScaleToTotalPixels]
