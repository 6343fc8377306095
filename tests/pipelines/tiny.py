"""Tiny random-weight model bundles for pipeline, engine, API and CLI tests.

Every weight is random and non-zero (the U-Net's zero-initialised output layers too), so the
output depends on every input.  The VAE has 4 levels (downscale factor 8, as in SD) at width 32.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import torch

from noisecraft.models.family import FAMILIES, ModelBundle
from noisecraft.models.text import build_text_encoder
from noisecraft.models.text_config import text_configs, tiny
from noisecraft.models.unet import UNetModel
from noisecraft.models.unet_configs import UNET_PRESETS
from noisecraft.models.vae import AutoencoderKL, VAEConfig

TINY_VAE8 = VAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, resolution=64)
_UNETS = {"sd1": "tiny_sd15", "sd2": "tiny_sd2", "sdxl": "tiny_sdxl_base"}


def randomize(module: torch.nn.Module, seed: int, gain: float = 0.5) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * gain / max(1, p[0].numel()) ** 0.5)
    return module


def tiny_bundle(family: str = "sd1", *, inpaint: bool = False, seed: int = 0) -> ModelBundle:
    """A random-weight bundle of ``family`` (sd1, sd2, sdxl) at test size (native 64 px)."""
    fam = replace(FAMILIES[family], native_size=64)
    configs = [tiny(c) for c in text_configs(fam.text)]
    text = randomize(build_text_encoder(fam.text, configs=configs), seed)
    context = sum(c.width for c in configs)
    unet_config = replace(UNET_PRESETS[_UNETS[family]], context_dim=context,
                          in_channels=9 if inpaint else 4)
    if unet_config.adm_in_channels is not None:
        pooled = configs[-1].projection_dim
        unet_config = replace(unet_config, adm_in_channels=pooled + 6 * 256)
    unet = randomize(UNetModel(unet_config), seed + 1)
    vae = randomize(AutoencoderKL(TINY_VAE8), seed + 2, gain=1.0)
    for m in (text, unet, vae):
        m.eval().requires_grad_(False)
    return ModelBundle(fam, unet, vae, text, name=f"tiny-{family}", sha256=f"{seed:064x}")


@cache
def shared_bundle(family: str = "sd1", inpaint: bool = False) -> ModelBundle:
    """One bundle per (family, inpaint) for the whole test session (never mutate it)."""
    return tiny_bundle(family, inpaint=inpaint)


def tiny_engine(*names: str):
    """An Engine with shared bundles registered: "sd1", "sd2", "sdxl", "sd1-inpaint"."""
    from noisecraft.engine import Engine

    engine = Engine(device="cpu")
    for name in names or ("sd1",):
        family, _, kind = name.partition("-")
        engine.register(name, shared_bundle(family, kind == "inpaint"))
    return engine
