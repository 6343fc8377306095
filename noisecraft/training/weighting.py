"""Per-pixel loss weights that make small objects count.

On images that are mostly one flat background colour (the procedural shapes data, product
shots, icons) an unweighted mean-squared error is nearly all background: a model learns the
background long before the object, and at a few percent of the pixels the object's colour and
shape barely move the loss.  :func:`foreground_weights` finds the pixels that differ from their
image's median colour and weighs them ``1 + weight``; no mask files are needed.  (kohya's
sd-scripts offers the same idea with explicit masks, ``--masked_loss``.)  The VAE trainer uses
it on reconstructions and the diffusion trainer on its noise-prediction error, pooled to the
latent grid.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def foreground_weights(images: torch.Tensor, weight: float, threshold: float = 0.1,
                       size: tuple[int, int] | None = None) -> torch.Tensor | float:
    """Loss weights [B, 1, H, W] for images [B, 3, H, W] in [-1, 1]: ``1 + weight`` where a
    pixel's colour is further than ``threshold`` (sum over channels) from its image's median
    colour, 1 elsewhere; averaged over cells to ``size`` (h, w) when given (the latent grid).
    ``weight == 0``: the plain 1.0."""
    if not weight:
        return 1.0
    x = images.float()
    median = x.flatten(2).median(dim=2).values[:, :, None, None]
    away = (x - median).abs().sum(dim=1, keepdim=True) > threshold
    w = 1.0 + weight * away.float()
    if size is not None and tuple(size) != tuple(w.shape[-2:]):
        w = F.adaptive_avg_pool2d(w, size)
    return w
