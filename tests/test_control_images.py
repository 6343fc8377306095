"""Control images without learned weights: Canny edges, tile, inpaint, resizing to the latents."""

from __future__ import annotations

import pytest
import torch

from noisecraft.control_images import (
    canny,
    control_hint,
    fit_control_image,
    inpaint_control_image,
    tile_image,
)

pytest.importorskip("cv2")


def _square(size=64, lo=0.0, hi=1.0, a=16, b=48):
    img = torch.full((1, 3, size, size), lo)
    img[..., a:b, a:b] = hi
    return img


def test_canny_finds_the_outline_of_a_square():
    edges = canny(_square())
    assert edges.shape == (1, 3, 64, 64) and edges.dtype == torch.float32
    assert set(edges.unique().tolist()) == {0.0, 1.0}
    assert torch.equal(edges[:, 0], edges[:, 1]) and torch.equal(edges[:, 0], edges[:, 2])
    e = edges[0, 0]
    assert e[24:40, 24:40].sum() == 0  # flat inside
    assert e[:8].sum() == 0 and e[:, :8].sum() == 0 and e[56:].sum() == 0  # flat outside
    for line in (e[14:19, 20:44], e[45:50, 20:44], e[20:44, 14:19].T, e[20:44, 45:50].T):
        assert (line.sum(0) >= 1).all()  # every side of the square has an edge pixel
    assert e.sum() < 4 * 32 * 3  # thin lines (non-maximum suppression), not bands


def test_canny_thresholds_are_on_a_0_to_1_scale():
    weak = _square(lo=0.4, hi=0.5)  # a step of 0.1: magnitude ~0.16 after the blur
    assert canny(weak).sum() == 0  # below ComfyUI's defaults (0.4, 0.8)
    assert canny(weak, 0.05, 0.1).sum() > 0
    assert canny(torch.full((2, 3, 32, 32), 0.7)).sum() == 0
    with pytest.raises(ValueError, match="low_threshold <= high_threshold"):
        canny(weak, 0.9, 0.1)


def test_tile_image_keeps_size_and_removes_detail():
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 64, 48, generator=g)
    out = tile_image(img, downscale=8, blur_sigma=1.0)
    assert out.shape == img.shape and out.min() >= 0 and out.max() <= 1
    assert out.std() < 0.3 * img.std()  # pixel noise averaged away
    torch.testing.assert_close(out.mean(dim=(2, 3)), img.mean(dim=(2, 3)), atol=0.02, rtol=0)
    flat = torch.full((1, 3, 32, 32), 0.25)
    torch.testing.assert_close(tile_image(flat), flat)


def test_inpaint_control_image_sets_masked_pixels_to_minus_one():
    img = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4, :] = 1.0  # the top half, at half resolution
    out = inpaint_control_image(img, mask)
    assert out.shape == img.shape
    assert (out[..., :8, :] == -1).all()
    assert torch.equal(out[..., 8:, :], img[..., 8:, :])
    with pytest.raises(ValueError, match="mask must be"):
        inpaint_control_image(img, torch.zeros(1, 3, 16, 16))


def test_user_maps_are_fitted_to_8x_the_latents():
    depth = torch.linspace(0, 1, 100).repeat(1, 3, 50, 1)  # [1, 3, 50, 100], wider than 1:1
    x = torch.zeros(4, 4, 8, 8, dtype=torch.float64)
    hint = control_hint(depth, x)
    assert hint.shape == (4, 3, 64, 64) and hint.dtype == torch.float64
    # centre crop: the middle half of the gradient remains
    assert 0.2 < float(hint[0, 0, 0, 0]) < 0.3 and 0.7 < float(hint[0, 0, 0, -1]) < 0.8
    same = torch.rand(1, 3, 64, 64)
    assert fit_control_image(same, 64, 64) is same
    with pytest.raises(ValueError, match="does not divide the latent batch"):
        control_hint(torch.zeros(3, 3, 8, 8), x)
