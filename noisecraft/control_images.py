"""Control images for ControlNet that need no learned preprocessor.

Images are float tensors ``[B, C, H, W]`` in [0, 1] (``noisecraft.images.image_to_tensor``),
masks ``[B|1, 1, H, W]`` in [0, 1] with 1 = repaint.  A ControlNet expects its control image at
8x the latent size: :func:`fit_control_image` / :func:`control_hint` resize and batch any image
(user-supplied depth, pose, scribble, ... maps pass through them unchanged otherwise).

* :func:`canny` - binary Canny edges (OpenCV), thresholds on ComfyUI's 0..1 scale;
* :func:`tile_image` - the tile ControlNet's input: downscaled, blurred, back at full size;
* :func:`inpaint_control_image` - the inpaint ControlNet's input: masked pixels set to -1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

_CANNY_BLUR_SIGMA = 1.0  # ComfyUI's Canny node (kornia.filters.canny): 5x5 Gaussian, sigma 1


def _check_image(image: torch.Tensor, what: str = "image") -> None:
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        got = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{what} must be a [B, C, H, W] tensor in [0, 1], got {got}")


def fit_control_image(image: torch.Tensor, height: int, width: int, *,
                      mode: str = "nearest-exact") -> torch.Tensor:
    """Resize ``image`` [B, C, h, w] to [B, C, height, width], first cropping the centre to the
    target's aspect ratio (ComfyUI's ``common_upscale(..., crop="center")``, which ControlNet
    hints go through with ``nearest-exact``, keeping edge maps binary)."""
    _check_image(image)
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    if w * height > h * width:  # too wide: crop the sides
        new_w = round(h * width / height)
        x0 = (w - new_w) // 2
        image = image[..., :, x0:x0 + new_w]
    elif w * height < h * width:  # too tall: crop top and bottom
        new_h = round(w * height / width)
        y0 = (h - new_h) // 2
        image = image[..., y0:y0 + new_h, :]
    return F.interpolate(image.float(), size=(height, width), mode=mode).to(image.dtype)


def control_hint(image: torch.Tensor, x: torch.Tensor, scale: int = 8) -> torch.Tensor:
    """The control image as a ControlNet input for latents ``x`` [B, C, h, w]: resized to
    ``[scale*h, scale*w]`` and repeated to batch B (a batch of 1, or one that divides B, e.g. the
    prompt batch under classifier-free guidance's doubled batch), in x's dtype and device."""
    _check_image(image, "control image")
    b, (h, w) = x.shape[0], x.shape[-2:]
    if b % image.shape[0]:
        raise ValueError(f"control image batch {image.shape[0]} does not divide the latent "
                         f"batch {b}; give 1 image or one per latent")
    hint = fit_control_image(image, h * scale, w * scale)
    hint = hint.repeat(b // image.shape[0], 1, 1, 1)
    return hint.to(device=x.device, dtype=x.dtype)


def _gray_u8(image: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [0, 1] -> [B, H, W] uint8 luminance (ITU-R 601, as kornia/OpenCV)."""
    img = image.detach().float().clamp(0, 1).cpu()
    if img.shape[1] == 3:
        img = 0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]
    elif img.shape[1] == 1:
        img = img[:, 0]
    else:
        raise ValueError(f"canny needs a 1- or 3-channel image, got {img.shape[1]} channels")
    return (img * 255).round().to(torch.uint8).numpy()


def canny(image: torch.Tensor, low_threshold: float = 0.4,
          high_threshold: float = 0.8) -> torch.Tensor:
    """Canny edges (Canny 1986) as a ControlNet control image: ``[B, 3, H, W]`` of 0.0 / 1.0.

    Thresholds are ComfyUI's Canny node's (defaults 0.4 and 0.8): hysteresis limits on the
    gradient magnitude (3x3 Sobel, unnormalised, L2 norm) of the [0, 1] greyscale image after
    a 5x5 Gaussian blur of sigma 1, as ``kornia.filters.canny`` which that node calls.  OpenCV's
    ``cv2.Canny`` runs the same steps on 8-bit pixels, so the thresholds are scaled by 255.
    """
    import cv2  # opencv-python-headless; imported here so the rest needs no OpenCV

    _check_image(image)
    if not 0 <= low_threshold <= high_threshold <= 1:
        raise ValueError(f"canny needs 0 <= low_threshold <= high_threshold <= 1, got "
                         f"{low_threshold} and {high_threshold}")
    k = 255.0
    edges = []
    for gray in _gray_u8(image):
        blurred = cv2.GaussianBlur(gray, (5, 5), _CANNY_BLUR_SIGMA)
        e = cv2.Canny(blurred, low_threshold * k, high_threshold * k, L2gradient=True)
        edges.append(torch.from_numpy(e > 0))
    out = torch.stack(edges)[:, None].to(torch.float32).expand(-1, 3, -1, -1)
    return out.contiguous().to(image.device)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).to(image)
    c = image.shape[1]
    x = F.pad(image, (radius, radius, radius, radius), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def tile_image(image: torch.Tensor, downscale: float = 4.0, blur_sigma: float = 1.0):
    """The tile ControlNet's control image: ``image`` reduced by ``downscale`` (area average),
    brought back to full size (bilinear) and blurred with a Gaussian of ``blur_sigma`` pixels
    (0: no blur); so the model sees the layout and colours but must invent the detail.
    Returns a tensor of the input's shape, in [0, 1]."""
    _check_image(image)
    if downscale < 1 or blur_sigma < 0:
        raise ValueError(f"tile_image needs downscale >= 1 and blur_sigma >= 0, got {downscale} "
                         f"and {blur_sigma}")
    h, w = image.shape[-2:]
    small = (max(1, round(h / downscale)), max(1, round(w / downscale)))
    x = F.interpolate(image.float(), size=small, mode="area")
    x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if blur_sigma > 0 and min(h, w) > 2 * math.ceil(3 * blur_sigma):
        x = _gaussian_blur(x, blur_sigma)
    return x.clamp(0, 1).to(image.dtype)


def inpaint_control_image(image: torch.Tensor, mask: torch.Tensor,
                          threshold: float = 0.5) -> torch.Tensor:
    """The inpaint ControlNet's control image (control_v11p_sd15_inpaint): ``image`` with every
    pixel whose mask value exceeds ``threshold`` set to -1 in all channels, the value that
    model was trained to read as "to be filled".  mask [B|1, 1, h, w], 1 = repaint, resized
    (nearest) to the image when its size differs."""
    _check_image(image)
    _check_image(mask, "mask")
    if mask.shape[1] != 1 or mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"mask must be [1 or B, 1, H, W] for image {tuple(image.shape)}, got "
                         f"{tuple(mask.shape)}")
    if mask.shape[-2:] != image.shape[-2:]:
        mask = F.interpolate(mask.float(), size=image.shape[-2:], mode="nearest-exact")
    masked = (mask > threshold).expand(image.shape[0], image.shape[1], -1, -1)
    return image.masked_fill(masked, -1.0)
