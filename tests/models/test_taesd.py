"""TAESD: the original release's key layout, file loading (three layouts), previews."""

import pytest
import torch
from safetensors.torch import save_file

from noisecraft.models.taesd import (
    TAESD,
    TAESDConfig,
    load_taesd_file,
    taesd_state_dict_from_diffusers,
    taesd_state_dict_to_diffusers,
)


def _random_taesd(width=16, latent_channels=4, seed=0):
    torch.manual_seed(seed)
    model = TAESD(TAESDConfig(latent_channels=latent_channels, width=width)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # default init shrinks outputs through 20 layers; 1.5 keeps std O(0.3)
    return model


def test_full_size_keys_match_the_original_release():
    model = TAESD(device="meta")
    dec = {k[len("decoder.") :]: v.shape for k, v in model.state_dict().items()
           if k.startswith("decoder.")}  # fmt: skip
    enc = {k[len("encoder.") :]: v.shape for k, v in model.state_dict().items()
           if k.startswith("encoder.")}  # fmt: skip
    # taesd.py: Decoder = Sequential(Clamp, conv(4, 64), ReLU, Block x3, Upsample, conv(bias=False),
    # ..., Block, conv(64, 3)); Encoder = Sequential(conv(3, 64), Block, conv(stride 2), ...)
    assert dec["1.weight"] == (64, 4, 3, 3) and "0.weight" not in dec
    assert dec["3.conv.0.weight"] == (64, 64, 3, 3) and dec["3.conv.4.bias"] == (64,)
    assert dec["7.weight"] == (64, 64, 3, 3) and "7.bias" not in dec
    assert dec["19.weight"] == (3, 64, 3, 3) and "19.bias" in dec
    assert max(int(k.split(".")[0]) for k in dec) == 19
    assert enc["0.weight"] == (64, 3, 3, 3) and enc["2.weight"] == (64, 64, 3, 3)
    assert "2.bias" not in enc and enc["14.weight"] == (4, 64, 3, 3)
    n_params = sum(p.numel() for p in model.decoder.parameters())
    assert 1_000_000 < n_params < 1_300_000  # "~1.2M parameters" per half


def test_decode_and_encode_shapes_and_range():
    model = _random_taesd()
    z = torch.randn(2, 4, 5, 7)
    with torch.no_grad():
        img = model.decode(z)
        assert img.shape == (2, 3, 40, 56) and img.std() > 0.05
        assert model.encode(img.clamp(-1, 1)).shape == (2, 4, 5, 7)
        # the decoder soft-clamps its input to (-3, 3): huge latents behave like +-3
        saturated = model.decoder[1:](3 * z.sign()) * 2 - 1  # layers after the clamp
        assert torch.allclose(model.decode(z.sign() * 1e4), saturated, atol=1e-5)
    preview = model.preview(z)
    assert preview.dtype == torch.uint8 and preview.shape == (2, 40, 56, 3)
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        model.decode(torch.zeros(1, 16, 4, 4))


@pytest.mark.parametrize("layout", ["original", "comfyui", "diffusers"])
def test_from_files_reads_each_layout(tmp_path, layout):
    src = _random_taesd(seed=1)
    enc = {k[8:]: v for k, v in src.state_dict().items() if k.startswith("encoder.")}
    dec = {k[8:]: v for k, v in src.state_dict().items() if k.startswith("decoder.")}
    if layout == "comfyui":
        enc = {f"taesd_encoder.{k}": v for k, v in enc.items()}
        dec = {f"taesd_decoder.{k}": v for k, v in dec.items()}
    elif layout == "diffusers":
        diff = taesd_state_dict_to_diffusers(src.state_dict())
        assert "decoder.layers.0.weight" in diff  # the original decoder's 1.weight
        enc = {k: v for k, v in diff.items() if k.startswith("encoder.")}
        dec = {k: v for k, v in diff.items() if k.startswith("decoder.")}
    save_file(enc, tmp_path / "taesd_encoder.safetensors")
    torch.save(dec, tmp_path / "taesd_decoder.pth")
    model = TAESD.from_files(tmp_path / "taesd_decoder.pth", tmp_path / "taesd_encoder.safetensors")
    assert model.config == src.config
    x, z = torch.rand(1, 3, 32, 32) * 2 - 1, torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        assert torch.equal(model.decode(z), src.decode(z))
        assert torch.equal(model.encode(x), src.encode(x))


def test_decoder_only_and_errors(tmp_path):
    src = _random_taesd(latent_channels=16, seed=2)  # taesd3 / taef1 have 16 channels
    dec = {k[8:]: v for k, v in src.state_dict().items() if k.startswith("decoder.")}
    save_file(dec, tmp_path / "taef1_decoder.safetensors")
    model = TAESD.from_files(tmp_path / "taef1_decoder.safetensors", dtype=torch.bfloat16)
    assert model.encoder is None and model.config.latent_channels == 16
    z = torch.randn(1, 16, 4, 4)
    with torch.no_grad():
        ref = src.decode(z)
        err = (model.decode(z.bfloat16()).float() - ref).abs().max()
    assert err < 0.2 * ref.abs().max()  # bf16 vs fp32, loose
    with pytest.raises(RuntimeError, match="without an encoder"):
        model.encode(torch.zeros(1, 3, 32, 32))
    save_file({"foo.weight": torch.zeros(1)}, tmp_path / "bad.safetensors")
    with pytest.raises(KeyError, match="not a TAESD decoder"):
        TAESD.from_files(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="expected .safetensors"):
        load_taesd_file(tmp_path / "x.ckpt")
    with pytest.raises(KeyError, match="does not match"):
        taesd_state_dict_from_diffusers({"decoder.1.weight": torch.zeros(1)})
