"""Conditioning nodes: prompts through the model's text encoders, combining, areas, zeroing,
inpainting-model conditioning.  CONDITIONING is ComfyUI's list of ``[context, {options}]``
(see :mod:`noisecraft.nodes.model_values`); prompts use the engine's text encoders
(AUTOMATIC1111 weighting syntax, 75-token chunks, BREAK, clip skip)."""

from __future__ import annotations

import torch

from noisecraft.graph.schema import (
    BOOLEAN,
    CLIP,
    CONDITIONING,
    FLOAT,
    IMAGE,
    INT,
    LATENT,
    MASK,
    MAX_RESOLUTION,
    STRING,
    VAE,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.models.text import encode_prompts
from noisecraft.nodes.model_values import ClipValue, entries_with


def _encoders(clip: ClipValue) -> list:
    text = clip.bundle.text_encoder
    return list(text.embedders) if hasattr(text, "embedders") else [text]


@torch.no_grad()
def encode_text(clip: ClipValue, text: str) -> list:
    """One prompt -> CONDITIONING ``[[context [1, 77k, C], {"pooled_output": [1, P] | None}]]``
    with the same encoder call the engine makes (``encode_prompts``)."""
    emb = clip.bundle.text_encoder.encode_prompts([text], clip_skip=clip.clip_skip,
                                                  embeddings=clip.embeddings)
    pooled = None if emb.pooled is None else emb.pooled.float()
    return [[emb.context.float(), {"pooled_output": pooled}]]


class CLIPTextEncode(Node):
    schema = NodeSchema(
        name="CLIPTextEncode", display_name="CLIP Text Encode (Prompt)", category="conditioning",
        description="Encodes a text prompt using a CLIP model into an embedding that can be "
                    "used to guide the diffusion model towards generating specific images.",
        inputs=[Input("text", STRING, multiline=True, extra={"dynamicPrompts": True},
                      tooltip="The text to be encoded."),
                Input("clip", CLIP, tooltip="The CLIP model used for encoding the text.")],
        outputs=[Output(CONDITIONING, tooltip="A conditioning containing the embedded text "
                                              "used to guide the diffusion model.")],
    )

    @classmethod
    def execute(cls, text, clip):
        return (encode_text(clip, text),)


_SIZE = {"min": 0, "max": MAX_RESOLUTION}


class CLIPTextEncodeSDXL(Node):
    schema = NodeSchema(
        name="CLIPTextEncodeSDXL", category="advanced/conditioning",
        inputs=[
            Input("clip", CLIP),
            Input("width", INT, default=1024, **_SIZE),
            Input("height", INT, default=1024, **_SIZE),
            Input("crop_w", INT, default=0, **_SIZE),
            Input("crop_h", INT, default=0, **_SIZE),
            Input("target_width", INT, default=1024, **_SIZE),
            Input("target_height", INT, default=1024, **_SIZE),
            Input("text_g", STRING, multiline=True, extra={"dynamicPrompts": True}),
            Input("text_l", STRING, multiline=True, extra={"dynamicPrompts": True}),
        ],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    @torch.no_grad()
    def execute(cls, clip, width, height, crop_w, crop_h, target_width, target_height,
                text_g, text_l):
        """``text_l`` through CLIP-L, ``text_g`` through OpenCLIP bigG (pooled from bigG); the
        shorter context is padded with empty-prompt chunks, as ComfyUI pads the tokens."""
        encoders = _encoders(clip)
        if len(encoders) != 2:
            raise ValueError(f"CLIPTextEncodeSDXL needs SDXL base's two text encoders; this CLIP "
                             f"({clip.bundle.name}) has {len(encoders)}: use CLIPTextEncode")
        parts, pooled = [], None
        for encoder, text in zip(encoders, (text_l, text_g), strict=True):
            emb = encode_prompts([encoder], [text], clip_skip=clip.clip_skip,
                                 embeddings=clip.embeddings)
            empty = encode_prompts([encoder], [""], clip_skip=clip.clip_skip).context
            parts.append((emb.context, empty))
            pooled = emb.pooled if emb.pooled is not None else pooled
        longest = max(c.shape[1] for c, _ in parts)
        contexts = [torch.cat([c, *[e] * ((longest - c.shape[1]) // e.shape[1])], dim=1)
                    for c, e in parts]
        options = {"pooled_output": pooled.float(), "width": width, "height": height,
                   "crop_w": crop_w, "crop_h": crop_h, "target_width": target_width,
                   "target_height": target_height}
        return ([[torch.cat(contexts, dim=-1).float(), options]],)


class CLIPTextEncodeSDXLRefiner(Node):
    schema = NodeSchema(
        name="CLIPTextEncodeSDXLRefiner", category="advanced/conditioning",
        inputs=[
            Input("ascore", FLOAT, default=6.0, min=0.0, max=1000.0, step=0.01),
            Input("width", INT, default=1024, **_SIZE),
            Input("height", INT, default=1024, **_SIZE),
            Input("text", STRING, multiline=True, extra={"dynamicPrompts": True}),
            Input("clip", CLIP),
        ],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, ascore, width, height, text, clip):
        return (entries_with(encode_text(clip, text), aesthetic_score=ascore, width=width,
                             height=height),)


class ConditioningCombine(Node):
    schema = NodeSchema(
        name="ConditioningCombine", display_name="Conditioning (Combine)",
        category="conditioning",
        inputs=[Input("conditioning_1", CONDITIONING), Input("conditioning_2", CONDITIONING)],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, conditioning_1, conditioning_2):
        """Both lists; the sampler averages the model's predictions over the entries."""
        return (list(conditioning_1) + list(conditioning_2),)


class ConditioningSetArea(Node):
    schema = NodeSchema(
        name="ConditioningSetArea", display_name="Conditioning (Set Area)",
        category="conditioning",
        inputs=[
            Input("conditioning", CONDITIONING),
            Input("width", INT, default=64, min=64, max=MAX_RESOLUTION, step=8),
            Input("height", INT, default=64, min=64, max=MAX_RESOLUTION, step=8),
            Input("x", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            Input("y", INT, default=0, min=0, max=MAX_RESOLUTION, step=8),
            Input("strength", FLOAT, default=1.0, min=0.0, max=10.0, step=0.01),
        ],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, conditioning, width, height, x, y, strength):
        """The area in latent pixels ``(h, w, top, left)`` = pixels // 8, as ComfyUI."""
        area = (height // 8, width // 8, y // 8, x // 8)
        return (entries_with(conditioning, area=area, strength=strength,
                             set_area_to_bounds=False),)


class ConditioningZeroOut(Node):
    schema = NodeSchema(
        name="ConditioningZeroOut", category="advanced/conditioning",
        inputs=[Input("conditioning", CONDITIONING)], outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, conditioning):
        out = []
        for context, opts in conditioning:
            opts = dict(opts)
            if opts.get("pooled_output") is not None:
                opts["pooled_output"] = torch.zeros_like(opts["pooled_output"])
            opts.pop("lora_hook", None)
            out.append([torch.zeros_like(context), opts])
        return (out,)


def gray_masked(pixels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, 3] with the (rounded) masked part set to 0.5 grey, as ComfyUI."""
    keep = (1.0 - mask.round())[..., None]
    return (pixels - 0.5) * keep + 0.5


def pixel_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """MASK [B, h, w] or [h, w] -> [B, 1, height, width] (bilinear, as ComfyUI)."""
    m = mask.reshape(-1, 1, mask.shape[-2], mask.shape[-1]).float()
    if m.shape[-2:] != (height, width):
        m = torch.nn.functional.interpolate(m, size=(height, width), mode="bilinear")
    return m


class InpaintModelConditioning(Node):
    schema = NodeSchema(
        name="InpaintModelConditioning", category="conditioning/inpaint",
        inputs=[Input("positive", CONDITIONING), Input("negative", CONDITIONING),
                Input("vae", VAE), Input("pixels", IMAGE), Input("mask", MASK),
                Input("noise_mask", BOOLEAN, default=True,
                      tooltip="Add a noise mask to the latent so sampling will only happen "
                              "within the mask.")],
        outputs=[Output(CONDITIONING, "positive"), Output(CONDITIONING, "negative"),
                 Output(LATENT, "latent")],
    )

    @classmethod
    def execute(cls, positive, negative, vae, pixels, mask, noise_mask):
        """Latent of the image, and conditioning that carries the latent of the image with the
        masked part grey plus the mask (the extra input channels of inpainting models)."""
        from noisecraft.nodes.vae import crop_to_multiple, encode_pixels

        pixels = crop_to_multiple(pixels, vae.downscale)
        m = pixel_mask(mask, pixels.shape[1], pixels.shape[2])
        concat = encode_pixels(vae, gray_masked(pixels, m[:, 0]))
        latent = {"samples": encode_pixels(vae, pixels)}
        if noise_mask:
            latent["noise_mask"] = m
        extra = {"concat_latent_image": concat, "concat_mask": m}
        return (entries_with(positive, **extra), entries_with(negative, **extra), latent)


CONDITIONING_NODES = [CLIPTextEncode, CLIPTextEncodeSDXL, CLIPTextEncodeSDXLRefiner,
                      ConditioningCombine, ConditioningSetArea, ConditioningZeroOut,
                      InpaintModelConditioning]
