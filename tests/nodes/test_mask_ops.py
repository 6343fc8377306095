"""Mask nodes against hand-computed values (ComfyUI's nodes_mask.py rules)."""

import pytest
import torch

from noisecraft.nodes.mask_ops import (
    CropMask,
    FeatherMask,
    ImageColorToMask,
    ImageToMask,
    MaskComposite,
    MaskToImage,
    SolidMask,
    ThresholdMask,
)

SRC = torch.tensor([[0.5, 1.0], [0.0, 0.3]])


@pytest.mark.parametrize(("operation", "region"), [
    ("multiply", [[0.3, 0.6], [0.0, 0.18]]),
    ("add", [[1.0, 1.0], [0.6, 0.9]]),  # 1.1 and 1.6 clamped
    ("subtract", [[0.1, 0.0], [0.6, 0.3]]),  # -0.4 clamped
    ("and", [[0.0, 1.0], [0.0, 0.0]]),  # rounded: 0.6 -> 1, 0.5 -> 0 (half to even), 0.3 -> 0
    ("or", [[1.0, 1.0], [1.0, 1.0]]),
    ("xor", [[1.0, 0.0], [1.0, 1.0]]),
])
def test_mask_composite_operations_inside_the_overlap_only(operation, region):
    dest = torch.full((3, 3), 0.6)
    (out,) = MaskComposite.execute(dest, SRC, 1, 1, operation)
    expected = torch.full((1, 3, 3), 0.6)
    expected[0, 1:, 1:] = torch.tensor(region)
    assert torch.allclose(out, expected, atol=1e-6)
    assert torch.equal(dest, torch.full((3, 3), 0.6))


def test_mask_composite_cuts_at_the_edge_and_ignores_a_source_outside():
    (out,) = MaskComposite.execute(torch.zeros(1, 3, 3), torch.ones(2, 2), 2, 0, "add")
    assert out[0, :, 2].tolist() == [1.0, 1.0, 0.0] and out.sum() == 2
    (away,) = MaskComposite.execute(torch.zeros(3, 3), torch.ones(2, 2), 5, 5, "add")
    assert away.sum() == 0


def test_feather_mask_ramps_from_each_side():
    (out,) = FeatherMask.execute(torch.ones(4, 6), left=2, top=1, right=3, bottom=2)
    cols = torch.tensor([0.5, 1.0, 1.0, 1.0, 2 / 3, 1 / 3])  # right: last column is 1/3
    rows = torch.tensor([1.0, 1.0, 1.0, 0.5])  # top=1: rate 1/1; bottom=2: last row 1/2
    assert out.shape == (1, 4, 6)
    assert torch.allclose(out[0], rows[:, None] * cols[None, :])
    (wide,) = FeatherMask.execute(torch.ones(1, 2, 2), 9, 0, 0, 0)  # clamped to the width
    assert torch.allclose(wide[0], torch.tensor([[0.5, 1.0], [0.5, 1.0]]))


def test_conversions_solid_crop_threshold():
    image = torch.rand(2, 3, 4, 4)
    assert torch.equal(ImageToMask.execute(image, "green")[0], image[..., 1])
    assert torch.equal(ImageToMask.execute(image, "alpha")[0], image[..., 3])
    with pytest.raises(ValueError, match="'alpha' needs an image with 4 channels"):
        ImageToMask.execute(image[..., :3], "alpha")
    mask = torch.rand(3, 5)
    (as_image,) = MaskToImage.execute(mask)
    assert as_image.shape == (1, 3, 5, 3) and torch.equal(as_image[0, ..., 2], mask)
    (solid,) = SolidMask.execute(0.25, 4, 2)
    assert solid.shape == (1, 2, 4) and torch.all(solid == 0.25)
    grid = torch.arange(20.0).reshape(4, 5)
    assert CropMask.execute(grid, 3, 1, 5, 2)[0].tolist() == [[[8, 9], [13, 14]]]
    (binary,) = ThresholdMask.execute(torch.tensor([[0.2, 0.5, 0.51]]), 0.5)
    assert binary.tolist() == [[0.0, 0.0, 1.0]]
    rgb = torch.zeros(1, 1, 2, 3)
    rgb[0, 0, 1] = torch.tensor([1.0, 128 / 255, 0.0])
    assert ImageColorToMask.execute(rgb, 0xFF8000)[0].tolist() == [[[0.0, 1.0]]]
