"""generate_image(): the Python entry point."""

from __future__ import annotations

import json

import numpy as np
import pytest

from noisecraft import generate_image
from noisecraft.engine import DEFAULT_MODEL_PATH, DefaultModelMissing
from noisecraft.request import InputError
from tests.pipelines.tiny import tiny_engine


@pytest.fixture(scope="module")
def engine():
    return tiny_engine("sd1")


def test_returns_one_image_with_seed_and_metadata(engine):
    image = generate_image("a (red:1.2) circle", model="sd1", steps=2, seed=11, engine=engine)
    assert image.size == (64, 64) and image.mode == "RGB"
    assert image.info["seed"] == 11
    assert "Seed: 11" in image.info["parameters"]
    settings = json.loads(image.info["noisecraft"])
    assert settings["prompt"] == "a (red:1.2) circle" and settings["steps"] == 2


def test_batch_returns_a_list_with_consecutive_seeds(engine):
    images = generate_image("x", model="sd1", steps=2, seed=5, batch_size=2, engine=engine)
    assert isinstance(images, list) and [im.info["seed"] for im in images] == [5, 6]
    assert not np.array_equal(np.asarray(images[0]), np.asarray(images[1]))


def test_random_seed_is_reported(engine):
    image = generate_image("x", model="sd1", steps=2, engine=engine)
    again = generate_image("x", model="sd1", steps=2, seed=image.info["seed"], engine=engine)
    assert np.array_equal(np.asarray(image), np.asarray(again))


def test_bad_size_names_the_nearest_valid_sizes(engine):
    with pytest.raises(InputError, match="width=100 is not a multiple of 8; nearest valid "
                                         "sizes: 96 or 104"):
        generate_image("x", model="sd1", width=100, engine=engine)


@pytest.mark.skipif(DEFAULT_MODEL_PATH.exists(), reason="the default model has been shipped")
def test_default_model_missing_is_said_plainly():
    with pytest.raises(DefaultModelMissing, match="default model"):
        generate_image("x")
