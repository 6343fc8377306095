"""What the benchmark measures: models with identical random weights, inputs, and one call each.

Weights are made once per run by :func:`make_weights` (PyTorch default init everywhere, the
U-Net's zero-initialised output layers included, seeded) and saved as safetensors; every
contender process loads the same file - noisecraft modules directly, diffusers modules through
the key maps in ``noisecraft.checkpoints`` - so all contenders compute with identical numbers
and each process's peak RSS holds exactly one copy of the weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from noisecraft.models.text import CLIPTextEncoder
from noisecraft.models.text_config import CLIP_L
from noisecraft.models.unet import UNetModel
from noisecraft.models.unet_configs import unet_preset
from noisecraft.models.vae import SD_VAE, AutoencoderKL

SEED = 0
PROMPTS = ["a watercolor painting of a lighthouse at dusk", ""]
SDXL_TIME_IDS = (1024, 1024, 0, 0, 1024, 1024)  # original size, crop, target size
MODELS = {"sd15_unet", "sdxl_unet", "sd_vae", "clip_l"}


@dataclass(frozen=True)
class Sizes:
    """Workload sizes: U-Net latent side and batch, VAE latent side, txt2img steps."""

    latent: int = 64
    batch: int = 2
    sdxl_latent: int = 128
    steps: int = 20
    cfg: float = 7.5


def _build(model: str, device=None) -> nn.Module:
    if model == "sd15_unet":
        return UNetModel(unet_preset("sd15"), device=device)
    if model == "sdxl_unet":
        return UNetModel(unet_preset("sdxl_base"), device=device)
    if model == "sd_vae":
        return AutoencoderKL(SD_VAE, device=device)
    if model == "clip_l":
        return CLIPTextEncoder(CLIP_L, device=device)
    raise ValueError(f"unknown model {model!r}; known: {sorted(MODELS)}")


def make_weights(model: str, path: Path) -> None:
    """Random weights of ``model`` (seeded PyTorch default init of every layer) to ``path``."""
    torch.manual_seed(SEED)
    module = _build(model)
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path))


def load_ours(model: str, path: Path) -> nn.Module:
    module = _build(model, device="meta")
    module.load_state_dict(load_file(str(path)), assign=True)
    return module.eval()


def load_diffusers(model: str, path: Path) -> nn.Module:
    """The diffusers module of the same architecture with the same weights."""
    if model in ("sd15_unet", "sdxl_unet"):
        from diffusers import UNet2DConditionModel

        from noisecraft.checkpoints.unet_keys import (
            unet_config_to_diffusers,
            unet_state_dict_to_diffusers,
        )

        cfg = unet_preset("sd15" if model == "sd15_unet" else "sdxl_base")
        with torch.device("meta"):
            module = UNet2DConditionModel(**unet_config_to_diffusers(cfg))
        sd = unet_state_dict_to_diffusers(load_file(str(path)), cfg)
    elif model == "sd_vae":
        from diffusers import AutoencoderKL as DiffusersVAE

        from noisecraft.checkpoints.vae_keys import (
            vae_config_to_diffusers,
            vae_state_dict_to_diffusers,
        )

        with torch.device("meta"):
            module = DiffusersVAE(**vae_config_to_diffusers(SD_VAE))
        sd = vae_state_dict_to_diffusers(load_file(str(path)))
    else:
        raise ValueError(f"no diffusers counterpart for {model!r}")
    module.load_state_dict(sd, assign=True, strict=True)
    return module.eval()


# --- the calls ----------------------------------------------------------------------------


class DiffusersUNetCall(nn.Module):
    """diffusers' U-Net with our signature ``(x, timesteps, context, y=None)``."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, timesteps, context=None, y=None):
        added = None
        if y is not None:  # SDXL: y = [pooled, emb(SDXL_TIME_IDS)] as built by unet_inputs
            ids = torch.tensor(SDXL_TIME_IDS, dtype=torch.float32).expand(y.shape[0], 6)
            added = {"text_embeds": y[:, :1280], "time_ids": ids}
        return self.unet(x, timesteps, encoder_hidden_states=context,
                         added_cond_kwargs=added).sample


class DiffusersVAEDecode(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, z):
        return self.vae.decode(z).sample


class DiffusersVAEEncode(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x):
        dist = self.vae.encode(x).latent_dist
        return torch.cat([dist.mean, dist.logvar], dim=1)


class TextHidden(nn.Module):
    """A CLIP text encoder as ``ids [B, 77] -> hidden [B, 77, C]`` (one output)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, ids):
        return self.encoder(ids)[0]


def unet_inputs(sizes: Sizes, sdxl: bool = False) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(SEED + 1)
    side = sizes.sdxl_latent if sdxl else sizes.latent
    x = torch.randn(sizes.batch, 4, side, side, generator=g)
    t = torch.full((sizes.batch,), 500.0)
    ctx = torch.randn(sizes.batch, 77, 2048 if sdxl else 768, generator=g)
    if not sdxl:
        return x, t, ctx
    from noisecraft.models.unet import sdxl_vector

    pooled = torch.randn(sizes.batch, 1280, generator=g)
    return x, t, ctx, sdxl_vector(pooled, SDXL_TIME_IDS[:2], SDXL_TIME_IDS[2:4], SDXL_TIME_IDS[4:])


def latent_input(sizes: Sizes) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 2)
    return torch.randn(1, 4, sizes.latent, sizes.latent, generator=g)


def image_input(sizes: Sizes) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED + 3)
    side = sizes.latent * 8
    return torch.rand(1, 3, side, side, generator=g) * 2 - 1


def token_ids(encoder: CLIPTextEncoder) -> torch.Tensor:
    ids = [encoder.tokenizer.encode(p) for p in PROMPTS]
    return torch.tensor([chunk_ids(i) for i in ids])


def chunk_ids(ids: list[int], length: int = 77) -> list[int]:
    from noisecraft.models.tokenizer import BOS_ID, EOS_ID

    ids = [BOS_ID, *ids[: length - 2], EOS_ID]
    return ids + [EOS_ID] * (length - len(ids))



if __name__ == "__main__":  # python benchmarks/workloads.py <model> <path>: make weights
    import sys

    make_weights(sys.argv[1], Path(sys.argv[2]))
