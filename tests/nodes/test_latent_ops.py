"""Latent composite/transform/arithmetic nodes against hand-computed values (ComfyUI's rules)."""

import pytest
import torch

from noisecraft.nodes.latent_ops import (
    LatentAdd,
    LatentBatch,
    LatentBatchSeedBehavior,
    LatentBlend,
    LatentComposite,
    LatentCompositeMasked,
    LatentCrop,
    LatentFlip,
    LatentInterpolate,
    LatentMultiply,
    LatentRotate,
    LatentSubtract,
)


def lat(t, **extra):
    return {"samples": t, **extra}


def test_composite_pastes_at_pixels_over_8_and_cuts_at_the_edge():
    to = lat(torch.zeros(1, 4, 8, 8), batch_index=[5])
    (out,) = LatentComposite.execute(to, lat(torch.ones(1, 4, 4, 4)), x=16, y=8, feather=0)
    expected = torch.zeros(1, 4, 8, 8)
    expected[:, :, 1:5, 2:6] = 1
    assert torch.equal(out["samples"], expected) and out["batch_index"] == [5]
    assert to["samples"].sum() == 0  # the input is not modified
    (edge,) = LatentComposite.execute(to, lat(torch.ones(1, 4, 4, 4)), x=48, y=56, feather=0)
    assert edge["samples"].sum() == 4 * 1 * 2 and edge["samples"][0, 0, 7, 6:8].sum() == 2


def test_composite_feather_ramps_only_sides_inside_the_destination():
    to, src = lat(torch.zeros(1, 1, 8, 8)), lat(torch.ones(1, 1, 4, 4))
    (inner,) = LatentComposite.execute(to, src, x=16, y=16, feather=16)  # 2 latent pixels
    ramp = torch.tensor([0.5, 1.0, 1.0, 0.5])
    assert torch.allclose(inner["samples"][0, 0, 2:6, 2:6], ramp[:, None] * ramp[None, :])
    assert inner["samples"][0, 0, :2].sum() == 0
    (corner,) = LatentComposite.execute(to, src, x=0, y=0, feather=16)
    ramp = torch.tensor([1.0, 1.0, 1.0, 0.5])  # top/left touch the border: not feathered
    assert torch.allclose(corner["samples"][0, 0, :4, :4], ramp[:, None] * ramp[None, :])
    # feathering blends with what was there: 0.5 * from + 0.5 * to on the first row
    (mixed,) = LatentComposite.execute(lat(torch.full((1, 1, 8, 8), 3.0)), src, 16, 16, 16)
    assert mixed["samples"][0, 0, 2, 3].item() == pytest.approx(0.5 * 1 + 0.5 * 3)


def test_composite_rejects_mismatched_batches():
    with pytest.raises(ValueError, match="samples_from has 2"):
        LatentComposite.execute(lat(torch.zeros(3, 4, 8, 8)), lat(torch.ones(2, 4, 2, 2)), 0, 0)


def test_composite_masked_weights_the_source_and_tiles_the_batch():
    dest = lat(torch.zeros(2, 4, 4, 4))
    mask = torch.tensor([[1.0, 0.0], [0.5, 1.0]])
    (out,) = LatentCompositeMasked.execute(dest, lat(torch.full((1, 4, 2, 2), 2.0)), 8, 8,
                                           False, mask)
    expected = torch.zeros(2, 4, 4, 4)
    expected[:, :, 1:3, 1:3] = 2.0 * mask
    assert torch.equal(out["samples"], expected)
    (whole,) = LatentCompositeMasked.execute(dest, lat(torch.ones(1, 4, 2, 2)), 0, 0, True)
    assert torch.equal(whole["samples"], torch.ones(2, 4, 4, 4))
    (cut,) = LatentCompositeMasked.execute(dest, lat(torch.ones(1, 4, 3, 3)), 24, 24, False)
    assert cut["samples"].sum() == 2 * 4 * 1  # only the corner pixel (3, 3) overlaps


