"""Text encoders against references with identical random weights (tiny sizes).

- SD1 / SDXL: transformers' CLIPTextModel(WithProjection) loaded with ``from_pretrained`` from a
  diffusers-layout folder the test writes, and diffusers' own ``encode_prompt`` of the SD1 and
  SDXL pipelines (prompt and negative prompt), to 1e-5.
- SD2 / SDXL bigG: an OpenCLIP text tower written out here from torch primitives
  (``nn.MultiheadAttention`` with its stacked ``in_proj_weight``, OpenCLIP's key names), whose
  state dict loads into our encoder; penultimate-layer contexts and pooled output agree.
"""

import json
import math
from collections import OrderedDict

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from noisecraft.checkpoints.text_keys import LAYOUT_PREFIX, original_to_diffusers
from noisecraft.models.text import CLIPTextEncoder, build_text_encoder
from noisecraft.models.text_config import OPENCLIP_BIGG, OPENCLIP_H, text_configs, tiny
from noisecraft.models.tokenizer import CLIPTokenizer, build_vocab, read_merges
from tests.models.test_text import randomize

transformers = pytest.importorskip("transformers")
diffusers = pytest.importorskip("diffusers")

ATOL = 1e-5
PROMPT, NEGATIVE = "a photo of an astronaut riding a horse, 8k", "blurry, ugly"


@pytest.fixture(scope="module")
def tok():
    return CLIPTokenizer()


def hf_tokenizer(pad_token: str):
    merges = read_merges()
    try:
        return transformers.CLIPTokenizer(vocab=build_vocab(merges), merges=list(merges),
                                          pad_token=pad_token, model_max_length=77)
    except TypeError:
        pytest.skip("this transformers version builds CLIPTokenizer from files only")


def to_transformers(encoder: CLIPTextEncoder, folder):
    """Write ``encoder`` as a diffusers ``text_encoder/`` folder; load it with transformers."""
    folder.mkdir()
    sd = original_to_diffusers(encoder.state_dict(), encoder.config.layout)
    save_file(sd, folder / "model.safetensors")
    config = encoder.config.hf_config().to_dict()
    (folder / "config.json").write_text(json.dumps(config))
    cls = (transformers.CLIPTextModel if encoder.config.projection_dim is None
           else transformers.CLIPTextModelWithProjection)
    return cls.from_pretrained(folder, attn_implementation="sdpa").eval()


def test_sd1_matches_transformers_and_diffusers(tok, tmp_path):
    ours = randomize(build_text_encoder("sd1", configs=[tiny(text_configs("sd1")[0])],
                                       tokenizer=tok), 11)
    ref = to_transformers(ours, tmp_path / "text_encoder")
    ids = torch.tensor([tok(PROMPT)])
    with torch.no_grad():
        out = ref(input_ids=ids, output_hidden_states=True)
        torch.testing.assert_close(ours(ids)[0], out.last_hidden_state, atol=ATOL, rtol=0)
        for skip in (2, 3):  # A1111's clip skip: an earlier layer, then the final LayerNorm
            expected = ref.final_layer_norm(out.hidden_states[-skip])
            torch.testing.assert_close(ours(ids, clip_skip=skip)[0], expected, atol=ATOL, rtol=0)
        pipe = diffusers.StableDiffusionPipeline(
            vae=None, text_encoder=ref, tokenizer=hf_tokenizer("<|endoftext|>"), unet=None,
            scheduler=None, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        cond, uncond = pipe.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
        mine = ours.encode_prompts([PROMPT, NEGATIVE])
    assert mine.pooled is None
    torch.testing.assert_close(mine.context, torch.cat([cond, uncond]), atol=ATOL, rtol=0)


def test_sdxl_matches_diffusers_pipeline(tok, tmp_path):
    ours = randomize(build_text_encoder("sdxl", configs=[tiny(c) for c in text_configs("sdxl")],
                                        tokenizer=tok), 12)
    clip_l, big_g = ours.embedders
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=None,
        text_encoder=to_transformers(clip_l, tmp_path / "text_encoder"),
        text_encoder_2=to_transformers(big_g, tmp_path / "text_encoder_2"),
        tokenizer=hf_tokenizer("<|endoftext|>"), tokenizer_2=hf_tokenizer("!"),  # "!" is id 0
    )
    with torch.no_grad():
        cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(
            PROMPT, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=NEGATIVE,
        )
        mine = ours.encode_prompts([PROMPT, NEGATIVE])
    assert mine.context.shape == (2, 77, 64)
    torch.testing.assert_close(mine.context, torch.cat([cond, uncond]), atol=ATOL, rtol=0)
    torch.testing.assert_close(mine.pooled, torch.cat([pooled, pooled_uncond]), atol=ATOL, rtol=0)


