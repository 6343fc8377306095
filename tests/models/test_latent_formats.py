"""Latent formats: scaling between VAE and diffusion latents, linear RGB previews."""

import pytest
import torch

from noisecraft.models.latent_formats import (
    SD15,
    SDXL,
    LatentFormat,
    latent_to_preview_image,
    latent_to_rgb_preview,
)


def test_published_scaling_factors():
    assert SD15.scaling_factor == 0.18215 and SD15.shift_factor == 0.0
    assert SDXL.scaling_factor == 0.13025
    assert SD15.channels == SDXL.channels == 4
    assert (SD15.taesd, SDXL.taesd) == ("taesd", "taesdxl")


@pytest.mark.parametrize("fmt", [SD15, SDXL, LatentFormat(channels=4, scaling_factor=0.5,
                                                          shift_factor=0.1)])  # fmt: skip
def test_process_in_out_are_inverse(fmt):
    z = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    x = fmt.process_in(z)
    assert torch.allclose(x, (z - fmt.shift_factor) * fmt.scaling_factor)
    assert torch.allclose(fmt.process_out(x), z)


def test_preview_is_the_linear_map_per_pixel():
    # one pixel per latent channel, that channel = 1: each pixel shows one factor row (+ bias)
    latent = torch.eye(4).reshape(4, 1, 4)  # (C, h=1, w=4)
    rgb = latent_to_rgb_preview(latent, SDXL)
    assert rgb.shape == (1, 4, 3) and rgb.dtype == torch.uint8
    for c in range(4):
        expected = [round((f + b + 1) * 127.5) for f, b in zip(SDXL.rgb_factors[c], SDXL.rgb_bias,
                                                               strict=True)]  # fmt: skip
        assert rgb[0, c].tolist() == expected
    # SD15 channel 3 = +1: R = -0.2120 -> round(0.788 * 127.5) = 100
    assert latent_to_rgb_preview(latent, SD15)[0, 3, 0].item() == 100
    # far outside the range: clamped, not wrapped
    assert latent_to_rgb_preview(latent * 100, SD15)[0, 3].tolist() == [0, 0, 0]
    batched = latent_to_rgb_preview(torch.randn(3, 4, 5, 6), SD15)
    assert batched.shape == (3, 5, 6, 3)


def test_preview_image_and_errors():
    img = latent_to_preview_image(torch.randn(2, 4, 8, 12), SD15, scale=4)
    assert img.mode == "RGB" and img.size == (48, 32)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        latent_to_rgb_preview(torch.zeros(1, 16, 8, 8), SD15)
    with pytest.raises(ValueError, match="no rgb_factors"):
        latent_to_rgb_preview(torch.zeros(4, 2, 2), LatentFormat(channels=4, scaling_factor=1.0))
    with pytest.raises(ValueError, match="4 rows of"):
        LatentFormat(channels=4, scaling_factor=1.0, rgb_factors=((1, 2, 3),))
    with pytest.raises(ValueError, match="scaling_factor must be > 0"):
        LatentFormat(channels=4, scaling_factor=0.0)


def test_fit_rgb_factors_recovers_a_linear_decoder():
    from noisecraft.models.latent_formats import fit_rgb_factors

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=g)
    true = torch.randn(4, 3, generator=g, dtype=torch.float64)
    bias = torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64)
    small = latents.double().movedim(1, -1) @ true + bias  # [N, 8, 8, 3]
    images = small.movedim(-1, 1).repeat_interleave(4, -1).repeat_interleave(4, -2)  # 4x up
    factors, got_bias = fit_rgb_factors(latents, images)
    assert torch.allclose(torch.tensor(factors, dtype=torch.float64), true, atol=1e-6)
    assert torch.allclose(torch.tensor(got_bias, dtype=torch.float64), bias, atol=1e-6)
    fmt = LatentFormat(channels=4, scaling_factor=1.0, rgb_factors=factors, rgb_bias=got_bias)
    assert latent_to_rgb_preview(latents[0], fmt).shape == (8, 8, 3)
    with pytest.raises(ValueError, match="same N"):
        fit_rgb_factors(latents, images[:2])
