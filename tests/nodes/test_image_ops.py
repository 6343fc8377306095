"""Image nodes against hand-computed values, their /object_info entries against ComfyUI's, and
a model-free API-format workflow chaining image and mask nodes through run_workflow."""

import math

import pytest
import torch

from noisecraft.graph import ExecutionContext, run_workflow_result
from noisecraft.nodes import builtin_registry
from noisecraft.nodes.image_ops import (
    EmptyImage,
    ImageBatch,
    ImageBlend,
    ImageBlur,
    ImageCompositeMasked,
    ImageCrop,
    ImageFlip,
    ImageFromBatch,
    ImageRotate,
    ImageScaleToTotalPixels,
    ImageSharpen,
    RepeatImageBatch,
)


def const(value, shape=(1, 4, 4, 3)):
    return torch.full(shape, float(value))


@pytest.mark.parametrize(("mode", "a", "b", "factor", "expected"), [
    ("normal", 0.2, 0.6, 0.5, 0.4),
    ("multiply", 0.2, 0.6, 1.0, 0.12),
    ("screen", 0.2, 0.6, 1.0, 1 - 0.8 * 0.4),
    ("overlay", 0.2, 0.6, 1.0, 2 * 0.2 * 0.6),
    ("overlay", 0.8, 0.6, 1.0, 1 - 2 * 0.2 * 0.4),
    ("soft_light", 0.2, 0.6, 1.0, 0.2 + 0.2 * (((16 * 0.2 - 12) * 0.2 + 4) * 0.2 - 0.2)),
    ("soft_light", 0.2, 0.3, 1.0, 0.2 - 0.4 * 0.2 * 0.8),
    ("soft_light", 0.64, 0.75, 1.0, 0.64 + 0.5 * (0.8 - 0.64)),  # g(a) = sqrt(a) above 1/4
    ("difference", 0.6, 0.2, 1.0, 0.4),
    ("difference", 0.2, 0.6, 1.0, 0.0),  # clamped
])
def test_blend_modes(mode, a, b, factor, expected):
    (out,) = ImageBlend.execute(const(a), const(b), factor, mode)
    assert torch.allclose(out, const(expected), atol=1e-6)


def test_blend_resizes_the_second_image_and_keeps_the_first_alpha():
    rgba = torch.cat([const(0.2), const(0.3, (1, 4, 4, 1))], dim=-1)
    (out,) = ImageBlend.execute(rgba, const(0.6, (1, 2, 2, 3)), 0.5, "normal")
    assert out.shape == (1, 4, 4, 4)
    assert torch.allclose(out[..., :3], const(0.4), atol=1e-6)
    assert torch.allclose(out[..., 3], torch.full((1, 4, 4), 0.3))


def _gauss3():
    e1, e2 = math.exp(-0.5), math.exp(-1.0)  # grid spacing 1 on [-1, 1], sigma 1
    g = torch.tensor([[e2, e1, e2], [e1, 1.0, e1], [e2, e1, e2]])
    return g / g.sum()


def test_blur_spreads_an_impulse_by_comfyuis_kernel_and_keeps_flat_images():
    image = torch.zeros(1, 5, 5, 3)
    image[0, 2, 2] = 1.0
    (out,) = ImageBlur.execute(image, 1, 1.0)
    assert torch.allclose(out[0, 1:4, 1:4, 0], _gauss3(), atol=1e-6)
    assert out[0, 0].abs().sum() == 0
    assert torch.allclose(ImageBlur.execute(const(0.3, (2, 6, 5, 3)), 2, 0.7)[0], const(
        0.3, (2, 6, 5, 3)), atol=1e-6)
    with pytest.raises(ValueError, match="ImageBlur: a radius of 4"):
        ImageBlur.execute(const(0.3), 4, 1.0)


def test_sharpen_is_an_unsharp_mask_that_sums_to_one():
    image = torch.full((1, 5, 5, 1), 0.5)
    image[0, 2, 2] = 0.6
    (out,) = ImageSharpen.execute(image, 1, 1.0, 0.1)
    g = _gauss3()
    # kernel: -10 * alpha * g with the centre raised so it sums to 1 -> 0.5 + 0.1 * kernel
    centre = 2.0 - g[1, 1].item()  # -g_c - (-1) + 1
    assert out[0, 2, 2, 0].item() == pytest.approx(0.5 + 0.1 * centre, abs=1e-6)
    assert out[0, 1, 2, 0].item() == pytest.approx(0.5 - 0.1 * g[0, 1].item(), abs=1e-6)
    assert torch.allclose(ImageSharpen.execute(const(0.3), 1, 1.0, 1.0)[0], const(0.3),
                          atol=1e-6)


def test_composite_masked_pastes_with_the_mask_and_fixes_alpha():
    dest, src = const(0.0), const(1.0, (1, 2, 2, 3))
    mask = torch.tensor([[1.0, 0.0], [0.0, 0.5]])
    (out,) = ImageCompositeMasked.execute(dest, src, 1, 2, False, mask)
    expected = torch.zeros(1, 4, 4)
    expected[0, 2:4, 1:3] = mask
    assert torch.equal(out[..., 0], expected) and torch.equal(out[..., 2], expected)
    rgba = torch.zeros(1, 4, 4, 4)
    (alpha,) = ImageCompositeMasked.execute(rgba, src, 0, 0, True)
    assert alpha.shape == (1, 4, 4, 4) and torch.equal(alpha, torch.ones(1, 4, 4, 4))


