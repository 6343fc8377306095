"""Upscale-model nodes under ComfyUI's names: UpscaleModelLoader and ImageUpscaleWithModel.

An UPSCALE_MODEL value is a loaded upscaler module (:func:`noisecraft.upscale.
load_upscale_model`: ESRGAN / Real-ESRGAN RRDBNet or SRVGGNetCompact) with ``.scale``; it is
put on the engine's device when the run has an engine, else it stays on the CPU.  The upscale
runs in 512 px tiles overlapping by 32 px, ComfyUI's numbers (halved on out-of-memory, as
ComfyUI does), and clamps to [0, 1].
"""

from __future__ import annotations

from noisecraft.graph.context import NodeContext
from noisecraft.graph.schema import COMBO, IMAGE, Input, Node, NodeSchema, Output
from noisecraft.models_folder import model_folders_of
from noisecraft.nodes.loaders import _names, _stat
from noisecraft.nodes.model_values import engine_of
from noisecraft.upscale import load_upscale_model, upscale_with_model

UPSCALE_MODEL = "UPSCALE_MODEL"
COMFY_TILE, COMFY_OVERLAP = 512, 32


def _device(context):
    try:
        return engine_of(context).device
    except LookupError:
        return None


class UpscaleModelLoader(Node):
    schema = NodeSchema(
        name="UpscaleModelLoader", display_name="Load Upscale Model", category="loaders",
        needs_context=True,
        inputs=[Input("model_name", COMBO, choices=_names("upscale_models"))],
        outputs=[Output(UPSCALE_MODEL)],
    )

    @classmethod
    def fingerprint(cls, context=None, **inputs):
        return _stat(context, "upscale_models", inputs.get("model_name", ""))

    @classmethod
    def execute(cls, model_name, context: NodeContext):
        path = model_folders_of(context).resolve("upscale_models", model_name)
        return (load_upscale_model(path, device=_device(context)),)


class ImageUpscaleWithModel(Node):
    schema = NodeSchema(
        name="ImageUpscaleWithModel", display_name="Upscale Image (using Model)",
        category="image/upscaling",
        inputs=[Input("upscale_model", UPSCALE_MODEL), Input("image", IMAGE)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, upscale_model, image):
        """IMAGE [B, H, W, C] -> [B, s*H, s*W, C]."""
        out = upscale_with_model(upscale_model, image.movedim(-1, 1), tile=COMFY_TILE,
                                 overlap=COMFY_OVERLAP)
        return (out.movedim(1, -1),)


UPSCALE_NODES = (UpscaleModelLoader, ImageUpscaleWithModel)
