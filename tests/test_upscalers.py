"""Upscaler files in their real key layouts load into noisecraft's own architectures and compute
what the original code computes.

The references below rebuild the original networks the way their repositories do (BasicSR's
``nn.Sequential`` ESRGAN with ``ShortcutBlock.sub`` and ``conv_block`` = Sequential(conv, act);
Real-ESRGAN's SRVGGNetCompact), so their ``state_dict()`` keys are the real keys; the other
layouts are written from them by the renames the ESRGAN / Real-ESRGAN conversion scripts do.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from noisecraft.request import InputError
from noisecraft.upscale import load_upscale_model, upscale_tiled, upscale_with_model

NF, GC, NB = 8, 4, 2


class _Shortcut(nn.Module):
    def __init__(self, sub: nn.Module) -> None:
        super().__init__()
        self.sub = sub

    def forward(self, x):
        return x + self.sub(x)


def _cb(i: int, o: int, act: bool = True) -> nn.Sequential:
    """BasicSR's conv_block: Sequential(conv[, LeakyReLU])."""
    return nn.Sequential(nn.Conv2d(i, o, 3, 1, 1), *([nn.LeakyReLU(0.2)] if act else []))


class _RDB(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.conv2 = _cb(NF, GC), _cb(NF + GC, GC)
        self.conv3, self.conv4 = _cb(NF + 2 * GC, GC), _cb(NF + 3 * GC, GC)
        self.conv5 = _cb(NF + 4 * GC, NF, act=False)

    def forward(self, x):
        x1 = self.conv1(x)
        x2 = self.conv2(torch.cat((x, x1), 1))
        x3 = self.conv3(torch.cat((x, x1, x2), 1))
        x4 = self.conv4(torch.cat((x, x1, x2, x3), 1))
        return self.conv5(torch.cat((x, x1, x2, x3, x4), 1)) * 0.2 + x


class _RRDB(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.RDB1, self.RDB2, self.RDB3 = _RDB(), _RDB(), _RDB()

    def forward(self, x):
        return self.RDB3(self.RDB2(self.RDB1(x))) * 0.2 + x


class _SequentialESRGAN(nn.Module):
    """BasicSR's first RRDB_Net (``model.N`` keys); ``unshuffle`` as Real-ESRGAN x2 runs it."""

    def __init__(self, n_up: int, in_nc: int = 3, out_nc: int = 3, unshuffle: int = 1,
                 nb: int = NB):
        super().__init__()
        torch.manual_seed(n_up * 10 + in_nc)
        ups = []
        for _ in range(n_up):
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(NF, NF, 3, 1, 1),
                    nn.LeakyReLU(0.2)]
        trunk = _Shortcut(nn.Sequential(*[_RRDB() for _ in range(nb)], nn.Conv2d(NF, NF, 3, 1, 1)))
        self.model = nn.Sequential(nn.Conv2d(in_nc, NF, 3, 1, 1), trunk, *ups,
                                   nn.Conv2d(NF, NF, 3, 1, 1), nn.LeakyReLU(0.2),
                                   nn.Conv2d(NF, out_nc, 3, 1, 1))
        self.unshuffle = unshuffle
        for p in self.parameters():  # larger than default init, so differences would show
            p.data.normal_(0, 0.15)

    def forward(self, x):
        return self.model(F.pixel_unshuffle(x, self.unshuffle) if self.unshuffle > 1 else x)


def _to_esrgan(sd: dict, n_up: int) -> dict:
    """``model.N`` keys -> ESRGAN repository keys (its transer_RRDB_models.py, inverted)."""
    last = 3 * n_up + 4
    names = {"model.0.": "conv_first.", f"model.1.sub.{NB}.": "trunk_conv.",
             f"model.{last - 2}.": "HRconv.", f"model.{last}.": "conv_last.",
             **{f"model.{3 * (i + 1)}.": f"upconv{i + 1}." for i in range(n_up)}}
    out = {}
    for k, v in sd.items():
        if ".RDB" in k:
            k = k.replace("model.1.sub.", "RRDB_trunk.").replace(".0.weight", ".weight")
            k = k.replace(".0.bias", ".bias")
        else:
            prefix = next(p for p in names if k.startswith(p))
            k = names[prefix] + k[len(prefix):]
        out[k] = v
    return out


def _to_realesrgan(sd: dict) -> dict:
    """ESRGAN repository keys -> BasicSR's later RRDBNet keys (Real-ESRGAN files)."""
    out = {}
    for k, v in sd.items():
        k = k.replace("RRDB_trunk.", "body.").replace(".RDB", ".rdb").replace("trunk_conv",
                                                                              "conv_body")
        k = k.replace("upconv", "conv_up").replace("HRconv", "conv_hr")
        out[k] = v
    return out


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def _image(h: int = 12, w: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.rand(1, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n_up", [1, 2])
def test_rrdbnet_layouts_load_and_match_the_original(tmp_path, n_up):
    ref = _SequentialESRGAN(n_up).eval()
    seq = {k: v.clone() for k, v in ref.state_dict().items()}
    assert "model.1.sub.0.RDB1.conv1.0.weight" in seq and f"model.{3 * n_up + 4}.weight" in seq
    esr = _to_esrgan(seq, n_up)
    assert "RRDB_trunk.1.RDB3.conv5.weight" in esr and "upconv1.weight" in esr
    save_file(seq, tmp_path / "seq.safetensors")
    torch.save(esr, tmp_path / "esrgan.pth")
    torch.save({"params_ema": _to_realesrgan(esr)}, tmp_path / "realesrgan.pth")
    x = _image()
    with torch.no_grad():
        want = ref(x)
    outs = {}
    for name, layout in (("seq.safetensors", "sequential"), ("esrgan.pth", "esrgan"),
                         ("realesrgan.pth", "realesrgan")):
        model = load_upscale_model(tmp_path / name)
        assert (model.layout, model.scale) == (layout, 2**n_up)
        with torch.no_grad():
            outs[layout] = model(x)
        assert outs[layout].shape == (1, 3, 12 * 2**n_up, 10 * 2**n_up)
    # same weights in the old and the new layout: identical outputs
    assert torch.equal(outs["esrgan"], outs["sequential"])
    assert torch.equal(outs["realesrgan"], outs["esrgan"])
    torch.testing.assert_close(outs["sequential"], want, rtol=0, atol=1e-5)
    assert want.abs().max() > 0.1  # not a trivially zero network


def test_realesrgan_x2_pixel_unshuffle(tmp_path):
    ref = _SequentialESRGAN(2, in_nc=12, unshuffle=2).eval()
    sd = _to_realesrgan(_to_esrgan(ref.state_dict(), 2))
    save_file(sd, tmp_path / "RealESRGAN_x2plus.safetensors")
    model = load_upscale_model(tmp_path / "RealESRGAN_x2plus.safetensors")
    assert (model.scale, model.unshuffle) == (2, 2)
    x = _image(12, 10)
    with torch.no_grad():
        got, want = model(x), ref(x)
        odd = model(_image(11, 9))  # odd sizes: padded for the unshuffle, output cropped
    assert got.shape == (1, 3, 24, 20) and odd.shape == (1, 3, 22, 18)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


class _Compact(nn.Module):
    """Real-ESRGAN's SRVGGNetCompact (body = ModuleList of conv/PReLU)."""

    def __init__(self, num_conv: int = 2, scale: int = 4):
        super().__init__()
        torch.manual_seed(3)
        self.body = nn.ModuleList([nn.Conv2d(3, NF, 3, 1, 1), nn.PReLU(NF)])
        for _ in range(num_conv):
            self.body.extend([nn.Conv2d(NF, NF, 3, 1, 1), nn.PReLU(NF)])
        self.body.append(nn.Conv2d(NF, 3 * scale * scale, 3, 1, 1))
        self.scale = scale

    def forward(self, x):
        out = x
        for layer in self.body:
            out = layer(out)
        out = nn.PixelShuffle(self.scale)(out)
        return out + F.interpolate(x, scale_factor=self.scale, mode="nearest")


def test_srvgg_compact(tmp_path):
    ref = _Compact().eval()
    torch.save({"params": ref.state_dict()}, tmp_path / "realesr-general-x4v3.pth")
    model = load_upscale_model(tmp_path / "realesr-general-x4v3.pth")
    assert (model.layout, model.scale) == ("compact", 4)
    x = _image()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=0, atol=1e-5)


def test_unknown_layout_and_misfit_are_refused_naming_the_file(tmp_path):
    save_file({"encoder.weight": torch.zeros(4, 3, 3, 3)}, tmp_path / "swinir.safetensors")
    with pytest.raises(InputError, match=r"swinir\.safetensors.*SRVGGNetCompact.*encoder\.weight"):
        load_upscale_model(tmp_path / "swinir.safetensors")
    sd = _SequentialESRGAN(1).state_dict()
    sd["model.1.sub.0.RDB1.conv9.0.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "odd.safetensors")
    with pytest.raises(InputError, match=r"odd\.safetensors.*sequential.*does not fit"):
        load_upscale_model(tmp_path / "odd.safetensors")
    with pytest.raises(InputError, match="does not exist"):
        load_upscale_model(tmp_path / "missing.pth")


def test_tiled_rrdbnet_equals_untiled(tmp_path):
    """Receptive radius of this x2 RRDBNet with one RRDB: 1 + 15 + 1 convs at 1x, then 3 convs
    at 2x: 18.5 input px.  The tiler zero-weights the outer quarter of each overlap, so overlap
    76 (guard 19 px) gives the untiled result to float32 rounding: stated tolerance 1e-4."""
    save_file(_SequentialESRGAN(1, nb=1).state_dict(), tmp_path / "x2.safetensors")
    model = load_upscale_model(tmp_path / "x2.safetensors")
    x = _image(124, 116, seed=5)
    with torch.no_grad():
        full = model(x).clamp(0, 1)
    tiled = upscale_with_model(model, x, tile=100, overlap=76)  # 2 x 2 tiles
    assert tiled.shape == full.shape == (1, 3, 248, 232)
    torch.testing.assert_close(tiled, full, rtol=0, atol=1e-4)
    rough = upscale_tiled(model, x, 2, tile=100, overlap=16).clamp(0, 1)
    assert (rough - full).abs().max() > 1e-3  # too little overlap shows: the test can fail
