"""LoRA files (kohya / AUTOMATIC1111 and diffusers / PEFT): reading, merging, removing.

A LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") changes a layer's
weight ``W`` (linear ``[out, in]`` or conv ``[out, in, kh, kw]``) to
``W + weight * scale * up @ down`` with ``down`` ``[rank, in(, kh, kw)]``, ``up``
``[out, rank(, 1, 1)]`` and ``scale = alpha / rank`` (1 when the file stores no alpha).

Key layouts read:

* kohya: ``lora_unet_<module path with "_">.lora_down.weight`` / ``.lora_up.weight`` /
  ``.alpha``; U-Net paths in diffusers names (SD 1/2) or original names (SDXL), mapped by
  ``unet_keys.unet_kohya_module_map``; text encoders ``lora_te_`` (one encoder; SDXL's first),
  ``lora_te1_`` / ``lora_te2_`` (SDXL CLIP-L / bigG), with transformers' CLIP names
  (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``). Linear and conv layers, including
  3x3 conv ("LoCon") LoRAs.
* diffusers / PEFT: ``unet.<diffusers module>.lora_A.weight`` / ``.lora_B.weight`` (also without
  the ``unet.`` prefix, or under PEFT's ``base_model.model.``), ``text_encoder.`` /
  ``text_encoder_2.`` + transformers CLIP names; older diffusers spellings ``.lora.down/up``,
  ``.lora_linear_layer.down/up`` and ``.processor.to_q_lora.down``. Alpha from a ``.alpha`` key,
  the safetensors ``lora_adapter_metadata`` (``unet.lora_alpha``, ``unet.use_rslora``) or a PEFT
  ``adapter_config.json`` next to the file; none means scale 1.

Applying: merged into the weights, as AUTOMATIC1111 does, so inference runs at full speed and
any backend that reads the module weights sees the LoRA. Each touched layer's original weight
*Parameter* is kept (not a copy of it: the merged weight is a new tensor), and
:meth:`LoraHandle.remove` puts the very same Parameters back, so removal is exact and needs no
reloading. Several LoRAs applied in one call are summed in float32 before a single rounding
to the layer's dtype. A LoRA takes one weight, or separate U-Net and text-encoder weights;
layers whose weight is 0 are left untouched.

Copy-on-write (:func:`lora_bundle`): the LoRAs are merged into a clone of the module trees that
shares every weight tensor with the original, so the original bundle (a model cache's entry,
other threads) never changes; the copy costs the memory of the touched layers only.

Unknown keys are an **error** by default (naming a few of them and what names were expected),
because a LoRA for another model family or an unsupported LoRA type (LyCORIS LoHa/LoKr, DoRA)
would otherwise be applied half; ``strict=False`` turns this into a warning and applies the rest.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from noisecraft.checkpoints.files import CheckpointError, StateDictFile, open_state_dict
from noisecraft.checkpoints.text_keys import LAYOUT_PREFIX
from noisecraft.checkpoints.unet_keys import unet_kohya_module_map, unet_module_map
from noisecraft.models.family import ModelBundle

_MAX_LISTED = 5
_KOHYA = re.compile(r"^(lora_(?:unet|te\d?)_\w+)\.(lora_down\.weight|lora_up\.weight|alpha)$")
_PEFT = re.compile(
    r"^(.+?)\.(lora_A\.weight|lora_B\.weight|lora_A\.default\.weight|lora_B\.default\.weight"
    r"|lora\.down\.weight|lora\.up\.weight|lora_linear_layer\.down\.weight"
    r"|lora_linear_layer\.up\.weight|alpha)$"
)
_PROCESSOR = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_A.weight": "down",
         "lora_B.weight": "up", "lora_A.default.weight": "down", "lora_B.default.weight": "up",
         "lora.down.weight": "down", "lora.up.weight": "up", "lora_linear_layer.down.weight":
         "down", "lora_linear_layer.up.weight": "up", "alpha": "alpha"}
# text-encoder prefixes per arrangement -> index of the encoder (in TextConditioner.embedders)
KOHYA_TEXT = {"sd1": {"lora_te_": 0}, "sd2": {"lora_te_": 0}, "clip": {"lora_te_": 0},
              "sdxl": {"lora_te_": 0, "lora_te1_": 0, "lora_te2_": 1},
              "sdxl_refiner": {"lora_te2_": 0}}
PEFT_TEXT = {"sd1": {"text_encoder.": 0}, "sd2": {"text_encoder.": 0},
             "clip": {"text_encoder.": 0},
             "sdxl": {"text_encoder.": 0, "text_encoder_2.": 1},
             "sdxl_refiner": {"text_encoder_2.": 0}}
PEFT_UNET_PREFIXES = ("unet.", "base_model.model.", "")


@dataclass(frozen=True)
class LoraLayer:
    """One layer's low-rank update: ``part`` is ``"unet"`` or ``"text_encoder"`` (a bundle
    attribute) and ``module`` the path of the target layer inside it."""

    part: str
    module: str
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None
    name: str

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """``scale * up @ down`` in float32, shaped ``[out, in(, kh, kw)]``."""
        w = self.up.flatten(1).float() @ self.down.flatten(1).float()
        return (self.scale * w).reshape(self.up.shape[0], *self.down.shape[1:])


# ---- naming: which module does a LoRA key address -------------------------------------------


def _encoders(bundle: ModelBundle) -> list[tuple[str, nn.Module]]:
    """(path prefix inside bundle.text_encoder, encoder) for each text encoder."""
    text = bundle.text_encoder
    if hasattr(text, "embedders"):
        return [(f"embedders.{i}.", e) for i, e in enumerate(text.embedders)]
    return [("", text)]


def _text_modules(prefix: str, encoder: nn.Module) -> dict[str, str]:
    """``{transformers CLIP module name: path inside bundle.text_encoder}`` of weighted layers."""
    inner = prefix + LAYOUT_PREFIX[encoder.config.layout] + "text_model."
    return {"text_model." + n: inner + n for n, m in encoder.text_model.named_modules()
            if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.ndim >= 2}


def lora_name_table(bundle: ModelBundle) -> dict[str, tuple[str, str]]:
    """``{name a LoRA file may use for a layer: (bundle part, module path)}`` (kohya names and
    diffusers/PEFT names with their prefixes), for this bundle's architecture."""
    table = {k: ("unet", o) for k, o in unet_kohya_module_map(bundle.unet.config).items()}
    for d, o in unet_module_map(bundle.unet.config).items():
        for prefix in PEFT_UNET_PREFIXES:
            table[prefix + d] = table[prefix + o] = ("unet", o)
    encoders = _encoders(bundle)
    arrangement = bundle.family.text
    for kind in (KOHYA_TEXT, PEFT_TEXT):
        for head, index in kind.get(arrangement, {}).items():
            if index >= len(encoders):
                continue
            for hf, path in _text_modules(*encoders[index]).items():
                name = head + (hf.replace(".", "_") if kind is KOHYA_TEXT else hf)
                table[name] = ("text_encoder", path)
    return table


