"""The checker against rendered images, clean and degraded.

Measured (300 samples, seed 1; blur sigma in pixels at 128, scaled with the size; noise std as
a fraction of 255): at 128 clean, blur 1, or noise 0.1: 100% on every attribute; blur 1.5 +
noise 0.1: colour/position/size ~100%, shape ~92%; blur 2 + noise 0.15: shape ~80%, size 99%.
At 64 clean: shape 99.7%, the rest 100%.
"""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from noisecraft.training.shape_checker import check, score
from noisecraft.training.shapes import ShapesDataset, ShapeSpec, render


def degrade(image, blur, noise, rng):
    size = image.size[0]
    if blur:
        image = image.filter(ImageFilter.GaussianBlur(blur * size / 128))
    a = np.asarray(image, np.float32) + rng.normal(0, noise * 255, (size, size, 3))
    return Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8))


def samples(n, size, seed=1):
    ds = ShapesDataset(n, size, seed=seed)
    return [ds[i] for i in range(n)]


@pytest.fixture(scope="module")
def clean128():
    return samples(300, 128)


def test_clean_renders_are_read_perfectly(clean128):
    result = score([s.image for s in clean128], [s.caption for s in clean128])
    assert result["n"] == 300
    for name in ("color", "shape", "size", "position", "background", "all"):
        assert result[name] == 1.0, (name, result)


@pytest.mark.parametrize("size", [64, 256])
def test_other_sizes(size):
    data = samples(60, size, seed=2)
    result = score([s.image for s in data], [s.caption for s in data])
    assert result["color"] == result["position"] == result["background"] == 1.0
    assert result["shape"] >= 0.95 and result["size"] >= 0.95


@pytest.mark.parametrize(
    "blur, noise, bounds",
    [
        (1.0, 0.0, {"color": 1.0, "shape": 0.97, "size": 0.97, "position": 1.0}),
        (0.0, 0.1, {"color": 1.0, "shape": 0.97, "size": 0.97, "position": 1.0}),
        (1.5, 0.1, {"color": 0.98, "shape": 0.85, "size": 0.95, "position": 1.0}),
        (2.0, 0.15, {"color": 0.97, "shape": 0.7, "size": 0.9, "position": 0.99}),
    ],
)
def test_degraded_renders_stay_above_stated_bounds(clean128, blur, noise, bounds):
    rng = np.random.default_rng(0)
    data = clean128[:150]
    images = [degrade(s.image, blur, noise, rng) for s in data]
    result = score(images, [s.caption for s in data])
    for name, bound in bounds.items():
        assert result[name] >= bound, (name, result)


def test_a_wrong_image_is_scored_wrong():
    image = render(ShapeSpec("blue", "triangle", "large", "bottom right", "white"), 128)
    result = score([image], ["a small red circle at the top left on a black background"])
    assert all(result[n] == 0.0 for n in ("color", "shape", "size", "position", "background"))
    assert result["all"] == 0.0


def test_partial_prompts_score_only_what_they_state():
    image = render(ShapeSpec("blue", "triangle", "large", "bottom right", "white"), 128)
    result = score([image], ["a blue square"])
    assert result["color"] == 1.0 and result["shape"] == 0.0 and result["all"] == 0.0
    assert np.isnan(result["position"])


def test_blank_image_has_no_foreground():
    reading = check(Image.new("RGB", (128, 128), (30, 70, 225)))
    assert reading.shape is None and reading.color is None and reading.background == "blue"


def test_reading_details():
    spec = ShapeSpec("orange", "square", "medium", "left", "purple", dx=0.02, dy=-0.03)
    reading = check(np.asarray(render(spec, 128)))
    assert reading.center == pytest.approx((0.22, 0.47), abs=0.01)
    assert reading.extent == pytest.approx(0.18, abs=0.01)
    assert reading.shape_scores["square"] > 0.95 > reading.shape_scores["circle"]


def test_bad_inputs_say_what_is_allowed():
    with pytest.raises(TypeError, match="PIL.Image or a uint8"):
        check(np.zeros((8, 8)))
    with pytest.raises(ValueError, match="1 images but 2 prompts"):
        score([Image.new("RGB", (64, 64))], ["a", "b"])
