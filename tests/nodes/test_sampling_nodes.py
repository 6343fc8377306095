import pytest
import torch

from noisecraft.models.family import get_family
from noisecraft.nodes.sampling import (
    BasicScheduler,
    DisableNoise,
    ExponentialScheduler,
    KarrasScheduler,
    KSamplerSelect,
    RandomNoise,
    SplitSigmas,
)
from noisecraft.schedules import karras_sigmas, spacing_sigmas


class FakeModel:
    family = get_family("sd1")


def test_basic_scheduler_uses_the_model_family_and_denoise():
    (full,) = BasicScheduler.execute(FakeModel(), "karras", 10, 1.0)
    table = get_family("sd1").schedule()
    assert torch.equal(full, spacing_sigmas("karras", table, 10))
    (part,) = BasicScheduler.execute(FakeModel(), "normal", 10, 0.5)
    assert torch.equal(part, spacing_sigmas("normal", table, 20)[-11:])
    assert BasicScheduler.execute(FakeModel(), "normal", 10, 0.0)[0].numel() == 0
    with pytest.raises(TypeError, match="schedule"):
        BasicScheduler.execute(object(), "normal", 10, 1.0)


def test_karras_exponential_and_split():
    (k,) = KarrasScheduler.execute(5, 14.6, 0.03, 7.0)
    assert torch.equal(k, karras_sigmas(5, 0.03, 14.6, 7.0)) and k[-1] == 0
    (e,) = ExponentialScheduler.execute(4, 10.0, 0.1)
    assert e.shape == (5,) and torch.isclose(e[0], torch.tensor(10.0, dtype=e.dtype))
    high, low = SplitSigmas.execute(k, 2)
    assert torch.equal(high, k[:3]) and torch.equal(low, k[2:])


def test_noise_and_sampler_values():
    latent = {"samples": torch.zeros(3, 4, 2, 2)}
    (noise,) = RandomNoise.execute(7)
    drawn = noise.generate_noise(latent)
    expected = torch.randn((3, 4, 2, 2), generator=torch.Generator().manual_seed(7))
    assert noise.seed == 7 and torch.equal(drawn, expected)
    picked = noise.generate_noise({"samples": torch.zeros(2, 4, 2, 2), "batch_index": [2, 0]})
    assert torch.equal(picked, torch.stack([expected[2], expected[0]]))
    assert DisableNoise.execute()[0].generate_noise(latent).abs().sum() == 0
    assert KSamplerSelect.execute("euler")[0].name == "euler"
