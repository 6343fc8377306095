"""TAESD: Tiny AutoEncoder for Stable Diffusion (Ollin Boer Bohan, github.com/madebyollin/taesd).

A distilled, GroupNorm- and attention-free VAE (about 1.2 M parameters per half) that works on
the *diffusion* latent directly (the already-scaled latent the sampler produces), which makes it
cheap enough to preview every sampler step. Same spatial factor as the SD VAE (8x).

Key layouts this module reads:

* original release (``taesd_decoder.safetensors``/``.pth``, ``taesdxl_*``): the bare
  ``nn.Sequential`` indices, e.g. ``1.weight`` (decoder: index 0 is the parameter-free clamp),
  ``3.conv.0.weight``, ``3.skip.weight``;
* ComfyUI's combined file: the same under ``taesd_encoder.`` / ``taesd_decoder.``;
* diffusers ``AutoencoderTiny``: ``encoder.layers.{i}.*`` (same indices) and
  ``decoder.layers.{i}.*`` (indices one lower: diffusers clamps in ``forward``).

Our state_dict keys are ``encoder.{i}.*`` / ``decoder.{i}.*`` with the original indices.
Not tested here (CPU only): CUDA and fp16 execution.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "TAESDConfig",
    "TAESD",
    "taesd_state_dict_from_diffusers",
    "taesd_state_dict_to_diffusers",
    "load_taesd_file",
]


@dataclass(frozen=True)
class TAESDConfig:
    """``width`` channels everywhere; ``*_blocks[i]`` residual blocks at resolution level i."""

    latent_channels: int = 4
    width: int = 64
    encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.encoder_blocks) - 1)


def _conv(c_in: int, c_out: int, factory: dict, **kwargs) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, padding=1, **kwargs, **factory)


class Clamp(nn.Module):
    """Soft clamp of the input latent to (-3, 3): 3 * tanh(x / 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class Block(nn.Module):
    """relu(conv-relu-conv-relu-conv(x) + skip(x)), all convs 3x3."""

    def __init__(self, c_in: int, c_out: int, factory: dict):
        super().__init__()
        self.conv = nn.Sequential(
            _conv(c_in, c_out, factory), nn.ReLU(),
            _conv(c_out, c_out, factory), nn.ReLU(),
            _conv(c_out, c_out, factory),
        )  # fmt: skip
        same = c_in == c_out
        self.skip = nn.Identity() if same else nn.Conv2d(c_in, c_out, 1, bias=False, **factory)
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


def build_encoder(cfg: TAESDConfig, factory: dict) -> nn.Sequential:
    """Image in [0, 1] (B, 3, H, W) -> diffusion latent (B, C, H/f, W/f)."""
    w = cfg.width
    layers: list[nn.Module] = [_conv(3, w, factory)]
    for level, n in enumerate(cfg.encoder_blocks):
        if level > 0:
            layers.append(_conv(w, w, factory, stride=2, bias=False))
        layers.extend(Block(w, w, factory) for _ in range(n))
    layers.append(_conv(w, cfg.latent_channels, factory))
    return nn.Sequential(*layers)


def build_decoder(cfg: TAESDConfig, factory: dict) -> nn.Sequential:
    """Diffusion latent (B, C, h, w) -> image in ~[0, 1] (B, 3, h*f, w*f)."""
    w = cfg.width
    layers: list[nn.Module] = [Clamp(), _conv(cfg.latent_channels, w, factory), nn.ReLU()]
    for level, n in enumerate(cfg.decoder_blocks):
        layers.extend(Block(w, w, factory) for _ in range(n))
        if level < len(cfg.decoder_blocks) - 1:
            layers += [nn.Upsample(scale_factor=2), _conv(w, w, factory, bias=False)]
        else:
            layers.append(_conv(w, 3, factory))
    return nn.Sequential(*layers)


class TAESD(nn.Module):
    """Tiny autoencoder on diffusion latents; images in [-1, 1] like ``AutoencoderKL``.

    ``encoder``/``decoder`` may be left out (``with_encoder=False``) when only previews are needed.
    """

    def __init__(
        self,
        config: TAESDConfig = TAESDConfig(),
        *,
        with_encoder: bool = True,
        with_decoder: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.config = config
        factory = {"device": device, "dtype": dtype}
        self.encoder = build_encoder(config, factory) if with_encoder else None
        self.decoder = build_decoder(config, factory) if with_decoder else None

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [-1, 1] -> diffusion latent (B, C, H/8, W/8)."""
        if self.encoder is None:
            raise RuntimeError("this TAESD was built without an encoder (with_encoder=False)")
        return self.encoder(image.add(1).div(2))

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """Diffusion latent (B, C, h, w) -> image (B, 3, 8h, 8w), roughly in [-1, 1]."""
        if self.decoder is None:
            raise RuntimeError("this TAESD was built without a decoder (with_decoder=False)")
        if latent.ndim != 4 or latent.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"TAESD.decode expected (B, {self.config.latent_channels}, h, w), "
                f"got {tuple(latent.shape)}"
            )
        return self.decoder(latent).mul(2).sub(1)

    @torch.no_grad()
    def preview(self, latent: torch.Tensor) -> torch.Tensor:
        """Diffusion latent (B, C, h, w) -> uint8 RGB images (B, 8h, 8w, 3) on CPU."""
        image = self.decode(latent).float().add(1).mul(127.5).round().clamp(0, 255)
        return image.to(torch.uint8).permute(0, 2, 3, 1).cpu()

    @classmethod
    def from_files(
        cls,
        decoder: str | Path | None = None,
        encoder: str | Path | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> TAESD:
        """Load original-release files (``taesd_decoder.safetensors``, ``taesdxl_encoder.pth``).

        ComfyUI (``taesd_decoder.*``) and diffusers (``decoder.layers.*``) key layouts work too.
        """
        if decoder is None and encoder is None:
            raise ValueError("TAESD.from_files needs a decoder and/or an encoder file")
        parts = {}
        for name, path in (("decoder", decoder), ("encoder", encoder)):
            if path is not None:
                parts[name] = _strip(load_taesd_file(path), name, str(path))
        config = _config_from_parts(parts)
        model = cls(
            config, with_encoder="encoder" in parts, with_decoder="decoder" in parts,
            device="meta", dtype=dtype,
        )  # fmt: skip
        sd = {f"{name}.{k}": v for name, part in parts.items() for k, v in part.items()}
        model.load_state_dict(sd, strict=True, assign=True)
        return model.to(device=device, dtype=dtype)


def load_taesd_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Raw tensors of a ``.safetensors`` or ``.pth``/``.pt`` TAESD file (no renaming)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pth", ".pt", ".bin"):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise ValueError(f"TAESD file {path}: expected .safetensors, .pth, .pt or .bin")


def _strip(sd: Mapping[str, torch.Tensor], part: str, where: str) -> dict[str, torch.Tensor]:
    """Bare Sequential keys ("3.conv.0.weight") from any of the known layouts of one half."""
    diffusers_shift = 1 if part == "decoder" else 0  # diffusers has no Clamp module at index 0
    for prefix, shift in ((f"taesd_{part}.", 0), (f"{part}.layers.", diffusers_shift)):
        if any(k.startswith(prefix) for k in sd):
            n = len(prefix)
            sd = {_shift_index(k[n:], shift): v for k, v in sd.items() if k.startswith(prefix)}
            break
    if not sd or not all(re.match(r"\d+\.", k) for k in sd):
        sample = sorted(sd)[:3]
        raise KeyError(
            f"{where}: not a TAESD {part}: expected keys like '1.weight', '3.conv.0.weight' "
            f"(optionally under 'taesd_{part}.' or '{part}.layers.'), got e.g. {sample}"
        )
    return dict(sd)


def _shift_index(key: str, shift: int) -> str:
    index, rest = key.split(".", 1)
    return f"{int(index) + shift}.{rest}"


def _config_from_parts(parts: Mapping[str, Mapping[str, torch.Tensor]]) -> TAESDConfig:
    if "decoder" in parts:
        w, c = parts["decoder"]["1.weight"].shape[:2]
    else:
        enc = parts["encoder"]
        last = max(int(k.split(".")[0]) for k in enc)
        c, w = enc[f"{last}.weight"].shape[:2]
    return TAESDConfig(latent_channels=int(c), width=int(w))


def _convert(sd: Mapping[str, torch.Tensor], to_diffusers: bool) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in sd.items():
        m = (
            re.fullmatch(r"(encoder|decoder)\.(\d+)\.(.+)", key)
            if to_diffusers
            else re.fullmatch(r"(encoder|decoder)\.layers\.(\d+)\.(.+)", key)
        )
        if m is None:
            want = "encoder.N.* / decoder.N.*" if to_diffusers else "{encoder,decoder}.layers.N.*"
            raise KeyError(f"TAESD key {key!r} does not match {want}")
        part, index, rest = m.group(1), int(m.group(2)), m.group(3)
        shift = (-1 if to_diffusers else 1) if part == "decoder" else 0
        layers = ".layers" if to_diffusers else ""
        out[f"{part}{layers}.{index + shift}.{rest}"] = value
    return out


def taesd_state_dict_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (original-index) keys -> diffusers ``AutoencoderTiny`` keys."""
    return _convert(sd, to_diffusers=True)


def taesd_state_dict_from_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers ``AutoencoderTiny`` keys -> our (original-index) keys."""
    return _convert(sd, to_diffusers=False)
