"""Text encoders: configs, key layouts, loading, clip skip, prompt weights, chunk batching."""

import dataclasses

import pytest
import torch

from noisecraft.models.text import (
    CLIPTextEncoder,
    TextConditioner,
    apply_token_weights,
    build_text_encoder,
    equalize_contexts,
    load_text_encoder,
)
from noisecraft.models.text_config import (
    CLIP_L,
    CLIP_L_SDXL,
    NOISECRAFT_SMALL,
    OPENCLIP_BIGG,
    OPENCLIP_H,
    TextEncoderConfig,
    text_config_from_state_dict,
    text_configs,
    tiny,
)
from noisecraft.models.tokenizer import CLIPTokenizer
from noisecraft.prompts import pad_chunks, tokenize_weighted


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter seeded random values (LayerNorm weights near 1), so that no
    layer is an identity and every weight matters in a comparison."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            is_norm = "norm" in name or "ln_" in name
            p.copy_(1 + 0.1 * noise if is_norm and name.endswith("weight") else 0.2 * noise)
    return module


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


@pytest.fixture(scope="module")
def sd1(tok):
    return randomize(CLIPTextEncoder(tiny(CLIP_L), tokenizer=tok), 1)


@pytest.fixture(scope="module")
def sdxl(tok):
    return randomize(build_text_encoder("sdxl", configs=[tiny(c) for c in text_configs("sdxl")],
                                        tokenizer=tok), 2)


