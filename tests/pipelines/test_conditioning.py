"""Prompt -> cond/uncond: keys per family, weighting, chunking, clip skip, equal lengths."""

from __future__ import annotations

import torch

from noisecraft.conditioning import encode_conditioning
from tests.pipelines.tiny import shared_bundle


def enc(prompt, negative="", **kw):
    return encode_conditioning(shared_bundle("sd1"), prompt, negative, width=64, height=64, **kw)


def test_sd1_has_context_only_and_one_chunk():
    c = enc("a red circle", "blurry")
    assert set(c.cond) == set(c.uncond) == {"context"}
    assert c.cond["context"].shape == c.uncond["context"].shape == (1, 77, 32)


def test_long_prompt_is_chunked_and_negative_padded_to_equal_length():
    long = ", ".join(f"word{i}" for i in range(60))  # well over 75 tokens
    c = enc(long, "blurry")
    assert c.cond["context"].shape[1] % 77 == 0 and c.cond["context"].shape[1] >= 154
    assert c.uncond["context"].shape == c.cond["context"].shape
    short = enc("word0", "blurry")
    assert not torch.equal(c.cond["context"][:, :77], short.cond["context"])


def test_weighting_syntax_changes_the_embedding():
    plain, weighted = enc("a red circle"), enc("a (red:1.5) circle")
    assert not torch.allclose(plain.cond["context"], weighted.cond["context"])
    assert torch.equal(plain.uncond["context"], weighted.uncond["context"])


def test_clip_skip_selects_another_layer():
    assert not torch.allclose(enc("a cat").cond["context"],
                              enc("a cat", clip_skip=2).cond["context"])
