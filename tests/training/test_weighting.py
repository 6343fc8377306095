"""Foreground loss weights: which pixels count more, pooled to the latent grid, and the
diffusion trainer's loss weighted by them."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from noisecraft.schedules import DiscreteSchedule
from noisecraft.training.trainer import ObjectiveConfig, diffusion_loss, train
from noisecraft.training.weighting import foreground_weights
from tests.training.test_trainer import quiet, tiny_config


def _square_image() -> torch.Tensor:
    """One 16 x 16 image: blue background, a red 4 x 4 square at rows/cols 4..7."""
    x = torch.empty(1, 3, 16, 16)
    x[:, :] = torch.tensor([-0.8, -0.6, 0.8])[:, None, None]
    x[:, :, 4:8, 4:8] = torch.tensor([0.6, -0.9, -0.9])[:, None, None]
    return x


def test_pixels_away_from_the_median_colour_weigh_one_plus_weight():
    w = foreground_weights(_square_image(), 4.0)
    assert w.shape == (1, 1, 16, 16)
    assert torch.all(w[0, 0, 4:8, 4:8] == 5.0)
    assert w.sum().item() == 16 * 16 + 16 * 4.0  # the rest is exactly 1
    assert foreground_weights(_square_image(), 0.0) == 1.0


def test_weights_pool_to_the_latent_grid_by_area():
    w = foreground_weights(_square_image(), 4.0, size=(4, 4))
    assert w.shape == (1, 1, 4, 4)
    assert w[0, 0, 1, 1].item() == 5.0  # the 4x4 cell the square fills
    torch.testing.assert_close(w.mean(), foreground_weights(_square_image(), 4.0).mean())
    # a square straddling four cells gives each a quarter of it
    x = torch.roll(_square_image(), shifts=(2, 2), dims=(2, 3))
    w = foreground_weights(x, 4.0, size=(4, 4))
    torch.testing.assert_close(w[0, 0, 1:3, 1:3], torch.full((2, 2), 2.0))


def test_diffusion_loss_multiplies_the_squared_error_by_the_weights():
    model = lambda x, t, ids: x * 0.5  # noqa: E731 - any fixed network
    x0 = torch.randn(8, 4, 4, 4)
    ids = torch.zeros(8, 77, dtype=torch.long)
    schedule = DiscreteSchedule.from_betas()
    w = torch.ones(8, 1, 4, 4)
    w[:, :, :2] = 3.0
    objective = ObjectiveConfig(prediction="v")

    def parts(weights):
        return diffusion_loss(model, x0, ids, objective, schedule,
                              torch.Generator().manual_seed(1), weights)[1]

    top = parts(torch.cat([torch.ones(8, 1, 2, 4), torch.zeros(8, 1, 2, 4)], dim=2))
    bottom = parts(torch.cat([torch.zeros(8, 1, 2, 4), torch.ones(8, 1, 2, 4)], dim=2))
    torch.testing.assert_close(parts(1.0), top + bottom)
    torch.testing.assert_close(parts(w), 3 * top + bottom)


def test_negative_weights_are_refused():
    with pytest.raises(ValueError, match="foreground_weight=-1 must be >= 0"):
        ObjectiveConfig(foreground_weight=-1)


def test_training_with_foreground_weight_changes_the_loss_and_is_recorded(tmp_path):
    """Same seed, same data: the weighted run's first loss is larger (the shapes' cells count
    more), and the run's config records the setting."""
    base = tiny_config(tmp_path / "plain", steps=1, latent=True)
    plain = train(base, progress=quiet)
    weighted_cfg = replace(base, objective=replace(base.objective, foreground_weight=8.0),
                           run=replace(base.run, out_dir=tmp_path / "fg"))
    weighted = train(weighted_cfg, progress=quiet)
    assert weighted.losses[0] > 1.05 * plain.losses[0], (plain.losses, weighted.losses)
    assert '"foreground_weight": 8.0' in (tmp_path / "fg/config.json").read_text()
