"""Tiled upscaling: tiled equals untiled within a stated tolerance, on a tiny conv upscaler
built here (spandrel, for loading real upscaler files, is not installed: it needs
torchvision)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from noisecraft.request import InputError
from noisecraft.upscale import upscale_tiled


def _tiny_upscaler(scale: int = 2) -> nn.Module:
    """conv3x3 -> LeakyReLU -> conv3x3 -> PixelShuffle (receptive radius 2 input px), as the
    ESRGAN family ends."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2),
                         nn.Conv2d(8, 3 * scale * scale, 3, padding=1),
                         nn.PixelShuffle(scale)).eval()


def test_tiled_equals_untiled_within_tolerance():
    torch.set_num_threads(1)
    model = _tiny_upscaler(2)
    image = torch.rand(1, 3, 40, 56, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(image)
    tiled = upscale_tiled(model, image, 2, tile=16, overlap=8)
    assert tiled.shape == (1, 3, 80, 112)
    # receptive radius 2 px <= overlap / 4: the zero-padded margins get weight 0, so tiled
    # equals untiled up to float32 rounding (stated tolerance 1e-5)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-5)
    rough = upscale_tiled(model, image, 2, tile=16, overlap=4)  # guard 1 px < radius 2 px
    assert (rough - full).abs().max() > 1e-3  # the margin matters: the test can fail
    untiled = upscale_tiled(model, image, 2, tile=64, overlap=8)  # one tile: exact
    torch.testing.assert_close(untiled, full, rtol=0, atol=1e-6)


def test_bad_tiles_and_wrong_scale_teach():
    model = _tiny_upscaler(2)
    image = torch.rand(1, 3, 16, 16)
    with pytest.raises(InputError, match="tile .8. must be larger than overlap .8."):
        upscale_tiled(model, image, 2, tile=8, overlap=8)
    with pytest.raises(InputError, match="expected x4"):
        upscale_tiled(model, image, 4, tile=16, overlap=4)
