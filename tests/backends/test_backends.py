"""Every PyTorch backend against eager fp32 on a tiny U-Net and a tiny VAE decoder.

Tolerances: fp32 backends within relative L2 1e-4 of eager fp32 (they compute the same
arithmetic with different blocking; measured 1.3e-6 to 1.9e-6).  bf16 is approximate: 8
mantissa bits give ~4e-3 per rounding; measured 1.4e-2 (autocast) to 1.7e-2 (bf16 weights)
end to end on these random-weight models; asserted < 5e-2.
"""

from __future__ import annotations

import pytest
import torch

from noisecraft.backends import (
    DEFAULT_BACKEND,
    AcceleratedModule,
    backend_names,
    get_backend,
)
from noisecraft.backends.onednn import count_onednn_layers
from noisecraft.diffusion import Denoiser
from noisecraft.samplers import sample
from noisecraft.schedules import DiscreteSchedule
from tests.backends.helpers import rel_l2, tiny_unet, tiny_vae, unet_inputs

FP32_TOL = 1e-4
BF16_TOL = 5e-2
TORCH_FP32 = [("eager", {}), ("eager", {"channels_last": True}), ("eager", {"sdpa": "math"}),
              ("onednn", {}), ("onednn", {"channels_last": True})]
TORCH_BF16 = [("eager_bf16", {}), ("eager_bf16", {"bf16_mode": "autocast"}),
              ("onednn_bf16", {"channels_last": True})]


@pytest.fixture(scope="module")
def unet_and_ref():
    unet = tiny_unet()
    args = unet_inputs()
    with torch.no_grad():
        ref = unet(*args)
    return unet, args, ref


@pytest.mark.parametrize(("name", "opts"), TORCH_FP32)
def test_fp32_backends_match_eager_unet(unet_and_ref, name, opts):
    unet, args, ref = unet_and_ref
    before = {k: v.clone() for k, v in unet.state_dict().items()}
    fast = get_backend(name, **opts).wrap(unet)
    out = fast(*args)
    assert out.dtype == torch.float32 and out.shape == ref.shape and out.is_contiguous()
    assert rel_l2(out, ref) < FP32_TOL
    for k, v in unet.state_dict().items():  # the source module is untouched
        assert torch.equal(v, before[k]) and v.is_contiguous(), k


@pytest.mark.parametrize(("name", "opts"), TORCH_BF16)
def test_bf16_backends_are_close_unet(unet_and_ref, name, opts):
    unet, args, ref = unet_and_ref
    fast = get_backend(name, bf16_native=True, **opts).wrap(unet)
    assert fast.precision == "bf16"
    out = fast(*args)
    assert out.dtype == torch.float32
    assert rel_l2(out, ref) < BF16_TOL


@pytest.mark.parametrize(("name", "opts"), TORCH_FP32[3:] + TORCH_BF16[:1])
def test_backends_vae_decoder(name, opts):
    vae = tiny_vae()
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = vae.decode(z)
    out = get_backend(name, bf16_native=True, **opts).wrap_vae_decoder(vae)(z)
    tol = FP32_TOL if get_backend(name).precision == "fp32" else BF16_TOL
    assert out.shape == ref.shape and rel_l2(out, ref) < tol


def test_onednn_swaps_every_linear_and_conv(unet_and_ref):
    unet = unet_and_ref[0]
    inner = get_backend("onednn").wrap(unet).inner
    n_lin = sum(type(m) is torch.nn.Linear for m in unet.modules())
    n_conv = sum(type(m) is torch.nn.Conv2d for m in unet.modules())
    assert count_onednn_layers(inner) == {"linear": n_lin, "conv2d": n_conv}
    assert not any(type(m) in (torch.nn.Linear, torch.nn.Conv2d) for m in inner.modules())


