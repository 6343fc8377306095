"""Stand-ins for the model nodes (ComfyUI's names, inputs and widget order), no weights."""

from __future__ import annotations

import torch

from noisecraft.graph import Input, Node, NodeSchema, Output
from noisecraft.graph.schema import (
    CLIP,
    COMBO,
    CONDITIONING,
    FLOAT,
    IMAGE,
    INT,
    LATENT,
    MAX_SEED,
    MODEL,
    STRING,
    VAE,
)
from noisecraft.nodes import builtin_registry


class CheckpointLoaderSimple(Node):
    schema = NodeSchema(
        name="CheckpointLoaderSimple", display_name="Load Checkpoint", category="loaders",
        inputs=[Input("ckpt_name", COMBO, choices=["v1-5.safetensors", "xl.safetensors"])],
        outputs=[Output(MODEL), Output(CLIP), Output(VAE)],
    )

    @classmethod
    def execute(cls, ckpt_name):
        return (f"model:{ckpt_name}", f"clip:{ckpt_name}", f"vae:{ckpt_name}")


class CLIPTextEncode(Node):
    schema = NodeSchema(
        name="CLIPTextEncode", display_name="CLIP Text Encode (Prompt)", category="conditioning",
        inputs=[Input("text", STRING, multiline=True), Input("clip", CLIP)],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, text, clip):
        return ([text],)


class KSampler(Node):
    schema = NodeSchema(
        name="KSampler", category="sampling",
        inputs=[
            Input("model", MODEL),
            Input("seed", INT, default=0, min=0, max=MAX_SEED, control_after_generate=True),
            Input("steps", INT, default=20, min=1, max=10000),
            Input("cfg", FLOAT, default=8.0, min=0.0, max=100.0, step=0.1, round=0.01),
            Input("sampler_name", COMBO, choices=["euler", "dpmpp_2m"]),
            Input("scheduler", COMBO, choices=["normal", "karras"]),
            Input("positive", CONDITIONING),
            Input("negative", CONDITIONING),
            Input("latent_image", LATENT),
            Input("denoise", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
        ],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, denoise):
        gen = torch.Generator().manual_seed(seed)
        return ({"samples": torch.rand(latent_image["samples"].shape, generator=gen)},)


class VAEDecode(Node):
    schema = NodeSchema(
        name="VAEDecode", display_name="VAE Decode", category="latent",
        inputs=[Input("samples", LATENT), Input("vae", VAE)], outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, samples, vae):
        x = samples["samples"][:, :3]
        return (torch.nn.functional.interpolate(x, scale_factor=8).movedim(1, -1),)


def txt2img_registry():
    registry = builtin_registry()
    registry.register_all([CheckpointLoaderSimple, CLIPTextEncode, KSampler, VAEDecode])
    return registry
