import json

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.training.datasets import (
    DatasetError,
    ImageFolderDataset,
    ImageTransform,
    ShapesTorchDataset,
    find_captioned_images,
    image_to_tensor,
    to_rgb,
)
from noisecraft.training.shape_checker import check
from noisecraft.training.shapes import parse_caption, render, sample_spec


def gradient(w=48, h=32):
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 255, h, dtype=np.float32)[:, None, None]
    a = np.concatenate([np.broadcast_to(x, (h, w, 1)), np.broadcast_to(y, (h, w, 1)),
                        np.full((h, w, 1), 100, np.float32)], axis=2)  # fmt: skip
    return Image.fromarray(a.astype(np.uint8))


def test_sidecar_captions(tmp_path):
    gradient().save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("  a gradient \n")
    (tmp_path / "sub").mkdir()
    gradient(20, 40).save(tmp_path / "sub" / "a.jpg")
    (tmp_path / "sub" / "a.txt").write_text("a tall one")
    ds = ImageFolderDataset(tmp_path, ImageTransform(size=16))
    assert len(ds) == 2
    captions = sorted(ds[i][1] for i in range(2))
    assert captions == ["a gradient", "a tall one"]
    x, _ = ds[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert -1.0 <= x.min() and x.max() <= 1.0


def test_metadata_jsonl_captions(tmp_path):
    (tmp_path / "imgs").mkdir()
    gradient().save(tmp_path / "imgs" / "x.png")
    gradient().save(tmp_path / "y.webp")
    lines = [
        {"file_name": "imgs/x.png", "text": "first"},
        {"file_name": "y.webp", "caption": "2nd"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n"
    (tmp_path / "metadata.jsonl").write_text(text)
    (tmp_path / "y.txt").write_text("ignored: metadata wins")
    ds = ImageFolderDataset(tmp_path, ImageTransform(size=8))
    assert sorted(c for _, c in ds.items) == ["2nd", "first"]


def test_center_crop_keeps_the_middle_and_values_map_to_minus_one_one(tmp_path):
    a = np.zeros((20, 60, 3), np.uint8)
    a[:, 20:40] = 255  # white middle third
    Image.fromarray(a).save(tmp_path / "m.png")
    (tmp_path / "m.txt").write_text("m")
    x, _ = ImageFolderDataset(tmp_path, ImageTransform(size=20))[0]
    assert torch.allclose(x, torch.ones(3, 20, 20), atol=0.02)


def test_random_crop_and_flip_are_seeded(tmp_path):
    gradient(64, 16).save(tmp_path / "g.png")
    (tmp_path / "g.txt").write_text("g")
    t = ImageTransform(size=16, crop="random", flip=True)
    ds = ImageFolderDataset(tmp_path, t, seed=1)
    assert torch.equal(ds[0][0], ImageFolderDataset(tmp_path, t, seed=1)[0][0])
    views = {ds.with_epoch(e)[0][0].numpy().tobytes() for e in range(8)}
    assert len(views) > 2  # epochs draw different crops / flips
    centre = ImageFolderDataset(tmp_path, ImageTransform(size=16))
    assert torch.equal(centre[0][0], centre.with_epoch(5)[0][0])


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda: Image.new("L", (4, 4), 128), (128, 128, 128)),
        (lambda: Image.new("1", (4, 4), 1), (255, 255, 255)),
        (lambda: Image.new("RGBA", (4, 4), (255, 0, 0, 0)), (255, 255, 255)),  # alpha over white
        (lambda: Image.new("RGBA", (4, 4), (0, 0, 0, 255)), (0, 0, 0)),
        (lambda: Image.new("LA", (4, 4), (0, 128)), (127, 127, 127)),
        (lambda: Image.new("CMYK", (4, 4), (0, 255, 255, 0)), (255, 0, 0)),
        (lambda: Image.fromarray(np.full((4, 4), 65535, np.uint16)), (255, 255, 255)),
        (lambda: Image.fromarray(np.full((4, 4), 0.5, np.float32)), (128, 128, 128)),
    ],
)
def test_modes_become_rgb(make, expected):
    image = to_rgb(make())
    assert image.mode == "RGB"
    assert tuple(np.asarray(image)[0, 0]) == pytest.approx(expected, abs=1)


def test_palette_with_transparency_and_16_bit_png_files(tmp_path):
    p = Image.new("P", (4, 4), 1)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.info["transparency"] = 1
    p.save(tmp_path / "p.png", transparency=1)
    Image.fromarray(np.full((4, 4), 30000, np.uint16)).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "p.png") as im:
        assert tuple(np.asarray(to_rgb(im))[0, 0]) == (255, 255, 255)
    with Image.open(tmp_path / "g16.png") as im:
        assert im.mode.startswith("I")
        assert tuple(np.asarray(to_rgb(im))[0, 0]) == (117, 117, 117)  # 30000 / 257


