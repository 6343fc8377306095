"""Who runs in each suite: labels, implementation (noisecraft / diffusers), backend and knobs.

The label "eager" (noisecraft, eager fp32) is the reference every error is measured against.
"""

from __future__ import annotations


def _c(label: str, backend: str | None = None, impl: str = "noisecraft", **knobs) -> dict:
    options = {k: knobs.pop(k) for k in ("bf16_mode", "dynamic") if k in knobs}
    return {"label": label, "impl": impl, "backend": backend or label, "knobs": knobs,
            "options": options}


DIFFUSERS = _c("diffusers", "eager", impl="diffusers")
FP32 = [
    _c("eager"),
    _c("eager+cl", "eager", channels_last=True),
    _c("onednn"),
    _c("onednn+cl", "onednn", channels_last=True),
    _c("compiled"),
    _c("openvino"),
]
BF16 = [
    _c("eager_bf16"),
    _c("eager_bf16_autocast", "eager_bf16", bf16_mode="autocast"),
    _c("onednn_bf16+cl", "onednn_bf16", channels_last=True),
    _c("compiled_bf16"),
    _c("openvino_bf16"),
]
# Measured on request only (--contenders): the PyTorch knobs on their own.
KNOBS = [
    _c("eager-mkldnn_off", "eager", mkldnn=False),
    _c("eager-sdpa_math", "eager", sdpa="math"),
    _c("compiled+cl", "compiled", channels_last=True),
    _c("compiled_dynamic", "compiled", dynamic=True),
]

SUITES = {
    "unet": [DIFFUSERS, *FP32, *BF16],
    "vae_decode": [DIFFUSERS, *FP32, *BF16],
    "vae_encode": [DIFFUSERS, _c("eager"), _c("onednn+cl", "onednn", channels_last=True),
                   _c("openvino"), _c("onednn_bf16+cl", "onednn_bf16", channels_last=True),
                   _c("openvino_bf16")],
    "text": [_c("eager"), _c("onednn"), _c("compiled"), _c("openvino"), _c("eager_bf16"),
             _c("onednn_bf16"), _c("openvino_bf16")],
    "txt2img": [DIFFUSERS, _c("eager"), _c("onednn+cl", "onednn", channels_last=True),
                _c("openvino"), _c("onednn_bf16+cl", "onednn_bf16", channels_last=True),
                _c("openvino_bf16")],
    "sdxl_unet": [_c("eager"), _c("onednn+cl", "onednn", channels_last=True), _c("openvino"),
                  _c("onednn_bf16+cl", "onednn_bf16", channels_last=True),
                  _c("openvino_bf16")],
}


def contenders_for(suite: str) -> list[dict]:
    """The suite's contenders, plus the knob-only ones (selected with --contenders)."""
    extra = KNOBS if suite in ("unet", "vae_decode") else []
    return [dict(c) for c in SUITES[suite] + extra]
