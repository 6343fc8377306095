"""Tiny random-weight models shared by the backend tests."""

from __future__ import annotations

import torch

from noisecraft.models.unet import UNetModel
from noisecraft.models.unet_configs import unet_preset
from noisecraft.models.vae import TINY_VAE, AutoencoderKL


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every layer re-initialised with PyTorch's default init (the U-Net's zero-initialised
    output layers included, so its output is not trivially zero), in eval mode."""
    torch.manual_seed(seed)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()
    return module.eval()


def tiny_unet(seed: int = 0) -> UNetModel:
    return randomized(UNetModel(unet_preset("tiny_sd15")), seed)


def unet_inputs(batch: int = 2, size: int = 16, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ctx_dim = unet_preset("tiny_sd15").context_dim
    return (torch.randn(batch, 4, size, size, generator=g),
            torch.tensor([981.0, 20.5][:batch]),
            torch.randn(batch, 77, ctx_dim, generator=g))


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    return randomized(AutoencoderKL(TINY_VAE), seed)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()
