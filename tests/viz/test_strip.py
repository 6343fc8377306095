"""The forward-process strip: layout, t=0 keeps the image, t=T-1 is (almost) pure noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.diffusion import q_sample
from noisecraft.schedules import DiscreteSchedule
from noisecraft.viz.strip import (
    GAP,
    LABEL_HEIGHT,
    even_timesteps,
    fit,
    forward_process,
    forward_strip,
    pil_to_tensor,
    strip_tiles,
    tensor_to_pil,
)


def make_image(w: int = 48, h: int = 32) -> Image.Image:
    """A structured image kept away from 0 and 255 so small noise is not clipped away."""
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([40 + 170 * xx / w, 40 + 170 * yy / h, 60 + 120 * ((xx // 8 + yy // 8) % 2)])
    return Image.fromarray(rgb.transpose(1, 2, 0).astype(np.uint8), mode="RGB")


def test_pil_tensor_round_trip_is_exact():
    image = make_image()
    x = pil_to_tensor(image)
    assert x.shape == (1, 3, 32, 48)
    assert -1 <= float(x.min()) and float(x.max()) <= 1
    assert np.array_equal(np.asarray(tensor_to_pil(x[0])), np.asarray(image))


def test_even_timesteps_span_the_schedule():
    assert even_timesteps(8, 1000) == [0, 143, 285, 428, 571, 714, 856, 999]
    with pytest.raises(ValueError, match="at least 2 tiles"):
        even_timesteps(1, 1000)


def test_strip_layout_first_tile_is_input_last_is_noise():
    image = make_image()
    ts = even_timesteps(6, 1000)
    strip = forward_strip(image, "scaled_linear", ts, torch.Generator().manual_seed(0))
    assert strip.size == (6 * 48 + 5 * GAP, 32 + LABEL_HEIGHT)
    tiles = strip_tiles(strip, 6)
    assert len(tiles) == 6 and all(t.size == image.size for t in tiles)
    src = np.asarray(image, dtype=np.float64)
    first = np.asarray(tiles[0], dtype=np.float64)
    last = np.asarray(tiles[-1], dtype=np.float64)
    # t=0: sqrt(alpha_bar_0) = 0.9996 and noise std 0.029 (3.7 grey levels).
    assert np.abs(first - src).mean() < 5
    assert np.corrcoef(first.ravel(), src.ravel())[0, 1] > 0.99
    # t=999: alpha_bar = 0.0047, almost no signal is left.
    assert abs(np.corrcoef(last.ravel(), src.ravel())[0, 1]) < 0.2
    # every caption band holds drawn (dark) text under its tile
    band = np.asarray(strip.convert("L"))[32:]
    for i in range(6):
        assert band[:, i * (48 + GAP) : i * (48 + GAP) + 48].min() < 100


def test_strip_is_deterministic_by_seed():
    image, ts = make_image(), [0, 500, 999]
    a = forward_strip(image, "linear", ts, torch.Generator().manual_seed(3))
    b = forward_strip(image, "linear", ts, torch.Generator().manual_seed(3))
    c = forward_strip(image, "linear", ts, torch.Generator().manual_seed(4))
    assert np.array_equal(np.asarray(a), np.asarray(b))
    assert not np.array_equal(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("name", ["scaled_linear", "linear", "cosine"])
def test_forward_process_moments_match_q(name):
    """x_t | x0 ~ N(sqrt(a_t) x0, (1 - a_t) I): check mean and variance per tile."""
    schedule = DiscreteSchedule.from_betas(name)
    x0 = torch.full((3, 96, 96), 0.6)
    ts = [0, 250, 500, 750, 999]
    xs = forward_process(x0, schedule, ts, torch.Generator().manual_seed(0)).double()
    n = x0.numel()
    for x, t in zip(xs, ts, strict=True):
        a = float(schedule.alphas_cumprod[t])
        assert abs(float(x.mean()) - a**0.5 * 0.6) < 5 * ((1 - a) / n) ** 0.5 + 1e-6
        assert float(x.var()) == pytest.approx(1 - a, rel=6 * (2 / n) ** 0.5, abs=1e-7)
    # last tile of the cosine schedule: pure noise to within its tiny signal
    if name == "cosine":
        assert float(xs[-1].std()) == pytest.approx(1.0, abs=0.03)


def test_q_sample_moments_for_varied_x0():
    """Per-coordinate mean and variance of q_sample over many draws, one timestep per column."""
    ac = DiscreteSchedule.from_betas("scaled_linear").alphas_cumprod
    g = torch.Generator().manual_seed(1)
    x0 = torch.tensor([-1.0, -0.3, 0.4, 1.0], dtype=torch.float64)
    t = torch.tensor([0, 300, 600, 999])
    draws = 40000
    noise = torch.randn(draws, 4, generator=g, dtype=torch.float64)
    # a [B, 4] batch whose row b is coordinate b of x0 at timestep t[b]: x0 as [4, 1] per draw
    xt = q_sample(x0[:, None].expand(4, draws), noise.T.contiguous(), t, ac)  # [4, draws]
    a = ac[t]
    assert ((xt.mean(1) - a.sqrt() * x0).abs() < 5 * ((1 - a) / draws).sqrt()).all()
    assert torch.allclose(xt.var(1), 1 - a, rtol=6 * (2 / draws) ** 0.5)


def test_fit_only_shrinks():
    big = Image.new("RGB", (1000, 500))
    assert fit(big, 256).size == (256, 128)
    small = make_image()
    assert fit(small, 256) is small
    with pytest.raises(ValueError, match="max_side"):
        fit(small, 2)


def test_forward_process_rejects_bad_input():
    with pytest.raises(ValueError, match=r"one image \[C, H, W\]"):
        forward_process(torch.zeros(2, 3, 4, 4), "linear", [0])
    with pytest.raises(ValueError, match="ts is empty"):
        forward_process(torch.zeros(3, 4, 4), "linear", [])
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        forward_process(torch.zeros(3, 4, 4), "linear", [1000])
