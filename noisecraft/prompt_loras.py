"""AUTOMATIC1111's LoRA prompt tags, as pure text functions (no files are touched here).

A prompt names a LoRA as ``<lora:NAME>`` (weight 1), ``<lora:NAME:WEIGHT>``,
``<lora:NAME:TE_WEIGHT:UNET_WEIGHT>`` or with named weights ``<lora:NAME:te=0.5:unet=1>``.
The rules are A1111's (``modules/extra_networks.py`` ``parse_prompt`` and the built-in Lora
extension's ``extra_networks_lora.py``):

* a tag matches ``<lora:([^>]+)>`` and its text is split at ``:``; items holding one ``=`` are
  named (``te``, ``unet``), the others positional;
* the first number is the text-encoder weight, and the U-Net's too unless a second number
  gives that one; ``te=`` / ``unet=`` override them; no number means 1.0;
* the tag is removed from the prompt and nothing else is (the text around it stays as
  written), so ``"a cat, <lora:style:0.5>"`` is encoded as ``"a cat, "``.

A1111's fourth positional item (``dyn``, a dynamic rank) is refused rather than ignored:
noisecraft merges the full rank, which would give another image than A1111 does.
"""

from __future__ import annotations

import math
import re
from typing import NamedTuple

from noisecraft.request import InputError

LORA_TAG = re.compile(r"<lora:([^>]+)>")
TAG_FORMS = "<lora:NAME>, <lora:NAME:WEIGHT> or <lora:NAME:TE_WEIGHT:UNET_WEIGHT>"


class LoraTag(NamedTuple):
    """One ``<lora:...>`` tag: the LoRA's name, its weights, and the tag as written."""

    name: str
    unet_weight: float
    text_encoder_weight: float
    text: str


def _number(value: str, what: str, tag: str, where: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InputError(f"{where}: the {what} {value.strip()!r} in {tag} is not a finite "
                         f"number; write {TAG_FORMS}")
    return number


def parse_lora_tag(tag: str, where: str = "prompt") -> LoraTag:
    """The :class:`LoraTag` of one tag text ``<lora:...>``; an InputError says what is wrong."""
    m = LORA_TAG.fullmatch(tag)
    if m is None:
        raise InputError(f"{where}: {tag!r} is not a LoRA tag; write {TAG_FORMS}")
    positional, named = [], {}
    for item in m.group(1).split(":"):
        parts = item.split("=")
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1]
        else:
            positional.append(item)
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown:
        raise InputError(f"{where}: {tag} sets {', '.join(unknown)}; a LoRA tag takes only "
                         "te= and unet= (text-encoder and U-Net weights)")
    if len(positional) > 3:
        raise InputError(f"{where}: {tag} has {len(positional) - 1} numbers; noisecraft takes "
                         f"at most two (A1111's third, a dynamic rank, is not supported); "
                         f"write {TAG_FORMS}")
    name = positional[0].strip() if positional else ""
    if not name:
        raise InputError(f"{where}: {tag} names no LoRA; write {TAG_FORMS}")
    te = _number(positional[1], "weight", tag, where) if len(positional) > 1 else 1.0
    te = _number(named["te"], "te weight", tag, where) if "te" in named else te
    unet = _number(positional[2], "U-Net weight", tag, where) if len(positional) > 2 else te
    unet = _number(named["unet"], "unet weight", tag, where) if "unet" in named else unet
    return LoraTag(name, unet, te, tag)


def split_lora_tags(text: str, where: str = "prompt") -> tuple[str, list[LoraTag]]:
    """``text`` without its ``<lora:...>`` tags (what the text encoder sees), and the tags in
    the order they appear.  ``where`` names the text in error messages."""
    tags: list[LoraTag] = []

    def take(m: re.Match) -> str:
        tags.append(parse_lora_tag(m.group(0), where))
        return ""

    return LORA_TAG.sub(take, text), tags
