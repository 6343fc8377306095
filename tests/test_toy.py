"""The toy diffusion model: data sets, training through the Denoiser contract, sampling."""

from __future__ import annotations

import pytest
import torch

from noisecraft.diffusion import Denoiser
from noisecraft.toy import (
    DATASETS,
    ToyConfig,
    make_data,
    mean_nn_distance,
    sample_toy,
    timestep_embedding,
    train_toy,
)

# a few hundred steps of this train in seconds
FAST = ToyConfig(hidden=64, lr=5e-3, batch_size=256)


@pytest.fixture(scope="module")
def eight():
    return train_toy("eight", 500, seed=0, config=FAST)


@pytest.fixture(scope="module")
def moons():
    return train_toy("moons", 400, seed=0, config=FAST)


@pytest.mark.parametrize("name, dim", [("spiral", 2), ("moons", 2), ("eight", 1)])
def test_data_sets_shape_scale_and_seed(name, dim):
    a = make_data(name, 500, torch.Generator().manual_seed(0))
    b = make_data(name, 500, torch.Generator().manual_seed(0))
    assert a.shape == (500, dim) and torch.equal(a, b)
    assert 0.3 < float(a.abs().max()) <= 8.0
    if name != "eight":
        c = make_data(name, 500, torch.Generator().manual_seed(1))
        assert not torch.equal(a, c)


def test_unknown_data_set_lists_the_choices():
    with pytest.raises(ValueError, match="choose one of: spiral, moons, eight"):
        make_data("circles", 10, torch.Generator())
    assert DATASETS == ("spiral", "moons", "eight")


def test_timestep_embedding_is_bounded_and_distinguishes_t():
    e = timestep_embedding(torch.tensor([0.0, 1.0, 500.0, 999.0]), 32)
    assert e.shape == (4, 32) and float(e.abs().max()) <= 1.0
    assert torch.cdist(e, e)[~torch.eye(4, dtype=torch.bool)].min() > 0.1


def test_training_is_deterministic_by_seed_and_restores_threads():
    threads = torch.get_num_threads()
    a = train_toy("moons", 15, seed=5, config=FAST)
    b = train_toy("moons", 15, seed=5, config=FAST)
    c = train_toy("moons", 15, seed=6, config=FAST)
    assert a.losses == b.losses and a.losses != c.losses
    for pa, pb in zip(a.net.parameters(), b.net.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.get_num_threads() == threads


def test_training_rejects_bad_steps():
    with pytest.raises(ValueError, match="training steps"):
        train_toy("moons", 0)


def test_model_is_an_eps_denoiser_and_loss_falls(eight):
    d = eight.denoiser
    assert isinstance(d, Denoiser) and d.prediction == "eps"
    assert sum(eight.losses[-50:]) < 0.5 * sum(eight.losses[:50])
    # the contract: at a tiny sigma the x0 estimate of a clean 8 is 8
    x0 = d(torch.full((4, 1), 8.0), torch.full((4,), 0.02))
    assert torch.allclose(x0, torch.full((4, 1), 8.0), atol=0.05)


def test_eight_samples_concentrate_at_eight(eight):
    s = sample_toy(eight, 500, "euler", 30, seed=0)
    # initial noise (variance-preserving scale) is N(0, 1): mean 0, std 1
    assert abs(float(s.path[0].mean())) < 0.2 and 0.9 < float(s.path[0].std()) < 1.1
    assert abs(float(s.x.mean()) - 8.0) < 0.1
    assert float(s.x.std()) < 0.4


def test_moons_samples_lie_near_the_data(moons):
    s = sample_toy(moons, 500, "euler", 30, seed=0)
    start = mean_nn_distance(s.path[0], moons.data)
    end = mean_nn_distance(s.x, moons.data)
    assert end < 0.2 and end < 0.5 * start


def test_sample_paths_and_determinism(eight):
    s = sample_toy(eight, 64, "euler", 12, seed=3)
    assert s.path.shape == (13, 64, 1) and s.sigmas.shape == (13,)
    assert float(s.sigmas[-1]) == 0.0
    assert torch.equal(s.path[-1], s.x)  # at sigma 0 the VP scale is 1
    again = sample_toy(eight, 64, "euler", 12, seed=3)
    other = sample_toy(eight, 64, "euler", 12, seed=4)
    assert torch.equal(s.x, again.x) and not torch.equal(s.path[0], other.path[0])


def test_sample_rejects_unknown_sampler(eight):
    with pytest.raises(ValueError, match="unknown sampler 'nope'; choose one of: .*euler"):
        sample_toy(eight, 8, "nope", 5)