# ---- an OpenCLIP text tower from torch primitives, with OpenCLIP's key names -----------------


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict(
            c_fc=nn.Linear(width, mlp_width), gelu=nn.GELU(), c_proj=nn.Linear(mlp_width, width)
        ))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.ln_2(x))


class OpenCLIPText(nn.Module):
    """OpenCLIP's TextTransformer as in ``open_clip.model`` (pre-norm blocks, causal mask,
    pooled = ln_final(x)[argmax(ids)] @ text_projection)."""

    def __init__(self, width: int, layers: int, heads: int, mlp_width: int, proj: int):
        super().__init__()
        self.token_embedding = nn.Embedding(49408, width)
        self.positional_embedding = nn.Parameter(torch.zeros(77, width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_width) for _ in range(layers)
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.zeros(width, proj))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        mask = torch.full((77, 77), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)

    def forward(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding
        outputs = []
        for block in self.transformer.resblocks:
            x = block(x, self.attn_mask)
            outputs.append(x)
        final = self.ln_final(x)
        pooled = final[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ self.text_projection
        return outputs, pooled


# SD2 (ldm's FrozenOpenCLIPEmbedder) applies ln_final after the penultimate layer; SDXL
# (sgm's FrozenOpenCLIPEmbedder2, legacy=False) does not.
@pytest.mark.parametrize(
    ("preset", "normed"), [(OPENCLIP_H, True), (OPENCLIP_BIGG, False)], ids=["sd2_h", "sdxl_bigg"]
)
def test_openclip_layout_loads_and_matches(preset, normed, tok):
    config = tiny(preset)
    ref = randomize(OpenCLIPText(config.width, config.layers, config.heads, config.mlp_width,
                                 config.projection_dim), 13).eval()
    checkpoint = {LAYOUT_PREFIX["openclip"] + k: v for k, v in ref.state_dict().items()}
    assert "model.transformer.resblocks.0.attn.in_proj_weight" in checkpoint
    assert "model.logit_scale" in checkpoint
    ours = CLIPTextEncoder(config, device="meta", tokenizer=tok)
    ours.load_state_dict(checkpoint, strict=True, assign=True)
    prompts = [PROMPT, NEGATIVE]
    ids = torch.tensor([tok.with_pad(0)(p) for p in prompts])
    assert ids[0, -1] == 0  # OpenCLIP pads with 0
    with torch.no_grad():
        outputs, pooled = ref(ids)
        mine = ours.encode_prompts(prompts)
        penultimate = outputs[-2]
        if normed:
            penultimate = ref.ln_final(penultimate)
    torch.testing.assert_close(mine.context, penultimate, atol=ATOL, rtol=0)
    torch.testing.assert_close(mine.pooled, pooled, atol=ATOL, rtol=0)
    # saving gives back the original layout, bit for bit (logit_scale is not kept)
    saved = ours.state_dict()
    assert set(saved) == set(checkpoint) - {"model.logit_scale"}
    assert all(torch.equal(saved[k], checkpoint[k]) for k in saved)