def test_empty_crop_flip_rotate_batch():
    (img,) = EmptyImage.execute(3, 2, 2, 0xFF8000)
    assert img.shape == (2, 2, 3, 3)
    assert torch.allclose(img[0, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]))
    grid = torch.arange(6.0).reshape(1, 2, 3, 1)
    assert ImageCrop.execute(grid, 2, 5, 1, 0)[0][0, :, :, 0].tolist() == [[1, 2], [4, 5]]
    assert ImageCrop.execute(grid, 9, 9, 7, 7)[0][0, :, :, 0].tolist() == [[5]]
    assert ImageFlip.execute(grid, "x-axis: vertically")[0][0, :, :, 0].tolist() == [
        [3, 4, 5], [0, 1, 2]]
    assert ImageFlip.execute(grid, "y-axis: horizontally")[0][0, :, :, 0].tolist() == [
        [2, 1, 0], [5, 4, 3]]
    assert ImageRotate.execute(grid, "90 degrees")[0][0, :, :, 0].tolist() == [
        [3, 0], [4, 1], [5, 2]]
    (both,) = ImageBatch.execute(const(0.1), const(0.7, (2, 2, 2, 3)))
    assert both.shape == (3, 4, 4, 3) and torch.allclose(both[1:], const(0.7, (2, 4, 4, 3)))
    with pytest.raises(ValueError, match="image2 1"):
        ImageBatch.execute(const(0.1), const(0.7, (1, 4, 4, 1)))
    many = torch.arange(4.0).reshape(4, 1, 1, 1).expand(4, 2, 2, 3)
    assert ImageFromBatch.execute(many, -1, 3)[0][:, 0, 0, 0].tolist() == [3.0]
    assert ImageFromBatch.execute(many, 1, 2)[0][:, 0, 0, 0].tolist() == [1.0, 2.0]
    assert RepeatImageBatch.execute(many[:1], 3)[0].shape == (3, 2, 2, 3)


def test_scale_to_total_pixels():
    image = torch.rand(1, 100, 200, 3)
    (out,) = ImageScaleToTotalPixels.execute(image, "bilinear", 80000 / 1024 / 1024)
    assert out.shape == (1, 200, 400, 3)  # 4x the pixels, same aspect
    (steps,) = ImageScaleToTotalPixels.execute(image, "area", 80000 / 1024 / 1024, 64)
    assert steps.shape == (1, 192, 384, 3)  # each side rounded to a multiple of 64


def test_object_info_follows_comfyui():
    info = builtin_registry(models=False).object_info()
    lc = info["LatentComposite"]
    assert lc["input_order"] == {"required": ["samples_to", "samples_from", "x", "y",
                                              "feather"]}
    assert lc["input"]["required"]["feather"] == ["INT", {"default": 0, "min": 0,
                                                          "max": 16384, "step": 8}]
    assert lc["display_name"] == "Latent Composite" and lc["category"] == "latent"
    lcm = info["LatentCompositeMasked"]
    assert lcm["input_order"] == {"required": ["destination", "source", "x", "y",
                                               "resize_source"], "optional": ["mask"]}
    assert info["ImageBlend"]["input"]["required"]["blend_mode"] == [
        ["normal", "multiply", "screen", "overlay", "soft_light", "difference"]]
    assert info["ImageSharpen"]["input"]["required"]["sigma"][1] == {
        "default": 1.0, "min": 0.1, "max": 10.0, "step": 0.01}
    assert info["EmptyImage"]["input"]["required"]["color"] == [
        "INT", {"default": 0, "min": 0, "max": 0xFFFFFF, "step": 1, "display": "color"}]
    assert info["MaskComposite"]["input"]["required"]["operation"] == [
        ["multiply", "add", "subtract", "and", "or", "xor"]]
    assert info["ImageToMask"]["display_name"] == "Convert Image to Mask"
    assert info["LatentRotate"]["input"]["required"]["rotation"] == [
        ["none", "90 degrees", "180 degrees", "270 degrees"]]
    assert info["LatentBatchSeedBehavior"]["input"]["required"]["seed_behavior"] == [
        ["random", "fixed"], {"default": "fixed"}]


def test_api_workflow_chains_image_and_mask_nodes(tmp_path):
    prompt = {
        "1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 16,
                                                     "batch_size": 1, "color": 0xFF0000}},
        "2": {"class_type": "EmptyImage", "inputs": {"width": 8, "height": 8,
                                                     "batch_size": 1, "color": 0x0000FF}},
        "3": {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 8, "height": 8}},
        "4": {"class_type": "FeatherMask", "inputs": {"mask": ["3", 0], "left": 4, "top": 0,
                                                      "right": 0, "bottom": 0}},
        "5": {"class_type": "ImageCompositeMasked", "inputs": {
            "destination": ["1", 0], "source": ["2", 0], "x": 4, "y": 4,
            "resize_source": False, "mask": ["4", 0]}},
        "6": {"class_type": "ImageToMask", "inputs": {"image": ["5", 0], "channel": "blue"}},
        "7": {"class_type": "ThresholdMask", "inputs": {"mask": ["6", 0], "value": 0.5}},
        "8": {"class_type": "MaskToImage", "inputs": {"mask": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0],
                                                    "filename_prefix": "ops"}},
    }
    run = run_workflow_result(prompt, registry=builtin_registry(models=False),
                              context=ExecutionContext(output_dir=tmp_path))
    blue = run.values["6"][0][0]
    # feathered from the left over 4 columns: 1/4, 2/4, 3/4, then 1
    assert blue[4, 4:9].tolist() == [0.25, 0.5, 0.75, 1.0, 1.0] and blue[:4].sum() == 0
    assert torch.allclose(run.values["5"][0][0, 4, 4], torch.tensor([0.75, 0.0, 0.25]))
    expected = torch.zeros(16, 16)
    expected[4:12, 6:12] = 1.0  # above 0.5 from the third feathered column on
    assert torch.equal(run.values["7"][0][0], expected)
    assert (tmp_path / run.outputs["9"]["images"][0]["filename"]).is_file()
