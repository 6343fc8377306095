"""Input image and mask loading: modes, alpha, palette, 16-bit, errors, grow and blur."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from noisecraft.images import (
    check_same_size,
    extend_canvas,
    grow_and_blur,
    image_to_tensor,
    load_image,
    load_mask,
    tensor_to_images,
)
from noisecraft.request import InputError


def test_rgba_is_composited_over_white(tmp_path):
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 200
    a[:2, :, 3] = 255  # top half opaque red-ish, bottom transparent
    Image.fromarray(a, "RGBA").save(tmp_path / "a.png")
    rgb = np.asarray(load_image(tmp_path / "a.png"))
    assert rgb[0, 0].tolist() == [200, 0, 0]
    assert rgb[3, 0].tolist() == [255, 255, 255]


def test_palette_with_transparency(tmp_path):
    im = Image.new("P", (4, 4), 0)
    im.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    im.putpixel((0, 0), 1)
    im.info["transparency"] = 0
    im.save(tmp_path / "p.png", transparency=0)
    rgb = np.asarray(load_image(tmp_path / "p.png"))
    assert rgb[0, 0].tolist() == [40, 50, 60]
    assert rgb[1, 1].tolist() == [255, 255, 255]


def test_sixteen_bit_greyscale_is_scaled(tmp_path):
    a = np.array([[0, 65535], [32896, 257]], np.uint16)
    Image.fromarray(a).save(tmp_path / "g16.png")
    rgb = np.asarray(load_image(tmp_path / "g16.png"))
    assert rgb[..., 0].tolist() == [[0, 255], [128, 1]]
    assert (rgb[..., 0] == rgb[..., 2]).all()


def test_greyscale_and_float_modes(tmp_path):
    assert load_image(Image.new("L", (3, 3), 7)).mode == "RGB"
    with pytest.raises(InputError, match="unsupported mode 'F'"):
        load_image(Image.new("F", (3, 3)))


def test_unreadable_and_missing_files(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="cannot read"):
        load_image(tmp_path / "bad.png")
    with pytest.raises(InputError, match="does not exist"):
        load_image(tmp_path / "missing.png")


def test_mask_luminance_and_transparency_means_keep():
    a = np.zeros((2, 2, 4), np.uint8)
    a[..., :3] = 255
    a[0, :, 3] = 255  # opaque white on top row, transparent white below
    m = np.asarray(load_mask(Image.fromarray(a, "RGBA")))
    assert m.tolist() == [[255, 255], [0, 0]]


def test_mask_size_check():
    with pytest.raises(InputError, match="8x8 but the init image is 16x16"):
        check_same_size(Image.new("RGB", (16, 16)), Image.new("L", (8, 8)))


def test_grow_and_blur():
    m = np.zeros((21, 21), np.uint8)
    m[10, 10] = 255
    grown = np.asarray(grow_and_blur(Image.fromarray(m), grow=2))
    assert (grown > 0).sum() == 25
    shrunk = np.asarray(grow_and_blur(Image.fromarray(grown), grow=-2))
    assert (shrunk > 0).sum() == 1
    blurred = np.asarray(grow_and_blur(Image.fromarray(grown), blur=2))
    assert 0 < blurred[10, 15] < 255 and blurred[0, 0] == 0


def test_extend_canvas_edge_fill_and_mask():
    im = Image.fromarray(np.full((8, 8, 3), 100, np.uint8))
    canvas, mask = extend_canvas(im, 8, 0, 0, 16)
    assert canvas.size == (16, 24) and mask.size == (16, 24)
    assert np.asarray(mask)[:8, 8:].max() == 0 and np.asarray(mask)[:, :8].min() == 255
    assert (np.asarray(canvas) == 100).all()


def test_tensor_round_trip_is_exact():
    a = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    back = tensor_to_images(image_to_tensor(Image.fromarray(a)))[0]
    assert np.array_equal(np.asarray(back), a)