def test_onednn_fp32_linears_share_the_source_weights(unet_and_ref):
    """fp32: no second copy of the Linear weights (SD 1.5: 1.1 GB, SDXL: 8.9 GB); only the
    convolutions' packed weights are extra.  bf16: packed bf16 copies of both."""
    from noisecraft.backends.onednn import OneDNNConv2d, OneDNNLinear
    from noisecraft.backends.wrapped import extra_bytes

    unet = unet_and_ref[0]
    backend = get_backend("onednn")
    inner = backend.wrap(unet).inner
    source = {m.weight.data_ptr() for m in unet.modules() if type(m) is torch.nn.Linear}
    linears = [m for m in inner.modules() if isinstance(m, OneDNNLinear)]
    assert {m.weight.data_ptr() for m in linears} == source
    assert not any(m.weight.is_mkldnn for m in linears)
    conv_bytes = sum(m.packed.numel() * m.packed.element_size()
                     for m in inner.modules() if isinstance(m, OneDNNConv2d))
    assert extra_bytes(unet, inner, backend) == conv_bytes > 0
    bf16 = get_backend("onednn_bf16", bf16_native=True).wrap(unet).inner
    assert all(m.weight.is_mkldnn and m.weight.dtype == torch.bfloat16
               for m in bf16.modules() if isinstance(m, OneDNNLinear))


def test_bf16_falls_back_to_fp32_without_native_bf16(unet_and_ref):
    unet, args, ref = unet_and_ref
    with pytest.warns(RuntimeWarning, match="native bf16"):
        backend = get_backend("onednn_bf16", bf16_native=False)
    assert backend.precision == "fp32"
    assert rel_l2(backend.wrap(unet)(*args), ref) < FP32_TOL


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="valid backends: eager, eager_bf16, onednn") as e:
        get_backend("tensorrt")
    for name in backend_names():
        assert name in str(e.value)


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="sdpa='fast'; choose one of default, flash, math"):
        get_backend("eager", sdpa="fast")
    with pytest.raises(TypeError, match="unknown option"):
        get_backend("onednn", dynamic=True).wrap(tiny_unet())
    with pytest.raises(ValueError, match="bf16_mode='half'"):
        get_backend("eager_bf16", bf16_mode="half").wrap(tiny_unet())


def test_default_backend_runs_under_sampler_with_callbacks(unet_and_ref):
    """The backend is just the model inside Denoiser: a sampler, its callback and the
    conditioning run unchanged and give the eager result."""
    unet, (x, _, ctx), _ = unet_and_ref
    schedule = DiscreteSchedule.from_betas("scaled_linear", 1000, 0.00085, 0.012)
    sigmas = torch.tensor([14.6, 3.0, 0.6, 0.0])
    results, steps = {}, []
    for name in ("eager", DEFAULT_BACKEND):
        model = unet if name == "eager" else get_backend(name).wrap(unet)
        denoiser = Denoiser(model, schedule)
        with torch.no_grad():
            results[name] = sample("euler", denoiser.bind({"context": ctx}),
                                   x * sigmas[0], sigmas, callback=steps.append)
    assert isinstance(get_backend(DEFAULT_BACKEND).wrap(unet), AcceleratedModule)
    assert len(steps) == 2 * (len(sigmas) - 1)
    assert rel_l2(results[DEFAULT_BACKEND], results["eager"]) < FP32_TOL


@pytest.mark.parametrize("name", ["eager", "onednn", "onednn_bf16"])
def test_wrapped_module_looks_like_the_source(unet_and_ref, name):
    """Pipelines read ``unet.config`` and the weights' dtype from ``parameters()``."""
    unet = unet_and_ref[0]
    fast = get_backend(name, bf16_native=True).wrap(unet)
    assert fast.config is unet.config and fast.source is unet
    expected = torch.bfloat16 if name.endswith("bf16") else torch.float32
    assert next(fast.parameters()).dtype == expected
    assert fast.backend == name.removesuffix("_bf16")
    assert f"precision='{fast.precision}'" in repr(fast)