def test_presets():
    assert (CLIP_L.width, CLIP_L.layers, CLIP_L.activation, CLIP_L.pad_id) == (768, 12,
                                                                               "quick_gelu", 49407)
    assert (OPENCLIP_H.width, OPENCLIP_H.layers, OPENCLIP_H.default_clip_skip) == (1024, 24, 2)
    assert OPENCLIP_BIGG.width + CLIP_L_SDXL.width == 2048 and OPENCLIP_BIGG.projection_dim == 1280
    assert not OPENCLIP_BIGG.norm_skipped and not CLIP_L_SDXL.norm_skipped
    assert [c.layout for c in text_configs("sdxl")] == ["hf", "openclip"]
    assert text_configs("sdxl_refiner") == (OPENCLIP_BIGG,)
    assert NOISECRAFT_SMALL.width == 256 and text_configs("clip") == (NOISECRAFT_SMALL,)
    t = tiny(OPENCLIP_BIGG)
    assert (t.width, t.layers, t.vocab_size, t.max_positions) == (32, 3, 49408, 77)
    assert all(c.head_dim == 64 for c in (CLIP_L, OPENCLIP_H, OPENCLIP_BIGG, NOISECRAFT_SMALL))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"activation": "relu"}, "activation='relu'; allowed: quick_gelu, gelu"),
        ({"layout": "ldm"}, "layout='ldm'; allowed: hf, openclip"),
        ({"heads": 5}, "not divisible by heads=5"),
        ({"vocab_size": 1000}, "cannot hold CLIP's end token"),
        ({"default_clip_skip": 13}, "allowed: 1 .. layers=12"),
        ({"pad_id": -1}, "pad_id=-1"),
        ({"width": 0}, "width=0 must be a positive integer"),
    ],
)
def test_config_errors_explain(change, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        dataclasses.replace(CLIP_L, **change)


def test_unknown_arrangement():
    with pytest.raises(ValueError, match="unknown text arrangement 'sd3'; allowed: sd1, sd2"):
        text_configs("sd3")
    with pytest.raises(ValueError, match="'sdxl' has 2 text encoder"):
        build_text_encoder("sdxl", configs=[tiny(CLIP_L)])


def test_state_dict_keys_are_original_layout(sd1, sdxl):
    keys = set(sd1.state_dict())
    assert "transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "transformer.text_model.encoder.layers.2.self_attn.q_proj.weight" in keys
    assert "transformer.text_model.final_layer_norm.bias" in keys
    assert not any("position_ids" in k for k in keys)
    sd = sdxl.state_dict()
    assert "embedders.0.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in sd
    assert sd["embedders.1.model.transformer.resblocks.2.attn.in_proj_weight"].shape == (96, 32)
    assert sd["embedders.1.model.transformer.resblocks.0.attn.in_proj_bias"].shape == (96,)
    assert sd["embedders.1.model.text_projection"].shape == (32, 24)  # x @ text_projection
    assert sd["embedders.1.model.positional_embedding"].shape == (77, 32)
    assert {k for k in sd if k.startswith("embedders.1.") and "resblocks" not in k} == {
        "embedders.1.model." + k for k in (
            "token_embedding.weight", "positional_embedding", "ln_final.weight",
            "ln_final.bias", "text_projection")
    }
    assert not any(".text_model." in k for k in sd if k.startswith("embedders.1."))


def test_legacy_extras_load_strictly(sd1, tok):
    """Real files carry position_ids (SD1) and logit_scale (OpenCLIP): accepted and dropped."""
    sd = dict(sd1.state_dict())
    sd["transformer.text_model.embeddings.position_ids"] = torch.arange(77.0)[None] + 1e-3
    fresh = CLIPTextEncoder(tiny(CLIP_L), tokenizer=tok)
    fresh.load_state_dict(sd, strict=True)
    ids = torch.tensor([tok("a cat")])
    assert torch.equal(fresh(ids)[0], sd1(ids)[0])
    big = randomize(CLIPTextEncoder(tiny(OPENCLIP_BIGG), tokenizer=tok))
    sd = dict(big.state_dict(), **{"model.logit_scale": torch.tensor(4.6)})
    CLIPTextEncoder(tiny(OPENCLIP_BIGG), tokenizer=tok).load_state_dict(sd, strict=True)


def test_openclip_module_also_loads_hf_names(tok):
    """A bigG module accepts HF key names under ``model.`` (e.g. converted files)."""
    big = randomize(CLIPTextEncoder(tiny(OPENCLIP_BIGG), tokenizer=tok), 3)
    hf = {"model." + k: v for k, v in big.clip.state_dict().items()}
    other = CLIPTextEncoder(tiny(OPENCLIP_BIGG), tokenizer=tok)
    other.load_state_dict(hf, strict=True)
    ids = torch.tensor([tok.with_pad(0)("a cat")])
    assert torch.equal(other(ids)[1], big(ids)[1])


def test_meta_construction_and_assign_load(sdxl, tok):
    sd = sdxl.state_dict()
    loaded = load_text_encoder(sd, "sdxl", like=[tiny(c) for c in text_configs("sdxl")])
    assert isinstance(loaded, TextConditioner)
    assert all(p.device.type == "cpu" for p in loaded.parameters())
    a, b = sdxl.encode_prompt("a (red:1.2) cat"), loaded.encode_prompt("a (red:1.2) cat")
    assert torch.equal(a.context, b.context) and torch.equal(a.pooled, b.pooled)
    half = load_text_encoder(sd, "sdxl", like=[tiny(c) for c in text_configs("sdxl")],
                             dtype=torch.bfloat16)
    out = half.encode_prompt("a cat")
    assert out.context.dtype == torch.bfloat16
    ref = sdxl.encode_prompt("a cat").context
    torch.testing.assert_close(out.context.float(), ref, atol=0.1, rtol=0.05)
    meta = CLIPTextEncoder(tiny(CLIP_L), device="meta")
    assert all(p.is_meta for p in meta.parameters())


def test_config_from_state_dict(sdxl, sd1):
    sd = sdxl.state_dict()
    l_sd = {k[len("embedders.0."):]: v for k, v in sd.items() if k.startswith("embedders.0.")}
    g_sd = {k[len("embedders.1."):]: v for k, v in sd.items() if k.startswith("embedders.1.")}
    assert text_config_from_state_dict(l_sd, like=tiny(CLIP_L_SDXL)) == tiny(CLIP_L_SDXL)
    assert text_config_from_state_dict(g_sd, like=tiny(OPENCLIP_BIGG)) == tiny(OPENCLIP_BIGG)
    # the diffusers folder layout (no "transformer." prefix) reads the same
    hf = {k[len("transformer."):]: v for k, v in sd1.state_dict().items()}
    assert text_config_from_state_dict(hf, like=tiny(CLIP_L)) == tiny(CLIP_L)
    # without ``like``: CLIP-L usage, head size 64
    guessed = text_config_from_state_dict({"transformer." + k: v for k, v in hf.items()} | {
        "transformer.text_model.embeddings.token_embedding.weight": torch.zeros(49408, 128)})
    assert (guessed.width, guessed.heads, guessed.layout) == (128, 2, "hf")


def test_truncated_copy_keeps_the_used_layer():
    """diffusers stores SD2's encoder with 23 of 24 layers and uses the last one; reading it
    with the SD2 preset must still pick that layer (clip skip 1, not 2)."""
    like = dataclasses.replace(tiny(OPENCLIP_H), layers=4)  # uses layer index 2 (skip 2)
    cut = randomize(CLIPTextEncoder(dataclasses.replace(like, layers=3, projection_dim=None,
                                                         layout="hf", default_clip_skip=1)))
    hf = {k[len("transformer."):]: v for k, v in cut.state_dict().items()}
    cfg = text_config_from_state_dict(hf, like=like)
    assert (cfg.layers, cfg.default_clip_skip, cfg.projection_dim) == (3, 1, None)
    full = text_config_from_state_dict(hf, like=dataclasses.replace(like, layers=3))
    assert full.default_clip_skip == 2


def test_clip_skip_range(sd1, tok):
    ids = torch.tensor([tok("a cat")])
    with pytest.raises(ValueError, match="clip_skip=4 is out of range for a 3-layer encoder"):
        sd1(ids, clip_skip=4)
    h1, h2, h3 = (sd1(ids, clip_skip=k)[0] for k in (1, 2, 3))
    assert not torch.allclose(h1, h2) and not torch.allclose(h2, h3)


def test_apply_token_weights_restores_mean():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 77, 8, generator=g) + 0.3
    w = torch.ones(2, 77)
    assert apply_token_weights(z, w) is z
    w[0, 3], w[1, 5:9] = 1.5, 0.7
    out = apply_token_weights(z, w)
    torch.testing.assert_close(out.mean(dim=(1, 2)), z.mean(dim=(1, 2)))
    expected0 = z[0] * w[0, :, None] * (z[0].mean() / (z[0] * w[0, :, None]).mean())
    torch.testing.assert_close(out[0], expected0)


