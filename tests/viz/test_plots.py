"""Schedule and toy plots: the curves plotted are the schedule's, and the files are PNGs."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from noisecraft.schedules import DiscreteSchedule
from noisecraft.viz.plots import eight_plot, schedule_curves, schedule_plot, toy_plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_size=(200, 150)):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.width >= min_size[0] and im.height >= min_size[1]


@pytest.mark.parametrize("name", ["scaled_linear", "linear", "cosine"])
def test_schedule_curves_are_alpha_bar_and_log_snr(name):
    s = DiscreteSchedule.from_betas(name)
    alpha_bar, log_snr = schedule_curves(s)
    assert torch.allclose(log_snr, (alpha_bar / (1 - alpha_bar)).log(), rtol=1e-9, atol=1e-9)
    assert (alpha_bar[1:] < alpha_bar[:-1]).all() and (log_snr[1:] < log_snr[:-1]).all()


def test_schedule_plot_writes_png(tmp_path):
    path = schedule_plot(["scaled_linear", "linear", "cosine"], tmp_path / "sub" / "s.png")
    assert path == tmp_path / "sub" / "s.png"
    assert_png(path)


def test_schedule_plot_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="name at least one schedule"):
        schedule_plot([], tmp_path / "s.png")
    with pytest.raises(ValueError, match="unknown beta schedule 'quadratic'"):
        schedule_plot(["quadratic"], tmp_path / "s.png")
    with pytest.raises(ValueError, match="ending in .png"):
        schedule_plot(["linear"], tmp_path / "s.jpg")
    assert not list(tmp_path.iterdir())


def test_toy_plot_and_eight_plot_write_pngs(tmp_path):
    g = torch.Generator().manual_seed(0)
    data, samples = torch.randn(300, 2, generator=g), torch.randn(300, 2, generator=g)
    paths = torch.randn(11, 5, 2, generator=g).cumsum(0)
    assert_png(toy_plot(data, samples, paths, tmp_path / "toy.png", "title"))
    sigmas = torch.linspace(10, 0, 11)
    assert_png(
        eight_plot(8 + 0.1 * samples[:, :1], paths[:, :, :1], sigmas, tmp_path / "eight.png")
    )
    with pytest.raises(ValueError, match="use eight_plot for 1-D"):
        toy_plot(data[:, :1], samples[:, :1], paths[:, :, :1], tmp_path / "x.png")
