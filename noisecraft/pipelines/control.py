"""ControlNets in the one engine: from a request's :class:`~noisecraft.request.ControlNetUnit`
entries (or a graph's CONDITIONING) to a U-Net that adds their residuals.

The U-Net is wrapped, never patched: :func:`controlled_unet` returns a
:class:`~noisecraft.models.controlnet.ControlledModel` that stands where the U-Net stood (it
keeps the U-Net's ``config``, so pipelines still see e.g. an inpainting model's 9 channels), and
:func:`with_controls` a bundle copy holding it.  Every pipeline (txt2img, img2img, inpaint,
outpaint, the hires pass) therefore runs the ControlNets without knowing about them; the
control image is fitted to each pass's latent size (centre crop + resize to 8x).

Under classifier-free guidance the ControlNets act on the prompt and the negative prompt
(ComfyUI's "Apply ControlNet" and AUTOMATIC1111's "Balanced" mode).  When the two sides carry
different ControlNets (a graph can do that), :class:`SidedControlledModel` runs each side with
its own; the rows are told apart by a ``control_side`` entry the guided denoiser adds to the
conditioning (1 = prompt, 0 = negative prompt).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from noisecraft.control_images import canny
from noisecraft.images import load_image
from noisecraft.models.controlnet import ControlledModel, ControlNet, ControlSpec
from noisecraft.models.family import ModelBundle
from noisecraft.request import ControlNetUnit, InputError

CONTROL_SIDE = "control_side"


def controlled_unet(unet: nn.Module, controls: Sequence[ControlSpec],
                    num_timesteps: int = 1000) -> nn.Module:
    """``unet`` with ``controls`` attached (a drop-in for it); ``unet`` itself when empty."""
    if not controls:
        return unet
    try:
        model = ControlledModel(unet, controls, num_timesteps=num_timesteps)
    except ValueError as e:
        raise InputError(str(e)) from None
    model.config = getattr(unet, "config", None)  # pipelines read the U-Net's config
    return model


class SidedControlledModel(nn.Module):
    """A U-Net whose prompt rows (``control_side`` 1) get ``cond_controls`` and negative-prompt
    rows (0) ``uncond_controls``; each side runs as its own U-Net call.  Without
    ``control_side`` every row is a prompt row."""

    def __init__(self, unet: nn.Module, cond_controls: Sequence[ControlSpec],
                 uncond_controls: Sequence[ControlSpec], num_timesteps: int = 1000):
        super().__init__()
        self.config = getattr(unet, "config", None)
        self.cond_model = controlled_unet(unet, cond_controls, num_timesteps)
        self.uncond_model = controlled_unet(unet, uncond_controls, num_timesteps)

    def forward(self, x, timesteps, context=None, y=None, control_side=None, **kwargs):
        if control_side is None:
            return self.cond_model(x, timesteps, context, y, **kwargs)
        t = torch.as_tensor(timesteps, device=x.device).expand(x.shape[0])
        out = None
        for rows, model in ((control_side > 0.5, self.cond_model),
                            (control_side <= 0.5, self.uncond_model)):
            if not rows.any():
                continue
            part = model(x[rows], t[rows], None if context is None else context[rows],
                         None if y is None else y[rows], **kwargs)
            out = x.new_zeros((x.shape[0], *part.shape[1:])) if out is None else out
            out[rows] = part.to(out.dtype)
        return out


def sided_unet(unet: nn.Module, cond_controls: Sequence[ControlSpec],
               uncond_controls: Sequence[ControlSpec], num_timesteps: int = 1000) -> nn.Module:
    return SidedControlledModel(unet, cond_controls, uncond_controls, num_timesteps)


def with_controls(bundle: ModelBundle, controls: Sequence[ControlSpec]) -> ModelBundle:
    """A copy of ``bundle`` whose U-Net runs ``controls`` (``bundle`` itself when empty)."""
    if not controls:
        return bundle
    unet = controlled_unet(bundle.unet, controls, bundle.family.num_train_timesteps)
    return replace(bundle, unet=unet)


def control_image(unit: ControlNetUnit) -> torch.Tensor:
    """The unit's control image as ``[1, 3, H, W]`` in [0, 1], preprocessed."""
    image = load_image(unit.image, f"ControlNet {unit.model!r} image")
    a = np.asarray(image.convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0
    pixels = torch.from_numpy(np.ascontiguousarray(a))[None]
    if unit.preprocessor == "canny":
        pixels = canny(pixels)
    return pixels


def control_specs(units: Sequence[ControlNetUnit],
                  load: Callable[[str], ControlNet]) -> list[ControlSpec]:
    """ControlSpecs for a request's units; ``load(model)`` gives the (cached) ControlNet."""
    specs = []
    for unit in units:
        net = load(unit.model)
        specs.append(ControlSpec(net, control_image(unit), float(unit.strength),
                                 float(unit.start_percent), float(unit.end_percent)))
    return specs
