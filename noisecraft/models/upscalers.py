"""Image upscaler architectures: ESRGAN's RRDBNet (Wang et al. 2018, "ESRGAN: Enhanced
Super-Resolution Generative Adversarial Networks"; Real-ESRGAN, Wang et al. 2021) and
Real-ESRGAN's SRVGGNetCompact, built to fit the shapes of a state dict.

Why these are written here instead of taken from ``spandrel`` (the architecture library ComfyUI
uses): spandrel requires torchvision, and PyPI's torchvision cannot be installed beside this CPU
build of torch (its only compatible build is a multi-GB CUDA torch).  The two families below
cover most upscaler files in the wild (ESRGAN community models, Real-ESRGAN x4plus / x2plus /
anime, realesr-general / animevideo compact); anything else is refused with a message.

Key layouts read (module names follow the ESRGAN repository's ``RRDBNet_arch.py``; the
:data:`RRDB_LAYOUTS` table renames the other layouts to it, in this one place):

* ``esrgan``: ``conv_first``, ``RRDB_trunk.N.RDB1.conv1``, ``trunk_conv``, ``upconv1/2``,
  ``HRconv``, ``conv_last`` (ESRGAN repository, RRDB_ESRGAN_x4.pth);
* ``sequential``: BasicSR's first ``nn.Sequential`` network, used by most community ESRGAN
  models (4x-UltraSharp, Remacri, ...): ``model.0``, ``model.1.sub.N.RDB1.conv1.0``,
  ``model.1.sub.<nb>`` (trunk conv), ``model.3`` / ``model.6`` (upconvs), then HR conv and last
  conv.  (spandrel calls this layout "old arch" and the ``esrgan`` one "new arch".)
* ``realesrgan``: BasicSR's later ``RRDBNet``: ``conv_first``, ``body.N.rdb1.conv1``,
  ``conv_body``, ``conv_up1/2``, ``conv_hr``, ``conv_last``; files often nest it under
  ``params_ema``.  Real-ESRGAN x2 (x1) runs its x4 network on a ``pixel_unshuffle``-d input:
  ``conv_first`` then takes 4x (16x) the image channels.
* ``compact``: SRVGGNetCompact ``body.N`` (conv, PReLU, conv, PReLU, ..., conv), then
  ``pixel_shuffle``, plus the nearest-upsampled input.

Scale, block count, width, growth channels and in/out channels are read from shapes.
Models map images [B, C, h, w] in [0, 1] (RGB) to [B, C', s*h, s*w]; ``.scale`` is s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

SUPPORTED = (
    "ESRGAN RRDBNet (conv_first/RRDB_trunk keys, or model.N sequential keys), Real-ESRGAN "
    "RRDBNet (conv_first/body.N.rdb1 keys, incl. the x2/x1 pixel-unshuffle variants), "
    "Real-ESRGAN SRVGGNetCompact (body.N keys with PReLU)"
)


class UnknownUpscaler(ValueError):
    """A state dict that is none of the supported upscaler layouts."""


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3x3 convs (``conv1..conv5``); ``x + 0.2 * conv5(...)``."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        for i in range(4):
            setattr(self, f"conv{i + 1}", nn.Conv2d(nf + i * gc, gc, 3, 1, 1))
        self.conv5 = nn.Conv2d(nf + 4 * gc, nf, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for i in range(1, 5):
            conv = getattr(self, f"conv{i}")
            feats.append(F.leaky_relu(conv(torch.cat(feats, 1)), 0.2))
        return x + 0.2 * self.conv5(torch.cat(feats, 1))


class RRDB(nn.Module):
    """Residual-in-residual dense block: three RDBs, ``x + 0.2 * RDB3(RDB2(RDB1(x)))``."""

    def __init__(self, nf: int, gc: int) -> None:
        super().__init__()
        self.RDB1 = ResidualDenseBlock(nf, gc)
        self.RDB2 = ResidualDenseBlock(nf, gc)
        self.RDB3 = ResidualDenseBlock(nf, gc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 0.2 * self.RDB3(self.RDB2(self.RDB1(x)))


class RRDBNet(nn.Module):
    """ESRGAN's generator.  ``in_nc`` counts the channels ``conv_first`` sees (image channels
    times ``unshuffle**2``); the network upsamples ``2**num_up`` times, so the image scale is
    ``2**num_up / unshuffle``."""

    def __init__(self, *, in_nc: int, out_nc: int, nf: int, nb: int, gc: int, num_up: int,
                 unshuffle: int = 1) -> None:
        super().__init__()
        self.unshuffle = unshuffle
        self.num_up = num_up
        self.scale = 2**num_up // unshuffle
        self.conv_first = nn.Conv2d(in_nc, nf, 3, 1, 1)
        self.RRDB_trunk = nn.Sequential(*[RRDB(nf, gc) for _ in range(nb)])
        self.trunk_conv = nn.Conv2d(nf, nf, 3, 1, 1)
        for i in range(num_up):
            setattr(self, f"upconv{i + 1}", nn.Conv2d(nf, nf, 3, 1, 1))
        self.HRconv = nn.Conv2d(nf, nf, 3, 1, 1)
        self.conv_last = nn.Conv2d(nf, out_nc, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        u = self.unshuffle
        if u > 1:  # Real-ESRGAN pads to a multiple of the factor, then crops the output
            x = F.pad(x, (0, -w % u, 0, -h % u), mode="reflect")
            x = F.pixel_unshuffle(x, u)
        fea = self.conv_first(x)
        fea = fea + self.trunk_conv(self.RRDB_trunk(fea))
        for i in range(self.num_up):
            up = getattr(self, f"upconv{i + 1}")
            fea = F.leaky_relu(up(F.interpolate(fea, scale_factor=2, mode="nearest")), 0.2)
        out = self.conv_last(F.leaky_relu(self.HRconv(fea), 0.2))
        return out[..., : h * self.scale, : w * self.scale]


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact network: ``body`` = conv, PReLU, (conv, PReLU) x ``num_conv``,
    conv to ``out_nc * scale**2``; then ``pixel_shuffle`` plus the nearest-upsampled input."""

    def __init__(self, *, in_nc: int, out_nc: int, nf: int, num_conv: int, scale: int) -> None:
        super().__init__()
        self.scale = scale
        layers: list[nn.Module] = [nn.Conv2d(in_nc, nf, 3, 1, 1), nn.PReLU(nf)]
        for _ in range(num_conv):
            layers += [nn.Conv2d(nf, nf, 3, 1, 1), nn.PReLU(nf)]
        layers.append(nn.Conv2d(nf, out_nc * scale * scale, 3, 1, 1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.pixel_shuffle(self.body(x), self.scale)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


# ---- key layouts: one declarative table of renames to the module names above ---------------

Rules = tuple[tuple[str, str], ...]


def _sequential_rules(last: int) -> Rules:
    """``model.N`` names -> module names.  The Sequential is conv_first (0), the shortcut trunk
    (1), then per upsampling (Upsample, conv, LeakyReLU), then HR conv, LeakyReLU, last conv:
    upconvs at 3, 6, ..., HR conv at ``last - 2``, last conv at ``last``."""
    ups = tuple((rf"^model\.{3 * (i + 1)}\.", f"upconv{i + 1}.") for i in range((last - 4) // 3))
    return (
        (r"^model\.0\.", "conv_first."),
        (r"^model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.", r"RRDB_trunk.\1.RDB\2.conv\3."),
        (r"^model\.1\.sub\.\d+\.", "trunk_conv."),
        *ups,
        (rf"^model\.{last - 2}\.", "HRconv."),
        (rf"^model\.{last}\.", "conv_last."),
    )


RRDB_LAYOUTS: dict[str, tuple[str, Rules | None]] = {
    # layout: (key that identifies it, renames; None = computed from the file by
    # _sequential_rules)
    "esrgan": ("RRDB_trunk.0.RDB1.conv1.weight", ()),
    "realesrgan": ("body.0.rdb1.conv1.weight", (
        (r"^body\.(\d+)\.rdb(\d)\.", r"RRDB_trunk.\1.RDB\2."),
        (r"^conv_body\.", "trunk_conv."),
        (r"^conv_up(\d)\.", r"upconv\1."),
        (r"^conv_hr\.", "HRconv."),
    )),
    "sequential": ("model.1.sub.0.RDB1.conv1.0.weight", None),
}


def rename(sd: Mapping[str, torch.Tensor], rules: Rules) -> dict[str, torch.Tensor]:
    """``sd`` with each key renamed by the first rule whose pattern matches it."""
    out = {}
    for key, value in sd.items():
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                key = new
                break
        out[key] = value
    return out


def detect_layout(sd: Mapping[str, torch.Tensor]) -> str:
    """``esrgan``, ``realesrgan``, ``sequential`` or ``compact``; UnknownUpscaler otherwise."""
    for layout, (marker, _) in RRDB_LAYOUTS.items():
        if marker in sd:
            return layout
    body0, body1 = sd.get("body.0.weight"), sd.get("body.1.weight")
    if body0 is not None and body0.ndim == 4 and body1 is not None and body1.ndim == 1:
        return "compact"
    raise UnknownUpscaler(f"not a supported upscaler layout; supported: {SUPPORTED}")


def _indices(keys, pattern: str) -> list[int]:
    found = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return sorted(found)


def _rrdbnet(sd: Mapping[str, torch.Tensor]) -> RRDBNet:
    """An RRDBNet sized from an ``esrgan``-named state dict."""
    first, last = sd["conv_first.weight"], sd["conv_last.weight"]
    in_nc, out_nc, nf = first.shape[1], last.shape[0], first.shape[0]
    nb = len(_indices(sd, r"^RRDB_trunk\.(\d+)\."))
    num_up = len(_indices(sd, r"^upconv(\d+)\.weight$"))
    unshuffle = 1
    for factor in (2, 4):
        if in_nc == out_nc * factor * factor and 2**num_up >= factor:
            unshuffle = factor
    return RRDBNet(in_nc=in_nc, out_nc=out_nc, nf=nf, nb=nb,
                   gc=sd["RRDB_trunk.0.RDB1.conv1.weight"].shape[0], num_up=num_up,
                   unshuffle=unshuffle)


def _compact(sd: Mapping[str, torch.Tensor]) -> SRVGGNetCompact:
    convs = [i for i in _indices(sd, r"^body\.(\d+)\.weight$") if sd[f"body.{i}.weight"].ndim == 4]
    first, last = sd["body.0.weight"], sd[f"body.{convs[-1]}.weight"]
    in_nc, nf = first.shape[1], first.shape[0]
    scale = math.isqrt(last.shape[0] // in_nc)
    if scale * scale * in_nc != last.shape[0]:
        raise UnknownUpscaler(f"SRVGGNetCompact's last conv has {last.shape[0]} outputs, not "
                              f"{in_nc} channels times a square scale")
    return SRVGGNetCompact(in_nc=in_nc, out_nc=in_nc, nf=nf, num_conv=len(convs) - 2,
                           scale=scale)


def upscaler_from_state_dict(sd: Mapping[str, torch.Tensor]) -> nn.Module:
    """Build the upscaler that fits ``sd`` (any supported layout, see the module docstring) and
    load it strictly; ``.layout`` names the layout it was read from."""
    layout = detect_layout(sd)
    if layout == "compact":
        model = _compact(sd)
    else:
        rules = RRDB_LAYOUTS[layout][1]
        if rules is None:
            rules = _sequential_rules(max(_indices(sd, r"^model\.(\d+)\.weight$")))
        sd = rename(sd, rules)
        model = _rrdbnet(sd)
    try:
        model.load_state_dict(dict(sd), strict=True)
    except RuntimeError as e:
        raise UnknownUpscaler(f"looks like {layout} but does not fit it: "
                              f"{str(e).splitlines()[0]} {str(e).splitlines()[1:2]}") from None
    model.layout = layout
    return model.eval().requires_grad_(False)
