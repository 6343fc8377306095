"""Which model family a checkpoint belongs to, read from key names and tensor shapes.

:func:`detect_family` looks at an original-layout (A1111/ComfyUI/CivitAI) single-file state dict:

* **U-Net** (``model.diffusion_model.*``, required): SDXL-style vector conditioning
  (``label_emb``) or not, the cross-attention width (``attn2.to_k`` input: 768 SD1, 1024 SD2,
  2048 SDXL, 1280 refiner), linear vs 1x1-conv ``proj_in`` (SD2/SDXL vs SD1), input channels
  (9 = inpainting).
* **Text encoders**, whose layout names the arrangement: ``cond_stage_model.transformer.*``
  (SD1, transformers names), ``cond_stage_model.model.*`` (SD2, OpenCLIP names),
  ``conditioner.embedders.0.transformer.*`` + ``conditioner.embedders.1.model.*`` (SDXL),
  ``conditioner.embedders.0.model.*`` alone (SDXL refiner). When the file has no text encoder,
  the U-Net's cross-attention width and projection decide.
* **Prediction type**: an explicit top-level ``v_pred`` key (and ``ztsnr`` for zero terminal
  SNR), as some fine-tunes carry (ComfyUI's convention), means v-prediction. SD2 files have no
  marker: ComfyUI's *heuristic* is applied, v-prediction when the standard deviation (biased) of
  ``output_blocks.11.1.transformer_blocks.0.norm1.bias`` exceeds 0.09; it is a heuristic fitted to
  the released SD 2.x weights (768-v above, 512-base below), not a guarantee: pass
  ``family="sd2"`` / ``"sd2-v"`` to overrule it. For U-Nets of other sizes the last output block
  with a transformer is used (``output_blocks.11`` in SD2). Inpainting SD2 U-Nets are eps, as
  released.

Widths of test-sized models differ from the released ones, so the text layout and the presence
of ``label_emb`` weigh more than widths.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from noisecraft.checkpoints.files import CheckpointError, StateDictFile, open_state_dict
from noisecraft.models.family import FAMILIES

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
V_PRED_KEY = "v_pred"
ZTSNR_KEY = "ztsnr"
SD2_V_STD_THRESHOLD = 0.09

# text arrangement (Family.text) -> prefixes that must all be present in the file
TEXT_LAYOUTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sdxl", ("conditioner.embedders.0.transformer.", "conditioner.embedders.1.model.")),
    ("sdxl_refiner", ("conditioner.embedders.0.model.",)),
    ("sd2", ("cond_stage_model.model.",)),
    ("sd1", ("cond_stage_model.transformer.",)),
)
_ARRANGEMENT_FAMILY = {"sd1": "sd1", "sd2": "sd2", "sdxl": "sdxl", "sdxl_refiner": "sdxl-refiner"}
_MAX_LISTED = 6


class _Source:
    """Shapes (and, rarely, values) of a state dict or an open file, by name."""

    def __init__(self, src: StateDictFile | Mapping[str, torch.Tensor]):
        self.src = src
        self.path = str(src.path) if isinstance(src, StateDictFile) else "<state dict>"
        self.keys = list(src.keys())

    def shape(self, key: str) -> tuple[int, ...]:
        if isinstance(self.src, StateDictFile):
            return self.src.shape(key)
        return tuple(self.src[key].shape)

    def tensor(self, key: str) -> torch.Tensor:
        return self.src[key]


def text_arrangement(keys) -> str | None:
    """The text arrangement whose key layout ``keys`` contain, or None (no text encoder)."""
    keys = list(keys)
    for arrangement, prefixes in TEXT_LAYOUTS:
        if all(any(k.startswith(p) for k in keys) for p in prefixes):
            return arrangement
    return None


def _roots(keys) -> list[str]:
    roots = sorted({".".join(k.split(".")[:2]) for k in keys})
    return roots[:_MAX_LISTED] + (["..."] if len(roots) > _MAX_LISTED else [])


def _unet_evidence(src: _Source) -> dict[str, Any]:
    conv_in = UNET_PREFIX + "input_blocks.0.0.weight"
    if conv_in not in src.keys:
        raise CheckpointError(
            src.path,
            "unknown architecture: no Stable Diffusion U-Net found (expected "
            f"{conv_in!r} and the rest of the original LDM/SGM layout: {UNET_PREFIX}input_blocks.N,"
            f" middle_block, output_blocks.N). Top-level names found: {_roots(src.keys)}. "
            "A standalone VAE loads with load_vae(), a LoRA with apply_loras().",
        )
    to_k = next((k for k in src.keys if k.startswith(UNET_PREFIX)
                 and k.endswith(".attn2.to_k.weight")), None)
    proj = next((k for k in src.keys if k.startswith(UNET_PREFIX)
                 and k.endswith(".proj_in.weight")), None)
    if to_k is None or proj is None:
        raise CheckpointError(
            src.path,
            "unknown architecture: the U-Net has no cross-attention (no '*.attn2.to_k.weight' / "
            f"'*.proj_in.weight' under {UNET_PREFIX!r}); SD 1/2/XL U-Nets have it at least in the "
            "middle block.",
        )
    return {
        "in_channels": src.shape(conv_in)[1],
        "context_dim": src.shape(to_k)[1],
        "linear_proj": len(src.shape(proj)) == 2,
        "adm_in_channels": (src.shape(UNET_PREFIX + "label_emb.0.0.weight")[1]
                            if UNET_PREFIX + "label_emb.0.0.weight" in src.keys else None),
    }


def _family_from_architecture(src: _Source, unet: dict, text: str | None) -> tuple[str, str]:
    """(family name, reason) from U-Net evidence and the text arrangement."""
    sdxl_like = unet["adm_in_channels"] is not None
    if text is not None:
        family = _ARRANGEMENT_FAMILY[text]
        if sdxl_like != family.startswith("sdxl"):
            raise CheckpointError(
                src.path,
                f"unknown architecture: the text encoders are laid out as {text} "
                f"({', '.join(dict(TEXT_LAYOUTS)[text])}) but the U-Net "
                + ("has" if sdxl_like else "lacks")
                + " SDXL's vector conditioning (label_emb); expected both or neither.",
            )
        return family, f"text encoder layout {text}"
    if sdxl_like:
        if unet["context_dim"] == 1280:
            return "sdxl-refiner", "U-Net label_emb with 1280-wide cross-attention (no text)"
        return "sdxl", "U-Net label_emb (no text encoder in the file)"
    if unet["context_dim"] == 1024 or unet["linear_proj"]:
        return "sd2", "U-Net cross-attention width/linear proj_in (no text encoder in the file)"
    return "sd1", "U-Net cross-attention width/1x1-conv proj_in (no text encoder in the file)"


def _last_transformer_norm_bias(keys) -> str | None:
    pattern = re.compile(re.escape(UNET_PREFIX)
                         + r"output_blocks\.(\d+)\.1\.transformer_blocks\.0\.norm1\.bias$")
    found = sorted((int(m.group(1)), k) for k in keys if (m := pattern.match(k)))
    return found[-1][1] if found else None


def _prediction(src: _Source, family: str, unet: dict) -> tuple[str, str]:
    if V_PRED_KEY in src.keys:
        return "v", f"explicit {V_PRED_KEY!r} key"
    if family != "sd2":
        return "eps", "default for the family"
    if unet["in_channels"] != 4:
        return "eps", "SD2 inpainting/depth U-Nets are eps (as released)"
    key = _last_transformer_norm_bias(src.keys)
    if key is None:
        return "eps", "default (no transformer in the last output blocks)"
    std = float(torch.std(src.tensor(key).float(), unbiased=False))
    verdict = "v" if std > SD2_V_STD_THRESHOLD else "eps"
    return verdict, (f"heuristic (ComfyUI): std of {key} = {std:.4f} "
                     f"{'>' if verdict == 'v' else '<='} {SD2_V_STD_THRESHOLD}")


def detect_family(
    state_dict_or_file: StateDictFile | Mapping[str, torch.Tensor] | str | os.PathLike,
    *,
    family: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """Detect the family of an original-layout checkpoint; return ``(name, details)``.

    ``name`` is a key of ``noisecraft.models.family.FAMILIES`` (``sd2-v`` for v-prediction
    SD2). ``details`` holds the evidence: ``text`` (arrangement or None), ``in_channels``,
    ``inpaint``, ``context_dim``, ``adm_in_channels``, ``linear_proj``, ``prediction`` ("eps" or
    "v"; for families without a ``-v`` name a v-prediction model keeps the base name),
    ``zero_terminal_snr``, ``reason`` and ``prediction_reason``.

    ``family`` overrides the detected name (and its prediction type); it must use the text
    arrangement the file has. Raises CheckpointError naming the file and what was found when no
    SD 1/2/XL U-Net is there, or when the parts contradict each other.
    """
    if isinstance(state_dict_or_file, str | os.PathLike | Path):
        with open_state_dict(state_dict_or_file) as f:
            return detect_family(f, family=family)
    src = _Source(state_dict_or_file)
    unet = _unet_evidence(src)
    text = text_arrangement(src.keys)
    name, reason = _family_from_architecture(src, unet, text)
    prediction, prediction_reason = _prediction(src, name, unet)
    if name == "sd2" and prediction == "v":
        name = "sd2-v"
    if family is not None:
        if family not in FAMILIES:
            raise CheckpointError(src.path, f"unknown family={family!r}; allowed: "
                                            f"{', '.join(FAMILIES)}")
        wanted = FAMILIES[family].text
        found = text or FAMILIES[name].text
        if wanted != found:
            raise CheckpointError(
                src.path,
                f"family={family!r} needs the {wanted} text-encoder arrangement, but this file "
                f"holds a {found} model ({reason}); choose a family with text={found!r}.",
            )
        name, reason = family, f"family={family!r} given"
        prediction, prediction_reason = FAMILIES[family].prediction, reason
    details = {
        **unet,
        "text": text,
        "inpaint": unet["in_channels"] == 9,
        "prediction": prediction,
        "zero_terminal_snr": ZTSNR_KEY in src.keys,
        "reason": reason,
        "prediction_reason": prediction_reason,
    }
    return name, details
