"""ControlNet nodes under ComfyUI's names: ControlNetLoader, ControlNetApply ("Apply ControlNet
(OLD)"), ControlNetApplyAdvanced ("Apply ControlNet") and the Canny preprocessor.

A CONTROL_NET value is a loaded :class:`~noisecraft.models.controlnet.ControlNet` (from the
engine's cache, so a file loads once per engine), behind the engine's compute backend
(``Engine.runnable_module``, as ``generate_image`` runs it).  Applying one stores a
:class:`~noisecraft.models.controlnet.ControlSpec` in the CONDITIONING entries' ``control``
option, after the ones already there (ComfyUI's chained ControlNets, whose residuals add up);
the guider hands them to the engine's ``guided_denoiser`` (:func:`controls_of`), which runs them
as ``generate_image(controlnets=...)`` does.  As in ComfyUI, the old node's ControlNet also acts
on the negative prompt ("control_apply_to_uncond"), so it guides like the advanced node given
the same conditioning on both sides.
"""

from __future__ import annotations

import torch

from noisecraft.control_images import canny
from noisecraft.graph.context import NodeContext
from noisecraft.graph.schema import (
    COMBO,
    CONDITIONING,
    FLOAT,
    IMAGE,
    VAE,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.models.controlnet import ControlSpec
from noisecraft.models_folder import ModelFolderError, model_folders_of
from noisecraft.nodes.model_values import engine_of

CONTROL_NET = "CONTROL_NET"
CONTROL_KEY = "control"
_APPLY_TO_UNCOND = "control_apply_to_uncond"
_STRENGTH = {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}
_PERCENT = {"min": 0.0, "max": 1.0, "step": 0.001}


def controls_of(conditioning: list | None) -> tuple[ControlSpec, ...]:
    """The ControlSpecs of a CONDITIONING's first entry (() for none)."""
    if not conditioning:
        return ()
    return tuple(conditioning[0][1].get(CONTROL_KEY, ()))


def uncond_controls_of(positive: list | None, negative: list | None) -> tuple[ControlSpec, ...]:
    """What acts on the negative prompt: its own ControlSpecs, or the positive's when the old
    node set them to apply to the negative prompt as well (ComfyUI's rule)."""
    if positive and positive[0][1].get(_APPLY_TO_UNCOND) and not controls_of(negative):
        return controls_of(positive)
    return controls_of(negative)


def _hint(image: torch.Tensor) -> torch.Tensor:
    """IMAGE [B, H, W, C] -> a control image [B, C, H, W] in [0, 1]."""
    return image.movedim(-1, 1).float().contiguous()


def _with_control(conditioning: list, spec: ControlSpec, **flags) -> list:
    out = []
    for context, opts in conditioning:
        chain = (*opts.get(CONTROL_KEY, ()), spec)
        out.append([context, {**opts, CONTROL_KEY: chain, **flags}])
    return out


def _controlnet_names(context) -> list[str]:
    return model_folders_of(context).names("controlnet")


class ControlNetLoader(Node):
    schema = NodeSchema(
        name="ControlNetLoader", display_name="Load ControlNet Model", category="loaders",
        needs_context=True,
        inputs=[Input("control_net_name", COMBO, choices=_controlnet_names)],
        outputs=[Output(CONTROL_NET)],
    )

    @classmethod
    def fingerprint(cls, context=None, **inputs):
        try:
            path = model_folders_of(context).resolve("controlnet",
                                                     inputs.get("control_net_name", ""))
        except ModelFolderError:
            return None
        st = path.stat()
        return (str(path), st.st_size, st.st_mtime_ns)

    @classmethod
    def execute(cls, control_net_name, context: NodeContext):
        path = model_folders_of(context).resolve("controlnet", control_net_name)
        engine = engine_of(context)
        return (engine.runnable_module(engine.controlnet(path)),)


class ControlNetApply(Node):
    schema = NodeSchema(
        name="ControlNetApply", display_name="Apply ControlNet (OLD)",
        category="conditioning/controlnet",
        inputs=[Input("conditioning", CONDITIONING), Input("control_net", CONTROL_NET),
                Input("image", IMAGE), Input("strength", FLOAT, **_STRENGTH)],
        outputs=[Output(CONDITIONING)],
    )

    @classmethod
    def execute(cls, conditioning, control_net, image, strength):
        if strength == 0:
            return (conditioning,)
        spec = ControlSpec(control_net, _hint(image), float(strength))
        return (_with_control(conditioning, spec, **{_APPLY_TO_UNCOND: True}),)


class ControlNetApplyAdvanced(Node):
    schema = NodeSchema(
        name="ControlNetApplyAdvanced", display_name="Apply ControlNet",
        category="conditioning/controlnet",
        inputs=[Input("positive", CONDITIONING), Input("negative", CONDITIONING),
                Input("control_net", CONTROL_NET), Input("image", IMAGE),
                Input("strength", FLOAT, **_STRENGTH),
                Input("start_percent", FLOAT, default=0.0, **_PERCENT),
                Input("end_percent", FLOAT, default=1.0, **_PERCENT),
                Input("vae", VAE, optional=True,
                      tooltip="Unused by the SD1/SD2/SDXL ControlNets (ComfyUI takes it for "
                              "ControlNets that work on latents).")],
        outputs=[Output(CONDITIONING, "positive"), Output(CONDITIONING, "negative")],
    )

    @classmethod
    def execute(cls, positive, negative, control_net, image, strength, start_percent,
                end_percent, vae=None):
        if strength == 0:
            return (positive, negative)
        spec = ControlSpec(control_net, _hint(image), float(strength), float(start_percent),
                           float(end_percent))
        return (_with_control(positive, spec), _with_control(negative, spec))


class Canny(Node):
    schema = NodeSchema(
        name="Canny", category="image/preprocessors",
        inputs=[Input("image", IMAGE),
                Input("low_threshold", FLOAT, default=0.4, min=0.01, max=0.99, step=0.01),
                Input("high_threshold", FLOAT, default=0.8, min=0.01, max=0.99, step=0.01)],
        outputs=[Output(IMAGE)],
    )

    @classmethod
    def execute(cls, image, low_threshold, high_threshold):
        if low_threshold > high_threshold:
            raise ValueError(f"Canny: low_threshold {low_threshold} is above high_threshold "
                             f"{high_threshold}; the low one must not exceed the high one")
        edges = canny(_hint(image), low_threshold, high_threshold)
        return (edges.movedim(1, -1).contiguous(),)


CONTROL_NODES = [ControlNetLoader, ControlNetApply, ControlNetApplyAdvanced, Canny]
