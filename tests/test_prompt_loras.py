"""AUTOMATIC1111's ``<lora:...>`` prompt tags: weights as A1111 reads them, the tag (and only
the tag) removed from the text, and errors that name the tag."""

from __future__ import annotations

import pytest

from noisecraft.prompt_loras import LoraTag, parse_lora_tag, split_lora_tags
from noisecraft.request import InputError


@pytest.mark.parametrize("tag, name, unet, te", [
    ("<lora:style>", "style", 1.0, 1.0),
    ("<lora:style:0.7>", "style", 0.7, 0.7),
    ("<lora:style:-1.5>", "style", -1.5, -1.5),
    ("<lora:style:0.2:0.9>", "style", 0.9, 0.2),  # A1111: <lora:NAME:TE:UNET>
    ("<lora:style:te=0.3>", "style", 0.3, 0.3),
    ("<lora:style:0.5:unet=0>", "style", 0.0, 0.5),
    ("<lora:style:unet=0.25:te=2>", "style", 0.25, 2.0),
    ("<lora:people/anna v2: 0.5 >", "people/anna v2", 0.5, 0.5),
])
def test_tag_weights_follow_a1111(tag, name, unet, te):
    assert parse_lora_tag(tag) == LoraTag(name, unet, te, tag)


def test_tags_are_removed_and_nothing_else():
    text, tags = split_lora_tags("a cat, <lora:style:0.5> on a mat<lora:b>, (red:1.2)")
    assert text == "a cat,  on a mat, (red:1.2)"
    assert [(t.name, t.unet_weight) for t in tags] == [("style", 0.5), ("b", 1.0)]
    assert split_lora_tags("<lyco:x:1> <hypernet:y> no tags") == (
        "<lyco:x:1> <hypernet:y> no tags", [])


@pytest.mark.parametrize("tag, message", [
    ("<lora:style:abc>", r"weight 'abc' in <lora:style:abc> is not a finite number"),
    ("<lora:style:nan>", r"weight 'nan' .* is not a finite number"),
    ("<lora:style:1:inf>", r"U-Net weight 'inf' .* is not a finite number"),
    ("<lora:style:te=x>", r"te weight 'x'"),
    ("<lora::0.5>", r"names no LoRA"),
    ("<lora:style:1:1:8>", r"has 3 numbers; noisecraft takes at most two"),
    ("<lora:style:lbw=1>", r"sets lbw; a LoRA tag takes only te= and unet="),
])
def test_bad_tags_say_what_is_wrong(tag, message):
    with pytest.raises(InputError, match=message) as e:
        split_lora_tags(f"a cat {tag}", "negative prompt")
    assert str(e.value).startswith("negative prompt: ")
    assert "<lora:NAME:WEIGHT>" in str(e.value) or "te=" in str(e.value)
