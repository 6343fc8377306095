"""The OpenVINO backend against eager fp32, and its disk cache (skipped without openvino)."""

from __future__ import annotations

import pytest
import torch

from noisecraft.backends import get_backend
from tests.backends.helpers import rel_l2, tiny_unet, tiny_vae, unet_inputs

pytest.importorskip("openvino", reason="openvino is an optional extra: pip install "
                    "'noisecraft[openvino]'")

FP32_TOL = 1e-4
BF16_TOL = 5e-2  # approximate by design; see test_backends.py


def test_openvino_fp32_unet_matches_eager(tmp_path):
    unet = tiny_unet()
    args = unet_inputs()
    with torch.no_grad():
        ref = unet(*args)
    fast = get_backend("openvino", cache_dir=tmp_path).wrap(unet)
    out = fast(*args)
    assert out.dtype == torch.float32 and rel_l2(out, ref) < FP32_TOL
    fast(*args)
    assert fast.runner.conversions == 1


def test_openvino_disk_cache_is_keyed_by_weights_and_shapes(tmp_path):
    vae = tiny_vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = vae.decode(z)
    fast = get_backend("openvino", cache_dir=tmp_path).wrap_vae_decoder(vae)
    assert rel_l2(fast(z), ref) < FP32_TOL and fast.runner.conversions == 1
    assert len(list(tmp_path.glob("*.xml"))) == 1

    # a fresh wrapper of the same weights loads the IR from disk: no new conversion
    again = get_backend("openvino", cache_dir=tmp_path).wrap_vae_decoder(vae)
    assert rel_l2(again(z), ref) < FP32_TOL and again.runner.conversions == 0

    # a new input shape is a new conversion
    assert again(z[:, :, :4, :4]).shape == (1, 3, 8, 8)
    assert again.runner.conversions == 1 and len(list(tmp_path.glob("*.xml"))) == 2

    # a changed weight is a new key, a new conversion, and the new numbers
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)
        ref2 = vae.decode(z)
    changed = get_backend("openvino", cache_dir=tmp_path).wrap_vae_decoder(vae)
    assert rel_l2(changed(z), ref2) < FP32_TOL and changed.runner.conversions == 1
    assert len(list(tmp_path.glob("*.xml"))) == 3


def test_openvino_bf16_vae_decoder_is_close(tmp_path):
    vae = tiny_vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = vae.decode(z)
    fast = get_backend("openvino_bf16", cache_dir=tmp_path, bf16_native=True)
    assert rel_l2(fast.wrap_vae_decoder(vae)(z), ref) < BF16_TOL


def test_openvino_rejects_torch_knobs_and_unknown_options(tmp_path):
    with pytest.raises(ValueError, match="do not apply"):
        get_backend("openvino", channels_last=True, cache_dir=tmp_path).wrap(tiny_vae())
    with pytest.raises(TypeError, match="allowed: cache_dir"):
        get_backend("openvino", bogus=1).wrap(tiny_vae())
