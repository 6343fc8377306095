"""sample() gives the SDE samplers ComfyUI's seeded Brownian-tree noise."""

import torch

from noisecraft.samplers import SAMPLERS, sample
from noisecraft.samplers.noise import BROWNIAN_SAMPLERS, brownian_tree_noise
from noisecraft.schedules import build_sigmas
from tests.analytic import GaussianMixture


def test_sde_samplers_use_seeded_brownian_tree():
    gm = GaussianMixture.default()
    sigmas = build_sigmas(8, spacing="karras")
    x = gm.noisy_sample(16, float(sigmas[0]), torch.Generator().manual_seed(1))
    assert BROWNIAN_SAMPLERS and set(BROWNIAN_SAMPLERS) <= set(SAMPLERS)
    for name in BROWNIAN_SAMPLERS:
        via_api = sample(name, gm.denoise, x, sigmas, generator=torch.Generator().manual_seed(7))
        direct = SAMPLERS[name](gm.denoise, x, sigmas, noise=brownian_tree_noise(x, sigmas, 7))
        torch.testing.assert_close(via_api, direct, rtol=0, atol=0)
        other = sample(name, gm.denoise, x, sigmas, generator=torch.Generator().manual_seed(8))
        assert not torch.equal(via_api, other)
