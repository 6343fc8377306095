"""UNetModel behaviour that needs no reference implementation."""

from __future__ import annotations

import math

import pytest
import torch

from noisecraft.models.layers import timestep_embedding
from noisecraft.models.unet import UNetModel, sdxl_refiner_vector, sdxl_vector
from noisecraft.models.unet_configs import UNET_PRESETS, UNetConfig, find_unet_preset, unet_preset


def _random_model(name: str, seed: int = 0, dtype=torch.float32) -> UNetModel:
    torch.manual_seed(seed)
    model = UNetModel(UNET_PRESETS[name], dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.5 / max(1, p[0].numel()) ** 0.5)
    return model


def _inputs(config: UNetConfig, batch=2, size=(8, 8)):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, config.in_channels, *size, generator=g)
    ctx = torch.randn(batch, 5, config.context_dim, generator=g)
    y = None
    if config.adm_in_channels is not None:
        y = torch.randn(batch, config.adm_in_channels, generator=g)
    return x, torch.tensor([500.0, 3.5])[:batch], ctx, y


def test_meta_construction_then_assign_load_gives_same_output():
    src = _random_model("tiny_sd15")
    model = UNetModel(src.config, device="meta")
    assert all(p.is_meta for p in model.parameters())
    model.load_state_dict(src.state_dict(), assign=True)
    x, t, ctx, _ = _inputs(src.config)
    with torch.no_grad():
        assert torch.equal(model.eval()(x, t, ctx), src(x, t, ctx))


def test_fresh_model_outputs_zero_like_ldm_zero_init():
    model = UNetModel(UNET_PRESETS["tiny_sd15"])
    x, t, ctx, _ = _inputs(model.config)
    assert torch.count_nonzero(model(x, t, ctx)) == 0


@pytest.mark.parametrize("size", [(8, 8), (9, 7)])
def test_output_shape_and_scalar_timestep(size):
    model = _random_model("tiny_sd15_inpaint")
    x, t, ctx, _ = _inputs(model.config, size=size)
    with torch.no_grad():
        out = model(x, torch.tensor(500.0), ctx)
        out_batched = model(x, torch.tensor([500.0, 500.0]), ctx)
    assert out.shape == (2, 4, *size)
    assert torch.allclose(out, out_batched)


def test_output_depends_on_each_conditioning_input():
    model = _random_model("tiny_sdxl_base")
    x, t, ctx, y = _inputs(model.config)
    with torch.no_grad():
        base = model(x, t, ctx, y)
        for changed in (model(x, t + 1, ctx, y), model(x, t, ctx + 1, y), model(x, t, ctx, y + 1)):
            assert (changed - base).abs().max() > 1e-4


def test_gradient_checkpointing_gives_same_gradients():
    model = _random_model("tiny_sd15").train()
    x, t, ctx, _ = _inputs(model.config, batch=1)
    grads = []
    for flag in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = flag
        model(x, t, ctx).square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_bfloat16_runs_close_to_float32():
    model32 = _random_model("tiny_sdxl_base")
    model16 = UNetModel(model32.config, dtype=torch.bfloat16).eval()
    model16.load_state_dict(model32.state_dict())
    x, t, ctx, y = _inputs(model32.config)
    with torch.no_grad():
        ref = model32(x, t, ctx, y)
        out = model16(x.bfloat16(), t, ctx.bfloat16(), y.bfloat16())
    assert out.dtype == torch.bfloat16
    rel = ((out.float() - ref).abs().max() / ref.abs().max()).item()
    print(f"\nbf16 vs fp32: max abs {(out.float() - ref).abs().max().item():.3e}, rel {rel:.3e}")
    assert torch.isfinite(out).all() and rel < 0.2  # loose sanity bound, not a precision claim


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"context": None}, "needs context of shape"),
        ({"y": torch.zeros(2, 3)}, "needs y of shape"),
        ({"down_residuals": [torch.zeros(1)]}, "down_residuals needs"),
    ],
)
def test_bad_inputs_are_explained(kwargs, message):
    model = UNetModel(UNET_PRESETS["tiny_sdxl_base"])
    x, t, ctx, y = _inputs(model.config)
    args = {"context": ctx, "y": y, **kwargs}
    with pytest.raises(ValueError, match=message), torch.no_grad():
        model(x, t, args.pop("context"), args.pop("y"), **args)


def test_timestep_embedding_is_cos_then_sin_with_ldm_frequencies():
    emb = timestep_embedding(torch.tensor([0.0, 3.0]), 8)
    freqs = [10000 ** (-i / 4) for i in range(4)]
    expected = [math.cos(3 * f) for f in freqs] + [math.sin(3 * f) for f in freqs]
    assert torch.allclose(emb[1], torch.tensor(expected), atol=1e-6)
    assert torch.equal(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))


def test_sdxl_vectors_layout():
    pooled = torch.randn(2, 1280)
    y = sdxl_vector(pooled, (1024, 768), (0, 16), (1024, 1024))
    assert y.shape == (2, 2816) == (2, UNET_PRESETS["sdxl_base"].adm_in_channels)
    assert torch.equal(y[:, :1280], pooled)
    assert torch.allclose(y[0, 1280 + 256:1280 + 512], timestep_embedding(torch.tensor([768.0]),
                                                                        256)[0])
    y_ref = sdxl_refiner_vector(pooled, (1024, 768), (0, 0), 6.0)
    assert y_ref.shape == (2, 2560) == (2, UNET_PRESETS["sdxl_refiner"].adm_in_channels)
    with pytest.raises(ValueError, match="original_size"):
        sdxl_vector(pooled, (1, 2, 3), (0, 0), (1, 1))


def test_config_validation_and_presets():
    with pytest.raises(ValueError, match="exactly one of num_heads"):
        UNetConfig(num_heads=8, head_dim=64)
    with pytest.raises(ValueError, match="num_res_blocks has 3 entries"):
        UNetConfig(num_res_blocks=(2, 2, 2))
    with pytest.raises(ValueError, match="known presets: sd15"):
        unet_preset("sd3")
    assert UNetConfig(num_res_blocks=2).num_res_blocks == (2, 2, 2, 2)
    assert find_unet_preset(UNET_PRESETS["sdxl_refiner"]) == "sdxl_refiner"
    assert find_unet_preset(UNetConfig(model_channels=64)) is None


@pytest.mark.parametrize(("name", "millions"), [("sd15", 859.52), ("sd2", 865.91),
                                                ("sdxl_base", 2567.46)])
def test_full_size_parameter_counts_match_released_models(name, millions):
    model = UNetModel(UNET_PRESETS[name], device="meta")
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions
