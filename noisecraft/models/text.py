"""CLIP text encoders for SD1 / SD2 / SDXL and noisecraft's own models.

One ``CLIPTextEncoder`` is one CLIP text tower (Radford et al. 2021), computed by transformers'
``CLIPTextModel`` (``CLIPTextModelWithProjection`` when it has a pooled projection) with
``attn_implementation="sdpa"``. Its state-dict keys are the original checkpoint keys with the
leading ``cond_stage_model.`` / ``conditioner.embedders.N.`` removed:

- layout "hf" (OpenAI CLIP-L in SD1 and SDXL): ``transformer.text_model.*``;
- layout "openclip" (SD2's ViT-H, SDXL's bigG): ``model.token_embedding.weight``,
  ``model.transformer.resblocks.N.attn.in_proj_weight``, ``model.text_projection`` ...:
  state-dict hooks translate to and from the HF names of the module inside (the table is in
  ``checkpoints/text_keys.py``).
  Loading also accepts HF names under ``model.``.

``TextConditioner`` holds several encoders as ``embedders.N`` (SDXL: CLIP-L + bigG; refiner:
bigG) and concatenates their contexts along channels.

Which layer, ``clip_skip`` (AUTOMATIC1111's convention): 1 = the last layer's output after the
final LayerNorm; k > 1 = the output of the k-th layer from the end, followed by the final
LayerNorm only when the config says ``norm_skipped`` (SD1 in A1111 and SD2 do; SDXL does not).
Family defaults: SD1 1; SD2 2 (its U-Net was trained on the penultimate layer, normed; diffusers
keeps 23 of the 24 layers instead); SDXL 2 for both encoders (penultimate, not normed). The pooled
output is always the final layer's end-token state, normed and projected (SDXL's 1280-d vector).

Prompt weights are applied the AUTOMATIC1111 way ("Original" emphasis): each chunk's hidden states
are multiplied per token by the weight, then rescaled so their mean equals the unweighted mean.
Unlike A1111 the mean is taken per prompt, not over the batch, so a prompt's embedding does not
depend on what else is in the batch. ComfyUI instead interpolates from the empty prompt's
embedding; that is not implemented here.

Textual-inversion embeddings (``embeddings=`` a :class:`~noisecraft.embeddings.PromptEmbeddings`):
their vectors replace the token embeddings at the positions the tokenizer reserved for them
(``TokenChunk.vectors``), the AUTOMATIC1111 / ComfyUI way; SDXL's CLIP-L ("hf" layout) takes a
file's ``clip_l`` vectors and bigG ("openclip") its ``clip_g``.

Encoding runs under the caller's autograd mode: pipelines should wrap it in
``torch.inference_mode()``; training noisecraft's own encoder needs the gradients.

Tested here on CPU in float32 (and a bfloat16 smoke test) only: float16/bfloat16 on CUDA are
expected to work (transformers' CLIP and SDPA support them) but could not be tested here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from noisecraft.checkpoints.text_keys import (
    HF_UNUSED,
    LAYOUT_PREFIX,
    hf_to_openclip,
    openclip_to_hf,
)
from noisecraft.models.text_config import (
    TextEncoderConfig,
    text_config_from_state_dict,
    text_configs,
)
from noisecraft.models.tokenizer import CLIPTokenizer
from noisecraft.prompts import (
    Span,
    TokenChunk,
    Vector,
    pad_chunks,
    parse_prompt_weights,
    tokenize_spans,
)

if TYPE_CHECKING:
    from noisecraft.embeddings import PromptEmbeddings

TokenVectors = Sequence[tuple[int, int, Vector]]
"""``(row, position, vector)``: replace the token embedding of ``ids[row, position]``."""


class PromptEmbedding(NamedTuple):
    """``context`` [B, 77*k, C] for cross-attention; ``pooled`` [B, P] or None."""

    context: torch.Tensor
    pooled: torch.Tensor | None


def _hf_text_tower(config: TextEncoderConfig) -> nn.Module:
    """transformers' CLIP text model with the key names of real files: ``text_model.*`` and,
    with a projection, ``text_projection.weight``. (transformers 5's ``CLIPTextModel`` dropped
    the ``text_model.`` level that transformers 4 and every checkpoint have; a plain container
    puts it back.)"""
    if config.projection_dim is not None:
        return CLIPTextModelWithProjection(config.hf_config())
    model = CLIPTextModel(config.hf_config())
    if hasattr(model, "text_model"):  # transformers 4
        return model
    container = nn.Module()
    container.text_model = model
    return container


class CLIPTextEncoder(nn.Module):
    """One CLIP text tower; see the module docstring for key layout and ``clip_skip``.

    Args:
        config: architecture and usage (presets in ``noisecraft.models.text_config``).
        device, dtype: where to build the weights; ``device="meta"`` builds no storage, for
            ``load_state_dict(..., assign=True)``.
        tokenizer: a shared ``CLIPTokenizer`` (its padding is adapted to ``config.pad_id``);
            default: one is built on first use.
    """

    def __init__(
        self,
        config: TextEncoderConfig,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        tokenizer: CLIPTokenizer | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        with torch.device(device) if device is not None else contextlib.nullcontext():
            clip = _hf_text_tower(config)
        if dtype is not None:
            clip = clip.to(dtype)
        setattr(self, LAYOUT_PREFIX[config.layout].rstrip("."), clip)
        self._tokenizer = tokenizer.with_pad(config.pad_id) if tokenizer is not None else None
        self.register_load_state_dict_pre_hook(_load_pre_hook)
        self.register_load_state_dict_post_hook(_load_post_hook)
        if config.layout == "openclip":
            self.register_state_dict_post_hook(_openclip_state_dict_hook)

    @property
    def clip(self) -> nn.Module:
        """The module under ``transformer.``/``model.``: ``text_model`` (+ ``text_projection``)."""
        return getattr(self, LAYOUT_PREFIX[self.config.layout].rstrip("."))

    @property
    def text_model(self) -> nn.Module:
        """transformers' text transformer (``embeddings``, ``encoder``, ``final_layer_norm``)."""
        return self.clip.text_model

    @property
    def tokenizer(self) -> CLIPTokenizer:
        if self._tokenizer is None:
            self._tokenizer = CLIPTokenizer(pad_id=self.config.pad_id)
        return self._tokenizer

    def forward(
        self, ids: torch.Tensor, *, clip_skip: int | None = None, vectors: TokenVectors = ()
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token ids [B, 77] -> (hidden states [B, 77, C] of the chosen layer, pooled [B, P] or
        None). ``clip_skip`` None means ``config.default_clip_skip``; ``vectors`` replace token
        embeddings (textual inversion)."""
        skip = self.config.default_clip_skip if clip_skip is None else clip_skip
        if not 1 <= skip <= self.config.layers:
            raise ValueError(
                f"clip_skip={skip} is out of range for a {self.config.layers}-layer encoder; "
                f"allowed: 1 (last layer) .. {self.config.layers}"
            )
        ids = ids.to(self.device)
        with _token_vectors(self.text_model.embeddings.token_embedding, ids, vectors):
            out = self.text_model(input_ids=ids, output_hidden_states=skip > 1)
        if skip == 1:
            hidden = out.last_hidden_state
        else:
            hidden = out.hidden_states[-skip]
            if self.config.norm_skipped:
                hidden = self.text_model.final_layer_norm(hidden)
        if self.config.projection_dim is None:
            return hidden, None
        return hidden, self.clip.text_projection(out.pooler_output)

    @property
    def device(self) -> torch.device:
        return self.text_model.embeddings.token_embedding.weight.device

    def encode_tokens(
        self, chunks: Sequence[Sequence[TokenChunk]], *, clip_skip: int | None = None
    ) -> PromptEmbedding:
        """Weighted token chunks of B prompts (each a list of k chunks, same k for all) ->
        context [B, 77*k, C] with the weights applied, pooled [B, P] (first chunk) or None."""
        counts = {len(c) for c in chunks}
        if len(counts) != 1 or 0 in counts:
            raise ValueError(
                f"every prompt needs the same, non-zero number of chunks, got {sorted(counts)}; "
                "use noisecraft.prompts.pad_chunks (or encode_prompts) to equalise them"
            )
        k = counts.pop()
        flat = [c for prompt in chunks for c in prompt]
        ids = torch.tensor([c.ids for c in flat], dtype=torch.long)
        weights = torch.tensor([c.weights for c in flat], dtype=torch.float32)
        vectors = [(row, pos, v) for row, c in enumerate(flat) for pos, v in c.vectors]
        hidden, pooled = self(ids, clip_skip=clip_skip, vectors=vectors)
        hidden = apply_token_weights(hidden, weights.to(hidden.device))
        context = hidden.reshape(len(chunks), k * hidden.shape[1], hidden.shape[2])
        return PromptEmbedding(context, None if pooled is None else pooled[::k])

    def encode_prompt(self, prompt: str, *, clip_skip: int | None = None,
                      embeddings: PromptEmbeddings | None = None) -> PromptEmbedding:
        """One prompt with weighting syntax -> context [1, 77*k, C], pooled [1, P] or None."""
        return encode_prompts([self], [prompt], clip_skip=clip_skip, embeddings=embeddings)

    def encode_prompts(
        self, prompts: Sequence[str], *, clip_skip: int | None = None,
        embeddings: PromptEmbeddings | None = None,
    ) -> PromptEmbedding:
        """Several prompts (e.g. positive and negative for guidance) -> one batch; shorter ones
        are padded with empty-prompt chunks to the longest (as AUTOMATIC1111 does)."""
        return encode_prompts([self], prompts, clip_skip=clip_skip, embeddings=embeddings)


class TextConditioner(nn.Module):
    """Several encoders whose contexts are concatenated along channels (SDXL: CLIP-L 768 +
    bigG 1280 = 2048). Keys: ``embedders.N.<encoder keys>``, as under ``conditioner.`` in SDXL
    files. Pooled: from the last encoder that has a projection."""

    def __init__(self, encoders: Sequence[CLIPTextEncoder]) -> None:
        super().__init__()
        if not encoders:
            raise ValueError("TextConditioner needs at least one encoder")
        self.embedders = nn.ModuleList(encoders)

    def encode_prompt(self, prompt: str, *, clip_skip: int | None = None,
                      embeddings: PromptEmbeddings | None = None) -> PromptEmbedding:
        """As ``CLIPTextEncoder.encode_prompt``; ``clip_skip`` applies to every encoder."""
        return encode_prompts(list(self.embedders), [prompt], clip_skip=clip_skip,
                              embeddings=embeddings)

    def encode_prompts(
        self, prompts: Sequence[str], *, clip_skip: int | None = None,
        embeddings: PromptEmbeddings | None = None,
    ) -> PromptEmbedding:
        """As ``CLIPTextEncoder.encode_prompts``."""
        return encode_prompts(list(self.embedders), prompts, clip_skip=clip_skip,
                              embeddings=embeddings)


TextModule = CLIPTextEncoder | TextConditioner
"""What a Stable Diffusion model's text part is: one encoder (SD1, SD2, own) or a conditioner."""


def build_text_encoder(
    arrangement: str,
    *,
    configs: Sequence[TextEncoderConfig] | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: CLIPTokenizer | None = None,
) -> TextModule:
    """Random-weight (or, on ``device="meta"``, storage-less) text module of an arrangement
    (``Family.text``: sd1, sd2, sdxl, sdxl_refiner, clip). ``configs`` overrides the presets,
    e.g. ``[tiny(c) for c in text_configs("sdxl")]``. One tokenizer is shared by all encoders."""
    configs = tuple(configs) if configs is not None else text_configs(arrangement)
    expected = len(text_configs(arrangement))
    if len(configs) != expected:
        raise ValueError(f"{arrangement!r} has {expected} text encoder(s), got {len(configs)}")
    tokenizer = tokenizer or CLIPTokenizer()
    encoders = [
        CLIPTextEncoder(c, device=device, dtype=dtype, tokenizer=tokenizer) for c in configs
    ]
    if arrangement in ("sdxl", "sdxl_refiner"):
        return TextConditioner(encoders)
    return encoders[0]


def load_text_encoder(
    sd: Mapping[str, torch.Tensor],
    arrangement: str,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    tokenizer: CLIPTokenizer | None = None,
    like: Sequence[TextEncoderConfig] | None = None,
) -> TextModule:
    """Build the text module of ``arrangement`` to fit ``sd`` (module keys, e.g. from
    ``checkpoints.text_keys.text_state_dict_from_checkpoint``) and load it without a random
    initialisation (built on meta, assign-loaded, then moved to ``device``/``dtype``).
    Sizes are read from ``sd`` (``text_config_from_state_dict``), usage and head size from
    ``like`` (default: the arrangement's presets)."""
    presets = tuple(like) if like is not None else text_configs(arrangement)
    if arrangement in ("sdxl", "sdxl_refiner"):
        heads = [f"embedders.{i}." for i in range(len(presets))]
        parts = [{k[len(h):]: v for k, v in sd.items() if k.startswith(h)} for h in heads]
    else:
        parts = [dict(sd)]
    missing = [i for i, part in enumerate(parts) if not part]
    if missing:
        raise KeyError(f"{arrangement!r} text state dict has no keys for encoder(s) {missing}")
    configs = [text_config_from_state_dict(p, like=c) for p, c in zip(parts, presets, strict=True)]
    module = build_text_encoder(
        arrangement, configs=configs, device="meta", tokenizer=tokenizer
    )
    module.load_state_dict(sd, strict=True, assign=True)
    return module.to(device=device, dtype=dtype)


def encode_prompts(
    encoders: Sequence[CLIPTextEncoder],
    prompts: Sequence[str | Sequence[Span]],
    *,
    clip_skip: int | None = None,
    embeddings: PromptEmbeddings | None = None,
) -> PromptEmbedding:
    """Prompts (text with weighting syntax, or already parsed spans) -> one batch from one or
    more encoders: contexts concatenated along channels, pooled from the last encoder that has a
    projection. All prompts are brought to the same number of chunks with empty chunks.
    ``embeddings``: the textual-inversion embeddings the prompts may name."""
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    parsed = [parse_prompt_weights(p) if isinstance(p, str) else list(p) for p in prompts]
    contexts, pooled = [], None
    for encoder in encoders:
        split = None if embeddings is None else embeddings.splitter(
            encoder.config.width, EMBEDDING_KEYS[encoder.config.layout])
        chunks = [tokenize_spans(spans, encoder.tokenizer, embeddings=split) for spans in parsed]
        n = max(len(c) for c in chunks)
        chunks = [pad_chunks(c, n, encoder.tokenizer) for c in chunks]
        embedding = encoder.encode_tokens(chunks, clip_skip=clip_skip)
        contexts.append(embedding.context)
        pooled = embedding.pooled if embedding.pooled is not None else pooled
    return PromptEmbedding(torch.cat(contexts, dim=-1), pooled)


EMBEDDING_KEYS = {"hf": "clip_l", "openclip": "clip_g"}
"""Which of an SDXL embedding file's vectors an encoder of each layout takes."""


@contextlib.contextmanager
def _token_vectors(
    token_embedding: nn.Module, ids: torch.Tensor, vectors: TokenVectors
) -> Iterator[None]:
    """While inside, the token embedding of ``ids`` (this very tensor) has ``vectors`` in
    place of its rows at their positions.

    A forward hook, because transformers' ``CLIPTextModel.forward`` takes no ``inputs_embeds``
    (AUTOMATIC1111 wraps the same module).  It lives only for this call and acts only on this
    call's ids (same storage), so other calls on the encoder, also from other threads, are
    untouched."""
    if not vectors:
        yield
        return
    rows = torch.tensor([r for r, _, _ in vectors], device=ids.device)
    cols = torch.tensor([c for _, c, _ in vectors], device=ids.device)
    values = torch.tensor([v for _, _, v in vectors], dtype=torch.float32)

    def replace(_module, args, output):
        if args[0].data_ptr() != ids.data_ptr():
            return None
        output = output.clone()
        output[rows, cols] = values.to(output.device, output.dtype)
        return output

    handle = token_embedding.register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def apply_token_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's emphasis: ``hidden`` [N, T, C] times ``weights`` [N, T] per token, then
    each row rescaled to its original mean. Rows whose weights are all 1 are returned unchanged."""
    if bool((weights == 1).all()):
        return hidden
    z = hidden.float()
    mean = z.mean(dim=(1, 2), keepdim=True)
    z = z * weights[..., None]
    z = z * (mean / z.mean(dim=(1, 2), keepdim=True))
    return z.to(hidden.dtype)


def equalize_contexts(
    contexts: Sequence[torch.Tensor], empty: torch.Tensor
) -> list[torch.Tensor]:
    """Pad contexts [B, 77*k_i, C] to the longest by repeating the empty prompt's context
    ``empty`` [1, 77, C] (AUTOMATIC1111's ``pad_cond``), for batching cond and uncond."""
    chunk = empty.shape[1]
    bad = [tuple(c.shape) for c in contexts if c.shape[1] % chunk or c.shape[2] != empty.shape[2]]
    if bad:
        raise ValueError(
            f"contexts {bad} are not whole {chunk}-token chunks of width {empty.shape[2]}"
        )
    longest = max(c.shape[1] for c in contexts)
    return [
        torch.cat([c, empty.expand(c.shape[0], -1, -1).repeat(1, (longest - c.shape[1]) // chunk,
                                                             1)], dim=1)
        for c in contexts
    ]


# ---- state-dict hooks: original key layout outside, transformers names inside ---------------


def _load_pre_hook(module, state_dict, prefix, *_args) -> None:
    inner = prefix + LAYOUT_PREFIX[module.config.layout]
    for key in HF_UNUSED:
        state_dict.pop(inner + key, None)
    if module.config.layout != "openclip":
        return
    own = [k for k in state_dict if k.startswith(inner)]
    if not own or all(k[len(inner):].startswith(("text_model.", "text_projection.")) for k in own):
        return  # nothing here, or already in transformers names
    converted = openclip_to_hf({k[len(inner):]: state_dict.pop(k) for k in own})
    state_dict.update({inner + k: v for k, v in converted.items()})


def _load_post_hook(module, _incompatible) -> None:
    # position_ids is a non-persistent buffer: after assign-loading onto "meta" it is still
    # meta. Rebuild it next to the weights.
    embeddings = module.text_model.embeddings
    weight = embeddings.token_embedding.weight
    if embeddings.position_ids.device != weight.device:
        n = embeddings.position_embedding.weight.shape[0]
        embeddings.position_ids = torch.arange(n, device=weight.device).expand(1, -1)


def _openclip_state_dict_hook(module, state_dict, prefix, _metadata) -> None:
    inner = prefix + LAYOUT_PREFIX["openclip"]
    own = [k for k in state_dict if k.startswith(inner)]
    converted = hf_to_openclip({k[len(inner):]: state_dict.pop(k) for k in own})
    state_dict.update({inner + k: v for k, v in converted.items()})