def test_image_to_tensor_range():
    x = image_to_tensor(Image.new("RGB", (2, 2), (0, 255, 51)))
    assert x[:, 0, 0].tolist() == pytest.approx([-1.0, 1.0, -0.6])


# ----------------------------------------------------------------------------- bad data


def test_empty_and_missing_folders(tmp_path):
    with pytest.raises(DatasetError, match="no images in .*metadata.jsonl"):
        ImageFolderDataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nope")


def test_images_without_captions_are_listed(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        gradient().save(tmp_path / name)
    (tmp_path / "b.txt").write_text("b")
    with pytest.raises(DatasetError, match=r"2 image\(s\) .* no caption: a.png, c.png; .*img.txt"):
        find_captioned_images(tmp_path)


def test_corrupt_image_is_named(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "bad.txt").write_text("bad")
    ds = ImageFolderDataset(tmp_path)
    with pytest.raises(DatasetError, match=r"cannot read image .*bad.png"):
        ds[0]
    with pytest.raises(DatasetError, match=r"1 unreadable image\(s\):\n.*bad.png"):
        ds.verify()


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", r"metadata.jsonl line 2 is not JSON"),
        ('{"file_name": "gone.png", "text": "x"}', r"line 2 names 'gone.png', but .* not exist"),
        ('{"file_name": "a.png"}', r'line 2 needs a string "text" \(or "caption"\)'),
        ('["a.png"]', r'line 2 needs a string "file_name"'),
    ],
)
def test_bad_metadata_lines(tmp_path, line, message):
    gradient().save(tmp_path / "a.png")
    first = json.dumps({"file_name": "a.png", "text": "ok"})
    (tmp_path / "metadata.jsonl").write_text(first + "\n" + line + "\n")
    with pytest.raises(DatasetError, match=message):
        ImageFolderDataset(tmp_path)


def test_transform_rejects_unknown_crop():
    with pytest.raises(ValueError, match="choose one of"):
        ImageTransform(crop="top")


# ----------------------------------------------------------------------------- shapes


def test_shapes_dataset_matches_the_renderer_and_batches():
    ds = ShapesTorchDataset(8, size=64, seed=2)
    x, caption = ds[3]
    spec = sample_spec(2, 3)
    assert caption == spec.caption()
    assert torch.equal(x, image_to_tensor(render(spec, 64)))
    images, captions = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert images.shape == (4, 3, 64, 64) and len(captions) == 4


def test_flipped_shapes_keep_their_captions_true():
    ds = ShapesTorchDataset(40, size=128, seed=0, flip=True)
    flipped = 0
    for i in range(40):
        x, caption = ds[i]
        flipped += caption != sample_spec(0, i).caption()
        image = Image.fromarray(((x.permute(1, 2, 0).numpy() + 1) * 127.5).round().astype("uint8"))
        assert check(image).position == parse_caption(caption).position, caption
    assert 5 < flipped < 35


def test_shapes_partial_captions_drop_attributes_deterministically():
    from noisecraft.training.runtime import DataConfig, open_dataset

    full = ShapesTorchDataset(40, 32, seed=5)
    assert [full[i][1] for i in range(40)] == [sample_spec(5, i).caption() for i in range(40)]
    none = ShapesTorchDataset(40, 32, seed=5, partial_captions=1.0)
    for i in range(40):
        spec, text = sample_spec(5, i), none[i][1]
        got = parse_caption(text)
        assert (got.color, got.shape) == (spec.color, spec.shape)
        assert (got.size, got.position, got.background) == (None, None, None), text
    half = open_dataset(DataConfig(shapes_count=200, resolution=32, seed=5, random_flip=False,
                                   shapes_partial_captions=0.5))
    texts = [half[i][1] for i in range(200)]
    assert texts == [half[i][1] for i in range(200)]  # same index, same caption
    omitted = [parse_caption(t).background is None for t in texts]
    assert 60 < sum(omitted) < 140  # about half leave the background out
    assert torch.equal(half[7][0], ShapesTorchDataset(200, 32, seed=5)[7][0])  # images as before
    with pytest.raises(ValueError, match="shapes_partial_captions=1.5 must lie in"):
        DataConfig(shapes_partial_captions=1.5)
    with pytest.raises(ValueError, match="partial_captions=-0.1 must lie in"):
        ShapesTorchDataset(4, 32, partial_captions=-0.1)
