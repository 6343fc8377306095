"""The trainable LoRA network: low-rank adapters hooked onto a loaded model's layers.

Each adapted layer ``base`` (an ``nn.Linear``, or an ``nn.Conv2d`` such as SD1's 1x1
``proj_in`` / ``proj_out``) gets a :class:`LoRAModule` (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models")::

    y = base(x) + (alpha / rank) * up(down(x))

``down`` ``[rank, in(, kh, kw)]`` starts Kaiming-uniform (as in kohya's sd-scripts and PEFT),
``up`` ``[out, rank(, 1, 1)]`` starts at zero, so before the first step the model computes
exactly what the base model computes.  For a conv layer ``down`` is a conv with the base's
kernel, stride, padding and dilation and ``up`` a 1x1 conv (kohya's layout), so that
``up @ down`` reshaped is a weight delta of the base weight's shape: what
``noisecraft.checkpoints.lora`` merges when it applies the saved file.

The module is added to the base layer's output by a forward hook (:meth:`LoRANetwork.attach`):
the base model keeps its modules, names and state dict; freezing its weights is the trainer's
job.

Names.  The network's submodules carry kohya's names, so ``network.state_dict()`` is the LoRA
file: ``lora_unet_<module path with _>.lora_down.weight``, ``.lora_up.weight`` and ``.alpha``
(``lora_te_...`` for the text encoder).  The names are not built here: :func:`kohya_names`
inverts the reader's own table (``checkpoints.lora.lora_name_table``), so every name written
is one the loader resolves to the very layer that was trained.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from noisecraft.checkpoints.lora import lora_name_table
from noisecraft.models.family import ModelBundle
from noisecraft.training.state import atomic_save

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                "ff.net.2")
"""U-Net layers a LoRA can adapt, by the last part of their module path: the attention
projections (self- and cross-attention), the transformers' in/out projections and their
feed-forward layers."""
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
"""Text-encoder layers (transformers' CLIP names): attention projections and the MLP."""
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""diffusers' ``train_text_to_image_lora.py`` default: the attention projections."""
SDXL_ARRANGEMENTS = ("sdxl", "sdxl_refiner")


@dataclass(frozen=True)
class LoRANetworkConfig:
    """Rank, alpha and which layers get adapters.

    ``alpha`` None means ``alpha = rank`` (scale 1, diffusers' choice; kohya's default is 1,
    i.e. scale ``1 / rank``).  ``unet_targets`` / ``text_targets`` name layers by the end of
    their module path (:data:`UNET_TARGETS`, :data:`TEXT_TARGETS`); empty text targets leave
    the text encoder untouched.
    """

    rank: int = 4
    alpha: float | None = None
    unet_targets: tuple[str, ...] = DEFAULT_UNET_TARGETS
    text_targets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "unet_targets", tuple(self.unet_targets))
        object.__setattr__(self, "text_targets", tuple(self.text_targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank={self.rank!r} must be an integer >= 1 (e.g. 4, 8, 16)")
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoRA alpha={self.alpha} must be > 0 (or None: alpha = rank)")
        for field, given, allowed in (("unet_targets", self.unet_targets, UNET_TARGETS),
                                      ("text_targets", self.text_targets, TEXT_TARGETS)):
            unknown = [t for t in given if t not in allowed]
            if unknown:
                raise ValueError(f"{field}: unknown layer name(s) {unknown}; allowed: "
                                 f"{', '.join(allowed)}")
        if not self.unet_targets and not self.text_targets:
            raise ValueError("LoRA network has no targets: give unet_targets and/or "
                             f"text_targets (allowed: {', '.join(UNET_TARGETS + TEXT_TARGETS)})")

    @property
    def effective_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)


class LoRAModule(nn.Module):
    """``(alpha / rank) * up(down(x))`` for one base layer (see the module docstring)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float):
        super().__init__()
        factory = {"device": base.weight.device, "dtype": torch.float32}
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, rank, bias=False, **factory)
            self.lora_up = nn.Linear(rank, base.out_features, bias=False, **factory)
        elif isinstance(base, nn.Conv2d) and base.groups == 1:
            self.lora_down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride,
                                       base.padding, base.dilation, bias=False, **factory)
            self.lora_up = nn.Conv2d(rank, base.out_channels, 1, bias=False, **factory)
        else:
            raise TypeError(f"a LoRA adapts nn.Linear or ungrouped nn.Conv2d layers, not "
                            f"{base.__class__.__name__}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.register_buffer("alpha", torch.tensor(float(alpha)))

    @property
    def rank(self) -> int:
        return self.lora_down.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x)) * (self.alpha / self.rank)


def kohya_names(bundle: ModelBundle) -> dict[tuple[str, str], str]:
    """``{(bundle part, module path): kohya name}`` for every layer a kohya file can address.

    The inverse of the kohya entries of ``lora_name_table(bundle)`` (the reader's table),
    choosing, where it accepts two names for one layer, the one kohya's sd-scripts writes:
    diffusers module paths for SD 1/2 U-Nets (``lora_unet_down_blocks_0_attentions_0_...``),
    original paths for SDXL (``lora_unet_input_blocks_4_1_...``); ``lora_te1_`` / ``lora_te2_``
    for SDXL's two text encoders, ``lora_te_`` for a single one.
    """
    sdxl = bundle.family.text in SDXL_ARRANGEMENTS
    ranked: dict[tuple[str, str], tuple[bool, str]] = {}
    for name, (part, module) in lora_name_table(bundle).items():
        if not name.startswith(("lora_unet_", "lora_te")):
            continue  # a diffusers / PEFT name
        if part == "unet":
            original = name == "lora_unet_" + module.replace(".", "_")
            preferred = original == sdxl
        else:
            preferred = name.startswith(("lora_te1_", "lora_te2_")) == sdxl
        best = ranked.get((part, module))
        if best is None or (preferred, name) > best:
            ranked[(part, module)] = (preferred, name)
    return {target: name for target, (_, name) in ranked.items()}


def _matches(path: str, targets: Sequence[str]) -> bool:
    return any(path == t or path.endswith("." + t) for t in targets)


class LoRANetwork(nn.Module):
    """The adapters of one model: submodules named with kohya names (``state_dict()`` is the
    file's content), each bound to its base layer; :meth:`attach` / :meth:`detach` hook them
    into the base model's forward."""

    def __init__(self, layers: Sequence[tuple[str, nn.Module]], rank: int, alpha: float):
        super().__init__()
        self._bases: dict[str, nn.Module] = {}
        for name, base in layers:
            self.add_module(name, LoRAModule(base, rank, alpha))
            self._bases[name] = base
        self._hooks: list = []

    @classmethod
    def for_bundle(cls, bundle: ModelBundle, config: LoRANetworkConfig) -> LoRANetwork:
        """Adapters on the layers of ``bundle`` that ``config`` targets, in model order."""
        names = kohya_names(bundle)
        layers = []
        for part, targets in (("unet", config.unet_targets),
                              ("text_encoder", config.text_targets)):
            found = [(names[(part, path)], module)
                     for path, module in getattr(bundle, part).named_modules()
                     if (part, path) in names and _matches(path, targets)
                     and isinstance(module, (nn.Linear, nn.Conv2d))]
            if targets and not found:
                raise ValueError(f"no layer of {bundle.name!r}'s {part} matches {list(targets)}"
                                 f"; its kohya-addressable layers are e.g. "
                                 f"{sorted(n for (p, _), n in names.items() if p == part)[:3]}")
            layers += found
        return cls(layers, config.rank, config.effective_alpha)

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def attach(self) -> LoRANetwork:
        """Add each adapter's output to its base layer's output (in every forward call)."""
        if self.attached:
            raise RuntimeError("this LoRA network is already attached; detach() it first")
        for name, lora in self.named_children():
            self._hooks.append(self._bases[name].register_forward_hook(_adding(lora)))
        return self

    def detach(self) -> None:
        """Remove the hooks: the base model computes what it computed before (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def parts(self) -> set[str]:
        """The bundle parts adapted: ``"unet"`` and/or ``"text_encoder"``."""
        return {"unet" if name.startswith("lora_unet_") else "text_encoder"
                for name, _ in self.named_children()}


def _adding(lora: LoRAModule):
    def hook(_module, args, output):
        return output + lora(args[0]).to(output.dtype)
    return hook


def save_lora_file(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                   metadata: Mapping[str, str], *, dtype: torch.dtype | None = None) -> Path:
    """Write a kohya-format LoRA ``.safetensors`` (``tensors`` = a network's state dict);
    ``dtype`` (e.g. float16) casts the weights, never the alphas."""
    out = {k: v.to(dtype) if dtype is not None and not k.endswith(".alpha") else v
           for k, v in tensors.items()}
    atomic_save(out, Path(path), metadata)
    return Path(path)
