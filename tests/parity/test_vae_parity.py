"""Parity: noisecraft AutoencoderKL / TAESD vs diffusers AutoencoderKL / AutoencoderTiny.

Identical random weights go through our key mappings; fp32 outputs must agree to 1e-4.
"""

import time

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from noisecraft.checkpoints.vae_keys import (  # noqa: E402
    vae_config_from_state_dict,
    vae_config_to_diffusers,
    vae_state_dict_from_diffusers,
    vae_state_dict_to_diffusers,
)
from noisecraft.models.taesd import (  # noqa: E402
    TAESD,
    TAESDConfig,
    taesd_state_dict_from_diffusers,
    taesd_state_dict_to_diffusers,
)
from noisecraft.models.vae import SD_VAE, TINY_VAE, AutoencoderKL, VAEConfig  # noqa: E402

TOL = 1e-4


def _randomize(module: torch.nn.Module, seed: int, scale: float = 0.1) -> None:
    """Random weights everywhere, norms included (default init would hide swapped norm keys)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif p.ndim == 4:  # conv: keep activations O(1) whatever the width
                p.copy_(noise * (scale * 3.0 / (p.shape[1] * p.shape[2] * p.shape[3]) ** 0.5))
            else:
                p.copy_(noise * scale)


def _pair(config: VAEConfig, seed: int = 0):
    ref = diffusers.AutoencoderKL(**vae_config_to_diffusers(config)).eval()
    _randomize(ref, seed)
    ours = AutoencoderKL(config, device="meta")
    ours.load_state_dict(vae_state_dict_from_diffusers(ref.state_dict()), strict=True, assign=True)
    return ref, ours.eval()


@pytest.mark.parametrize(
    "config",
    [
        TINY_VAE,
        VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, resolution=64),  # 3 levels, f=4
    ],
    ids=["tiny", "three-level"],
)
def test_autoencoder_kl_matches_diffusers(config):
    ref, ours = _pair(config)
    f = config.downscale_factor
    x = torch.rand(2, 3, 8 * f, 6 * f, generator=torch.Generator().manual_seed(1)) * 2 - 1
    z = torch.randn(2, config.z_channels, 8, 6, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        post_ref = ref.encode(x).latent_dist
        post = ours.encode(x)
        img_ref = ref.decode(z).sample
        img = ours.decode(z)
    assert post.mean.shape == (2, config.embed_dim, 8, 6)
    assert (post.mean - post_ref.mean).abs().max() <= TOL
    assert (post.logvar - post_ref.logvar).abs().max() <= TOL
    assert img.shape == img_ref.shape == (2, 3, 8 * f, 6 * f)
    assert img_ref.std() > 0.05  # outputs are not trivially zero
    assert (img - img_ref).abs().max() <= TOL


def test_key_mapping_round_trip_and_config_detection():
    ref, ours = _pair(TINY_VAE)
    diff_sd = ref.state_dict()
    ldm_sd = vae_state_dict_from_diffusers(diff_sd)
    assert set(ldm_sd) == set(ours.state_dict())
    back = vae_state_dict_to_diffusers(ldm_sd)
    assert set(back) == set(diff_sd)
    for key, value in diff_sd.items():
        assert back[key].shape == value.shape, key
        assert torch.equal(back[key], value), key
    assert vae_config_from_state_dict(ldm_sd, resolution=32) == TINY_VAE
    assert vae_config_from_state_dict(diff_sd, resolution=32) == TINY_VAE


def test_taesd_matches_autoencoder_tiny():
    cfg = TAESDConfig(latent_channels=4, width=16)
    ref = diffusers.AutoencoderTiny(
        encoder_block_out_channels=(cfg.width,) * 4,
        decoder_block_out_channels=(cfg.width,) * 4,
        latent_channels=cfg.latent_channels,
        num_encoder_blocks=cfg.encoder_blocks,
        num_decoder_blocks=cfg.decoder_blocks,
    ).eval()
    _randomize(ref, seed=3, scale=0.3)
    ours = TAESD(cfg, device="meta")
    sd = taesd_state_dict_from_diffusers(ref.state_dict())
    ours.load_state_dict(sd, strict=True, assign=True)
    assert set(taesd_state_dict_to_diffusers(sd)) == set(ref.state_dict())
    x = torch.rand(1, 3, 64, 48, generator=torch.Generator().manual_seed(4)) * 2 - 1
    z = torch.randn(1, 4, 8, 6, generator=torch.Generator().manual_seed(5)) * 2
    with torch.no_grad():
        lat_ref, lat = ref.encode(x).latents, ours.encode(x)
        img_ref, img = ref.decode(z).sample, ours.decode(z)
    assert lat.shape == (1, 4, 8, 6) and img.shape == (1, 3, 64, 48)
    assert img_ref.std() > 0.01
    assert (lat - lat_ref).abs().max() <= TOL
    assert (img - img_ref).abs().max() <= TOL


@pytest.mark.slow
def test_full_sd_vae_decode_64_to_512_matches_diffusers(capsys):
    ref, ours = _pair(SD_VAE, seed=7)
    z = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(8))
    with torch.inference_mode():
        t0 = time.perf_counter()
        img_ref = ref.decode(z).sample
        t1 = time.perf_counter()
        img = ours.decode(z)
        t2 = time.perf_counter()
    err = (img - img_ref).abs().max().item()
    with capsys.disabled():
        print(f"\nfull SD VAE 64->512 decode: max|ours-diffusers|={err:.3g}, "
              f"diffusers {t1 - t0:.1f}s, ours {t2 - t1:.1f}s")  # fmt: skip
    assert img.shape == (1, 3, 512, 512)
    assert err <= TOL