def test_encode_prompt_shapes_and_weights(sd1, tok):
    out = sd1.encode_prompt("a photo of a cat")
    assert out.context.shape == (1, 77, 32) and out.pooled is None
    long = sd1.encode_prompt(" ".join(["cat"] * 100))
    assert long.context.shape == (1, 154, 32)
    # weighting == the unweighted context run through A1111's emphasis
    (chunk,) = tokenize_weighted("a photo of a (cat:1.4)", tok)
    plain = sd1(torch.tensor([chunk.ids]))[0]
    weighted = sd1.encode_prompt("a photo of a (cat:1.4)").context
    torch.testing.assert_close(weighted, apply_token_weights(plain, torch.tensor([chunk.weights])))
    assert not torch.allclose(weighted, plain)


def test_encode_prompts_pads_with_empty_chunks(sd1, tok):
    """Negative prompts shorter than the positive get empty-prompt chunks (A1111)."""
    pos = "a (cat:1.2), " + " ".join(["dog"] * 90)
    both = sd1.encode_prompts([pos, "blurry"])
    assert both.context.shape == (2, 154, 32)
    torch.testing.assert_close(both.context[0:1], sd1.encode_prompt(pos).context)
    empty = sd1.encode_prompt("").context
    neg = sd1.encode_prompt("blurry").context
    torch.testing.assert_close(both.context[1:], torch.cat([neg, empty], dim=1))
    torch.testing.assert_close(equalize_contexts([sd1.encode_prompt(pos).context, neg], empty)[1],
                               both.context[1:])
    chunks = [pad_chunks(tokenize_weighted("blurry", tok), 2, tok)]
    torch.testing.assert_close(sd1.encode_tokens(chunks).context, both.context[1:])


def test_encode_tokens_rejects_ragged(sd1, tok):
    a, b = tokenize_weighted("a", tok), tokenize_weighted("b " * 80, tok)
    with pytest.raises(ValueError, match=r"same, non-zero number of chunks, got \[1, 2\]"):
        sd1.encode_tokens([a, b])


def test_equalize_contexts_rejects_partial_chunks():
    with pytest.raises(ValueError, match="not whole 77-token chunks"):
        equalize_contexts([torch.zeros(1, 80, 4)], torch.zeros(1, 77, 4))


def test_sdxl_conditioner(sdxl):
    out = sdxl.encode_prompts(["a cat", "a dog " * 50])
    assert out.context.shape == (2, 154, 64) and out.pooled.shape == (2, 24)
    clip_l, big_g = sdxl.embedders
    l_out, g_out = clip_l.encode_prompt("a cat"), big_g.encode_prompt("a cat")
    torch.testing.assert_close(out.context[:1, :77], torch.cat([l_out.context, g_out.context], -1))
    torch.testing.assert_close(out.pooled[:1], g_out.pooled)
    assert l_out.pooled is None
    # bigG pads with 0, CLIP-L with the end token
    assert big_g.tokenizer.pad_id == 0 and clip_l.tokenizer.pad_id == 49407
    assert big_g.tokenizer._backend is clip_l.tokenizer._backend


def test_refiner_and_own_model(tok):
    refiner = build_text_encoder("sdxl_refiner", configs=[tiny(OPENCLIP_BIGG)], tokenizer=tok)
    assert list(refiner.state_dict())[0].startswith("embedders.0.model.")
    out = refiner.encode_prompt("a cat")
    assert out.context.shape == (1, 77, 32) and out.pooled.shape == (1, 24)
    own = build_text_encoder("clip", configs=[TextEncoderConfig(width=64, layers=2, heads=2,
                                                                mlp_width=128)], tokenizer=tok)
    assert own.encode_prompt("a cat").context.shape == (1, 77, 64)
