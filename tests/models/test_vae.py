"""AutoencoderKL: structure, keys, loading, posterior, tiling, bf16 (no reference library)."""

import re

import pytest
import torch
import torch.nn.functional as F

from noisecraft.models.vae import (
    SD_VAE,
    SDXL_VAE,
    TINY_VAE,
    VAE_PRESETS,
    AutoencoderKL,
    DiagonalGaussian,
    VAEConfig,
    tiled_apply,
)


def _model(config=TINY_VAE, seed=0, **kw):
    torch.manual_seed(seed)
    return AutoencoderKL(config, **kw).eval()


def test_presets_are_the_sd_architecture():
    assert SD_VAE.widths == (128, 256, 512, 512) and SD_VAE.downscale_factor == 8
    assert SDXL_VAE.widths == SD_VAE.widths and SDXL_VAE.latent_channels == 4
    assert set(VAE_PRESETS) == {"sd", "sdxl", "tiny"}
    with pytest.raises(TypeError):
        VAE_PRESETS["x"] = SD_VAE  # read-only


def test_full_sd_key_set_and_shapes_on_meta():
    sd = AutoencoderKL(SD_VAE, device="meta").state_dict()
    assert len(sd) == 248  # the 248 first_stage_model.* tensors of an SD 1.x checkpoint
    assert sd["encoder.conv_in.weight"].shape == (128, 3, 3, 3)
    assert sd["encoder.down.1.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert sd["encoder.down.2.downsample.conv.weight"].shape == (512, 512, 3, 3)
    assert "encoder.down.3.downsample.conv.weight" not in sd
    assert sd["encoder.mid.attn_1.q.weight"].shape == (512, 512, 1, 1)
    assert sd["encoder.conv_out.weight"].shape == (8, 512, 3, 3)
    assert sd["quant_conv.weight"].shape == (8, 8, 1, 1)
    assert sd["post_quant_conv.weight"].shape == (4, 4, 1, 1)
    # decoder.up.N is level N (up.0 finest, 128 wide, no upsample; up.3 coarsest)
    assert sd["decoder.up.0.block.0.conv1.weight"].shape == (128, 256, 3, 3)
    assert sd["decoder.up.0.block.2.conv2.weight"].shape == (128, 128, 3, 3)
    assert "decoder.up.0.upsample.conv.weight" not in sd
    assert sd["decoder.up.3.block.0.conv1.weight"].shape == (512, 512, 3, 3)
    assert sd["decoder.up.3.upsample.conv.weight"].shape == (512, 512, 3, 3)
    assert all(re.match(r"(encoder|decoder|quant_conv|post_quant_conv)\.?", k) for k in sd)


def test_shapes_and_range_contract():
    m = _model()
    x = torch.rand(2, 3, 16, 24) * 2 - 1
    with torch.no_grad():
        post = m.encode(x)
        assert post.mean.shape == post.logvar.shape == (2, 4, 8, 12)
        assert m.decode(post.mode()).shape == (2, 3, 16, 24)
    with pytest.raises(ValueError, match=r"multiples of 2"):
        m.encode(torch.zeros(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\)"):
        m.decode(torch.zeros(1, 3, 8, 8))


def test_meta_construction_and_assign_loading_with_linear_attention_weights():
    src = _model(seed=1)
    sd = src.state_dict()
    # some files store the attention projections as (C, C) linear weights
    linear_sd = {k: v[:, :, 0, 0] if ".attn_1." in k and v.ndim == 4 else v for k, v in sd.items()}
    assert linear_sd["decoder.mid.attn_1.proj_out.weight"].ndim == 2
    m = AutoencoderKL(TINY_VAE, device="meta")
    assert m.decoder.conv_out.weight.is_meta
    m.load_state_dict(linear_sd, strict=True, assign=True)
    m.eval()
    assert m.decoder.mid.attn_1.q.weight.shape == (64, 64, 1, 1)
    z = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        assert torch.equal(m.decode(z), src.decode(z))


def test_attention_is_single_head_softmax_over_positions():
    m = _model()
    attn = m.decoder.mid.attn_1
    x = torch.randn(1, 64, 3, 5)
    with torch.no_grad():
        h = attn.norm(x).flatten(2)  # (1, C, HW)
        w = lambda conv: conv.weight[:, :, 0, 0]  # noqa: E731
        q, k, v = (w(c) @ h + c.bias[:, None] for c in (attn.q, attn.k, attn.v))
        a = torch.softmax(q.transpose(1, 2) @ k / 64**0.5, dim=-1)  # (1, HW, HW)
        o = w(attn.proj_out) @ (v @ a.transpose(1, 2)) + attn.proj_out.bias[:, None]
        expected = x + o.reshape(x.shape)
        assert torch.allclose(attn(x), expected, atol=1e-5)


def test_posterior_sampling_is_seeded_and_has_the_right_moments():
    mean = torch.full((4000, 1, 1, 1), 2.0)
    post = DiagonalGaussian(mean, torch.full_like(mean, 2 * torch.log(torch.tensor(0.5))))
    a = post.sample(torch.Generator().manual_seed(0))
    b = post.sample(torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert abs(a.mean().item() - 2.0) < 0.05 and abs(a.std().item() - 0.5) < 0.03
    assert torch.equal(post.mode(), mean)
    clamped = DiagonalGaussian(mean[:1], torch.full((1, 1, 1, 1), 100.0))
    assert clamped.logvar.item() == 20.0
    std_normal = DiagonalGaussian(torch.zeros(2, 4, 3, 3), torch.zeros(2, 4, 3, 3))
    assert torch.equal(std_normal.kl(), torch.zeros(2))


def test_tiled_apply_is_exact_for_maps_that_commute_with_cropping():
    x = torch.randn(2, 3, 37, 53)

    def up8(t):  # pointwise then nearest 8x: commutes with cropping
        return F.interpolate(torch.tanh(t) * 2, scale_factor=8, mode="nearest")

    out = tiled_apply(up8, x, tile=16, overlap=5, scale_num=8, scale_den=1)
    assert torch.allclose(out, up8(x), atol=1e-6)

    def down4(t):
        return F.avg_pool2d(t, 4)

    y = torch.randn(1, 2, 96, 72)
    out = tiled_apply(down4, y, tile=32, overlap=8, scale_num=1, scale_den=4)
    assert torch.allclose(out, down4(y), atol=1e-6)
    with pytest.raises(ValueError, match="overlap < tile"):
        tiled_apply(down4, y, tile=16, overlap=16, scale_num=1, scale_den=4)


def _seam_jump(img: torch.Tensor, col: int) -> float:
    """Mean absolute horizontal difference across column ``col``."""
    return (img[..., col] - img[..., col - 1]).abs().mean().item()


def test_tiled_decode_close_to_untiled():
    # Measured (tiny VAE, default init, latent 24x40, tile 16, overlap 6): mean |tiled - full|
    # 0.054, max 0.40, output std 0.34; tile 8 / overlap 2: mean 0.19. The residual comes from
    # per-tile GroupNorm statistics, per-tile mid attention and zero padding at tile borders.
    m = _model()
    z = torch.randn(1, 4, 24, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = m.decode(z)
        tiled = m.decode_tiled(z, tile=16, overlap=6)
        small_tile = m.decode_tiled(z, tile=8, overlap=2)
        one_tile = m.decode_tiled(z, tile=40, overlap=8)  # one tile covers everything
    err = (tiled - full).abs()
    assert tiled.shape == full.shape
    assert err.mean() < 0.25 * full.std() and err.max() < 1.0
    assert torch.allclose(one_tile, full, atol=1e-6)
    # Larger tiles see more context and must do better than smaller ones.
    assert (small_tile - full).abs().mean() > 2 * err.mean()
    # Blending leaves no hard seam: across the middle of the first overlap (latent x = 13,
    # image x = 26; tiles start at 0, 10, 20, 24) the jump is like the jumps elsewhere.
    typical = (full[..., 1:] - full[..., :-1]).abs().mean().item()
    assert _seam_jump(tiled, 26) < 2.0 * typical


def test_tiled_encode_close_to_untiled():
    m = _model()
    x = torch.rand(1, 3, 80, 96, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        full = m.encode(x)
        tiled = m.encode_tiled(x, tile=48, overlap=16)
    assert tiled.mean.shape == full.mean.shape == (1, 4, 40, 48)
    assert (tiled.mean - full.mean).abs().mean() < 0.25 * full.mean.std()
    with pytest.raises(ValueError, match="multiples of the downscale factor 2"):
        m.encode_tiled(x, tile=47, overlap=16)


def test_bf16_decode_close_to_fp32(capsys):
    m32 = _model(seed=2)
    m16 = AutoencoderKL(TINY_VAE, dtype=torch.bfloat16).eval()
    m16.load_state_dict(m32.state_dict())
    z = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        ref = m32.decode(z)
        out = m16.decode(z.bfloat16())
    assert out.dtype == torch.bfloat16
    err = (out.float() - ref).abs().max().item()
    with capsys.disabled():
        print(f"\nbf16 tiny VAE decode: max|bf16 - fp32| = {err:.3g} (output std {ref.std():.3g})")
    assert err < 0.2 * ref.abs().max().item()  # loose: bf16 has an 8-bit mantissa


def test_config_errors_teach():
    with pytest.raises(ValueError, match="divisible by norm_groups=32"):
        VAEConfig(ch=16)
    with pytest.raises(ValueError, match="ch_mult"):
        VAEConfig(ch_mult=())
    with pytest.raises(ValueError, match="without quant_conv"):
        VAEConfig(use_quant_conv=False, embed_dim=8)


def test_small_trainable_config_trains_a_step():
    cfg = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, norm_groups=16, dropout=0.1)
    m = _model(cfg).train()
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    post = m.encode(x)
    loss = F.mse_loss(m.decode(post.sample(torch.Generator().manual_seed(0))), x) + post.kl().mean()
    loss.backward()
    assert m.encoder.conv_in.weight.grad is not None and torch.isfinite(loss)
    assert post.mean.shape == (2, 4, 4, 4)
