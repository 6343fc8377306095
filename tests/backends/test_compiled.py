"""torch.compile (inductor, freezing) against eager fp32 on the tiny VAE decoder and U-Net.

Compiling takes minutes on a loaded 2-core machine (over 10 min for the tiny U-Net at load
~14), so these are ``slow`` tests: ``pytest -m slow tests/backends/test_compiled.py``."""

from __future__ import annotations

import pytest
import torch

from noisecraft.backends import get_backend
from tests.backends.helpers import rel_l2, tiny_unet, tiny_vae, unet_inputs

FP32_TOL = 1e-4
BF16_TOL = 5e-2  # approximate by design; see test_backends.py


@pytest.mark.slow
def test_compiled_fp32_unet_matches_eager():
    unet = tiny_unet()
    args = unet_inputs()
    with torch.no_grad():
        ref = unet(*args)
    out = get_backend("compiled").wrap(unet)(*args)
    assert out.dtype == torch.float32 and rel_l2(out, ref) < FP32_TOL


@pytest.mark.slow
def test_compiled_bf16_vae_decoder_is_close():
    vae = tiny_vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = vae.decode(z)
    fast = get_backend("compiled_bf16", bf16_native=True, channels_last=True)
    assert rel_l2(fast.wrap_vae_decoder(vae)(z), ref) < BF16_TOL
