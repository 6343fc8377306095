"""Full-size text encoders (CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14), built once each on
meta, assign-loaded from a random reference of the real size and compared with it.

Slow (about 2 minutes and 4.2 GB peak RAM on 2 busy CPU cores): ``pytest -m slow -s`` prints
the build/load/forward times and the largest deviation.
"""

import time

import pytest
import torch

from noisecraft.checkpoints.text_keys import LAYOUT_PREFIX, diffusers_to_original
from noisecraft.models.text import CLIPTextEncoder
from noisecraft.models.text_config import CLIP_L, OPENCLIP_BIGG, OPENCLIP_H
from noisecraft.models.tokenizer import CLIPTokenizer

pytestmark = pytest.mark.slow
PROMPTS = ["a photo of an astronaut riding a horse on mars, 8k", ""]


def _init_(module: torch.nn.Module, seed: int) -> None:
    """CLIP-like random init: weights N(0, 0.02), LayerNorms 1 and 0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if ("norm" in name or "ln_" in name) and p.ndim == 1:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _report(name, times, error, scale):
    print(f"\n{name}: " + ", ".join(f"{k} {v:.2f}s" for k, v in times.items())
          + f"; max |error| {error:.2e} (output max |x| {scale:.2f})")


def test_full_clip_l_matches_transformers():
    import transformers

    tok = CLIPTokenizer()
    t0 = time.perf_counter()
    ref = transformers.CLIPTextModel(CLIP_L.hf_config()).eval()
    _init_(ref, 0)
    t1 = time.perf_counter()
    ours = CLIPTextEncoder(CLIP_L, device="meta", tokenizer=tok)
    sd = {"text_model." + k if not k.startswith("text_model.") else k: v
          for k, v in ref.state_dict().items()}
    ours.load_state_dict(diffusers_to_original(sd, "hf"), strict=True, assign=True)
    t2 = time.perf_counter()
    ids = torch.tensor([tok(p) for p in PROMPTS])
    with torch.no_grad():
        expected = ref(input_ids=ids).last_hidden_state
        got = ours.encode_prompts(PROMPTS).context
    t3 = time.perf_counter()
    error = (got - expected).abs().max().item()
    _report("CLIP ViT-L/14 (123M)", {"reference init": t1 - t0, "meta build + assign load":
                                     t2 - t1, "forward x2": t3 - t2}, error,
            expected.abs().max().item())
    assert sum(p.numel() for p in ours.parameters()) == 123_060_480
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("preset", "normed", "params"), [
    (OPENCLIP_H, True, 354_032_640), (OPENCLIP_BIGG, False, 694_659_840),
], ids=["vit_h", "vit_bigg"])
def test_full_openclip_matches_reference_tower(preset, normed, params):
    from tests.parity.test_text_parity import OpenCLIPText

    tok = CLIPTokenizer(pad_id=0)
    t0 = time.perf_counter()
    ref = OpenCLIPText(preset.width, preset.layers, preset.heads, preset.mlp_width,
                       preset.projection_dim).eval()
    _init_(ref, 1)
    t1 = time.perf_counter()
    ours = CLIPTextEncoder(preset, device="meta", tokenizer=tok)
    checkpoint = {LAYOUT_PREFIX["openclip"] + k: v for k, v in ref.state_dict().items()}
    ours.load_state_dict(checkpoint, strict=True, assign=True)
    t2 = time.perf_counter()
    ids = torch.tensor([tok(p) for p in PROMPTS])
    with torch.no_grad():
        outputs, pooled = ref(ids)
        expected = ref.ln_final(outputs[-2]) if normed else outputs[-2]
        got = ours.encode_prompts(PROMPTS)
    t3 = time.perf_counter()
    error = max((got.context - expected).abs().max().item(),
                (got.pooled - pooled).abs().max().item())
    _report(f"OpenCLIP {preset.width}x{preset.layers}", {
        "reference init": t1 - t0, "meta build + assign load": t2 - t1, "forward x2": t3 - t2,
    }, error, expected.abs().max().item())
    assert sum(p.numel() for p in ours.parameters()) == params
    torch.testing.assert_close(got.context, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.pooled, pooled, atol=1e-4, rtol=1e-4)