def test_blend_flip_rotate_crop():
    a, b = lat(torch.ones(1, 4, 2, 2)), lat(torch.full((1, 4, 2, 2), 3.0))
    assert torch.allclose(LatentBlend.execute(a, b, 0.25)[0]["samples"], torch.full_like(
        a["samples"], 0.25 * 1 + 0.75 * 3))
    grid = lat(torch.arange(6.0).reshape(1, 1, 2, 3))
    (v,) = LatentFlip.execute(grid, "x-axis: vertically")
    (h,) = LatentFlip.execute(grid, "y-axis: horizontally")
    assert v["samples"][0, 0].tolist() == [[3, 4, 5], [0, 1, 2]]
    assert h["samples"][0, 0].tolist() == [[2, 1, 0], [5, 4, 3]]
    (r90,) = LatentRotate.execute(grid, "90 degrees")
    assert r90["samples"][0, 0].tolist() == [[3, 0], [4, 1], [5, 2]]  # clockwise
    (r270,) = LatentRotate.execute(grid, "270 degrees")
    assert r270["samples"][0, 0].tolist() == [[2, 5], [1, 4], [0, 3]]
    assert torch.equal(LatentRotate.execute(grid, "none")[0]["samples"], grid["samples"])
    big = lat(torch.arange(256.0).reshape(1, 1, 16, 16))
    (c,) = LatentCrop.execute(big, 64, 32, 16, 8)
    assert torch.equal(c["samples"], big["samples"][:, :, 1:5, 2:10])
    (moved,) = LatentCrop.execute(big, 64, 64, 120, 0)  # x // 8 = 15 > 16 - 8: moved to 8
    assert torch.equal(moved["samples"], big["samples"][:, :, 0:8, 8:16])


def test_arithmetic_matches_the_second_latent_to_the_first():
    a = lat(torch.arange(2 * 4 * 4 * 4.0).reshape(2, 4, 4, 4), noise_mask=torch.ones(1, 1, 4, 4))
    small = lat(torch.full((1, 4, 2, 2), 2.0))  # resized to 4x4 and tiled to batch 2
    (s,) = LatentAdd.execute(a, small)
    assert torch.allclose(s["samples"], a["samples"] + 2) and "noise_mask" in s
    (d,) = LatentSubtract.execute(a, small)
    assert torch.allclose(d["samples"], a["samples"] - 2)
    assert torch.equal(LatentMultiply.execute(a, -0.5)[0]["samples"], a["samples"] * -0.5)


def test_interpolate_mixes_directions_and_lengths_per_pixel():
    x = torch.zeros(2, 4, 1, 1)
    x[:, 0], x[:, 1] = 3.0, 4.0  # length 5 along (0.6, 0.8, 0, 0)
    y = torch.zeros(2, 4, 1, 1)
    y[:, 3] = 1.0  # length 1 along (0, 0, 0, 1)
    (out,) = LatentInterpolate.execute(lat(x), lat(y), 0.5)
    mixed = torch.tensor([0.3, 0.4, 0.0, 0.5])
    expected = mixed / mixed.norm() * (0.5 * 5 + 0.5 * 1)
    for item in out["samples"]:
        assert torch.allclose(item[:, 0, 0], expected)
    assert torch.allclose(LatentInterpolate.execute(lat(x), lat(y), 1.0)[0]["samples"], x)


def test_batch_concatenates_items_and_batch_indices():
    a = lat(torch.zeros(1, 4, 4, 4), batch_index=[3])
    b = lat(torch.ones(2, 4, 2, 2))
    (out,) = LatentBatch.execute(a, b)
    assert out["samples"].shape == (3, 4, 4, 4) and out["batch_index"] == [3, 0, 1]
    assert torch.equal(out["samples"][1:], torch.ones(2, 4, 4, 4))
    (fixed,) = LatentBatchSeedBehavior.execute(out, "fixed")
    assert fixed["batch_index"] == [3, 3, 3]
    (rand,) = LatentBatchSeedBehavior.execute(out, "random")
    assert "batch_index" not in rand and "batch_index" in out