def _group(keys: Sequence[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """``{layer name: {"down"|"up"|"alpha": file key}}`` and the keys that fit no pattern."""
    groups: dict[str, dict[str, str]] = {}
    unknown = []
    for key in keys:
        if m := _PROCESSOR.match(key):
            target = m.group(2) if m.group(2) != "to_out" else "to_out.0"
            groups.setdefault(f"{m.group(1)}.{target}", {})[m.group(3)] = key
        elif m := (_KOHYA.match(key) or _PEFT.match(key)):
            groups.setdefault(m.group(1), {})[_ROLE[m.group(2)]] = key
        else:
            unknown.append(key)
    return groups, unknown


# ---- alpha ------------------------------------------------------------------------------------


def _adapter_metadata(f: StateDictFile) -> dict:
    """PEFT settings: the file's ``lora_adapter_metadata`` or a sibling adapter_config.json."""
    raw = f.metadata.get("lora_adapter_metadata")
    sidecar = f.path.parent / "adapter_config.json"
    try:
        if raw is not None:
            return json.loads(raw)
        if sidecar.is_file():
            return json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f.path, f"LoRA adapter metadata is not valid JSON ({e})") from None
    return {}


def _alpha(f: StateDictFile, name: str, group: dict[str, str], rank: int,
           meta: dict) -> float | None:
    if "alpha" in group:
        return float(f[group["alpha"]].float())
    component = name.split(".", 1)[0] + "." if "." in name else ""
    value = meta.get(component + "lora_alpha", meta.get("lora_alpha"))
    if value is None:
        return None
    if meta.get(component + "use_rslora", meta.get("use_rslora")):
        return float(value) * rank / rank**0.5  # rsLoRA: scale alpha / sqrt(rank)
    return float(value)


# ---- reading ----------------------------------------------------------------------------------


def _listed(items) -> str:
    items = sorted(items)
    more = f" (and {len(items) - _MAX_LISTED} more)" if len(items) > _MAX_LISTED else ""
    return ", ".join(items[:_MAX_LISTED]) + more


def _check_shape(path, name: str, layer: LoraLayer, weight: torch.Tensor) -> None:
    want = tuple(weight.shape)
    got = (layer.up.shape[0], *layer.down.shape[1:])
    linear_vs_1x1 = got[:2] == want[:2] and all(s == 1 for s in got[2:] + want[2:])
    if (got != want and not linear_vs_1x1) or layer.up.shape[1] != layer.rank:
        raise CheckpointError(
            path,
            f"LoRA layer {name!r} (down {tuple(layer.down.shape)}, up {tuple(layer.up.shape)}) "
            f"does not fit {layer.part}.{layer.module}.weight {want}: a LoRA for another model?",
        )


def read_lora(path: str | os.PathLike, bundle: ModelBundle, *,
              strict: bool = True) -> list[LoraLayer]:
    """The layers of a LoRA file, resolved against ``bundle``'s modules (nothing applied).

    Raises CheckpointError for keys that address no layer of this model (with ``strict``;
    otherwise a warning lists them), for an unpaired down/up, or for shapes that do not fit.
    """
    table = lora_name_table(bundle)
    with open_state_dict(path) as f:
        groups, unknown = _group(f.keys())
        meta = _adapter_metadata(f)
        layers = []
        for name, group in sorted(groups.items()):
            if name not in table:
                unknown.extend(group.values())
                continue
            if "down" not in group or "up" not in group:
                raise CheckpointError(f.path, f"LoRA layer {name!r} has only "
                                              f"{sorted(group)}; it needs both down and up")
            part, module = table[name]
            down, up = f[group["down"]].clone(), f[group["up"]].clone()
            layer = LoraLayer(part, module, down, up,
                              _alpha(f, name, group, down.shape[0], meta), name)
            _check_shape(f.path, name, layer, getattr(bundle, part).get_submodule(module).weight)
            layers.append(layer)
    _report_unknown(Path(path), unknown, bool(layers), strict, table)
    return layers


def _report_unknown(path: Path, unknown: list[str], any_known: bool, strict: bool,
                    table: Mapping[str, tuple[str, str]]) -> None:
    if not unknown and any_known:
        return
    examples = [n for n in ("lora_unet_" + "down_blocks_1_attentions_0_proj_in",
                            "lora_unet_input_blocks_4_1_proj_in",
                            "unet.down_blocks.1.attentions.0.proj_in") if n in table][:2]
    problem = (
        f"{len(unknown)} LoRA key(s) address no layer of this model: {_listed(unknown)}. "
        f"Expected kohya names (e.g. {examples[0] if examples else 'lora_unet_...'}"
        ".lora_down.weight / .lora_up.weight / .alpha) or diffusers/PEFT names "
        "(unet.<module>.lora_A.weight / lora_B.weight) for this model's family; LyCORIS "
        "LoHa/LoKr and DoRA files are not supported"
    )
    if not any_known:
        raise CheckpointError(path, "no usable LoRA layers. " + problem)
    if strict:
        raise CheckpointError(path, problem + "; pass strict=False to apply the rest")
    warnings.warn(f"{path}: {problem}; they were skipped", stacklevel=3)


# ---- applying ---------------------------------------------------------------------------------


class LoraHandle:
    """Merged LoRAs; :meth:`remove` restores the original weight Parameters exactly.

    Several handles stack; remove them in reverse order (the last applied first).
    Usable as a context manager: ``with apply_loras(bundle, [...]): ...``.
    """

    def __init__(self, swaps: list[tuple[nn.Module, nn.Parameter, nn.Parameter]],
                 loras: list[tuple[str, float, float]]):
        self._swaps = swaps
        self.loras = loras

    @property
    def active(self) -> bool:
        return bool(self._swaps)

    def remove(self) -> None:
        """Put the original weights back (idempotent)."""
        stale = [m for m, _, installed in self._swaps if m.weight is not installed]
        if stale:
            raise RuntimeError(
                f"{len(stale)} layer(s) were changed after these LoRAs {self.loras} were applied "
                "(another LoRA applied later?); remove LoRA handles in reverse order of applying"
            )
        for module, original, _ in reversed(self._swaps):
            module.weight = original
        self._swaps = []

    def __enter__(self) -> LoraHandle:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


LoraWeights = tuple[str | os.PathLike, float] | tuple[str | os.PathLike, float, float]
"""``(file, weight)`` or ``(file, unet_weight, text_encoder_weight)``."""


def _part_weights(entry: Sequence) -> tuple[str | os.PathLike, float, float]:
    if len(entry) == 2:
        return entry[0], float(entry[1]), float(entry[1])
    if len(entry) == 3:
        return entry[0], float(entry[1]), float(entry[2])
    raise ValueError(f"a LoRA entry is (file, weight) or (file, unet_weight, "
                     f"text_encoder_weight), got {entry!r:.80}")


def apply_loras(
    bundle: ModelBundle,
    loras: Sequence[LoraWeights],
    *,
    strict: bool = True,
) -> LoraHandle:
    """Merge LoRA files, each with its weight (or its U-Net and text-encoder weights), into
    ``bundle``'s U-Net and text encoder(s) in place.

    All files are read and checked before any weight changes; layers of a part whose weight
    is 0 are not touched. Returns a handle whose ``remove()`` restores the model exactly.
    """
    entries = [_part_weights(e) for e in loras]
    totals: dict[tuple[str, str], torch.Tensor] = {}
    for path, unet_weight, text_weight in entries:
        for layer in read_lora(path, bundle, strict=strict):
            weight = unet_weight if layer.part == "unet" else text_weight
            if weight == 0:
                continue
            key = (layer.part, layer.module)
            delta = weight * layer.delta()
            totals[key] = totals[key] + delta if key in totals else delta
    swaps = []
    with torch.no_grad():
        for (part, module_path), delta in totals.items():
            module = getattr(bundle, part).get_submodule(module_path)
            original = module.weight
            merged = original.float() + delta.to(original.device).reshape(original.shape)
            installed = nn.Parameter(merged.to(original.dtype),
                                     requires_grad=original.requires_grad)
            module.weight = installed
            swaps.append((module, original, installed))
    return LoraHandle(swaps, [(str(p), u, t) for p, u, t in entries])


def clone_module(module: nn.Module) -> nn.Module:
    """A new module tree sharing every parameter and buffer (and tokenizer) with ``module``."""
    memo = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    for sub in module.modules():
        tok = getattr(sub, "_tokenizer", None)
        if tok is not None:
            memo[id(tok)] = tok
    return copy.deepcopy(module, memo)


def lora_bundle(bundle: ModelBundle, loras: Sequence[LoraWeights], *,
                strict: bool = True) -> ModelBundle:
    """A copy of ``bundle`` with LoRAs merged (copy-on-write: see the module docstring).

    Only the parts a non-zero weight touches are cloned; ``bundle`` itself is never changed.
    """
    entries = [e for e in map(_part_weights, loras) if e[1] != 0 or e[2] != 0]
    clones = {}
    if any(u != 0 for _, u, _ in entries):
        clones["unet"] = clone_module(bundle.unet)
    if any(t != 0 for _, _, t in entries):
        clones["text_encoder"] = clone_module(bundle.text_encoder)
    if not clones:
        return bundle
    copy_ = replace(bundle, **clones, extras=dict(bundle.extras))
    apply_loras(copy_, entries, strict=strict)  # zero weights leave the shared part alone
    return copy_
