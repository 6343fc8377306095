"""Custom-sampling building blocks that need no loaded weights: sampler choice, sigma
schedules, noise.  (SamplerCustomAdvanced, which runs them, needs a model and lives with the
model nodes.)"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from noisecraft.graph.schema import (
    COMBO,
    FLOAT,
    INT,
    MAX_SEED,
    MODEL,
    NOISE,
    SAMPLER,
    SIGMAS,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.samplers import sampler_names
from noisecraft.schedules import (
    COMFY_SPACINGS,
    DiscreteSchedule,
    exponential_sigmas,
    karras_sigmas,
    spacing_sigmas,
)


@dataclass(frozen=True)
class SamplerChoice:
    """A SAMPLER value: a noisecraft sampler name and options for it (e.g. eta)."""

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SeededNoise:
    """A NOISE value.  ``generate_noise(latent)`` draws like ComfyUI's ``prepare_noise``: one
    CPU generator seeded once for the whole batch (unlike noisecraft's pipelines, which seed
    each image with seed + i), honouring a latent's ``batch_index``."""

    seed: int

    def generate_noise(self, latent: dict[str, Any]) -> torch.Tensor:
        x = latent["samples"]
        gen = torch.Generator("cpu").manual_seed(self.seed)
        indices = latent.get("batch_index")
        if indices is None:
            return torch.randn(x.shape, generator=gen, dtype=x.dtype)
        unique, inverse = np.unique(np.asarray(indices), return_inverse=True)
        drawn = {}
        for i in range(int(unique[-1]) + 1):
            item = torch.randn((1, *x.shape[1:]), generator=gen, dtype=x.dtype)
            if i in unique:
                drawn[i] = item
        return torch.cat([drawn[int(unique[k])] for k in inverse.reshape(-1)])


@dataclass(frozen=True)
class ZeroNoise:
    """A NOISE value of zeros (DisableNoise)."""

    seed: int = 0

    def generate_noise(self, latent: dict[str, Any]) -> torch.Tensor:
        return torch.zeros_like(latent["samples"], device="cpu")


def model_schedule(model: Any) -> DiscreteSchedule:
    """The training sigma table of a MODEL value: its ``schedule()``, or its family's."""
    for owner in (model, getattr(model, "bundle", None)):
        if owner is None:
            continue
        if callable(getattr(owner, "schedule", None)):
            return owner.schedule()
        family = getattr(owner, "family", None)
        if family is not None and callable(getattr(family, "schedule", None)):
            return family.schedule()
    raise TypeError(
        f"cannot find a noise schedule on the MODEL value {type(model).__name__}: it needs a "
        "schedule() method or a .family with one (e.g. a noisecraft ModelBundle)"
    )


class KSamplerSelect(Node):
    schema = NodeSchema(
        name="KSamplerSelect", category="sampling/custom_sampling/samplers",
        inputs=[Input("sampler_name", COMBO, choices=lambda context: sampler_names())],
        outputs=[Output(SAMPLER)],
    )

    @classmethod
    def execute(cls, sampler_name):
        return (SamplerChoice(sampler_name),)


class BasicScheduler(Node):
    schema = NodeSchema(
        name="BasicScheduler", category="sampling/custom_sampling/schedulers",
        inputs=[
            Input("model", MODEL),
            Input("scheduler", COMBO, choices=COMFY_SPACINGS),
            Input("steps", INT, default=20, min=1, max=10000),
            Input("denoise", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01),
        ],
        outputs=[Output(SIGMAS)],
    )

    @classmethod
    def execute(cls, model, scheduler, steps, denoise):
        """The last ``steps + 1`` sigmas of a ``steps / denoise`` step schedule (float64);
        empty when denoise is 0."""
        total = steps
        if denoise < 1.0:
            if denoise <= 0.0:
                return (torch.zeros(0, dtype=torch.float64),)
            total = int(steps / denoise)
        sigmas = spacing_sigmas(scheduler, model_schedule(model), total)
        return (sigmas[-(steps + 1):],)


_SIGMA_RANGE = {"min": 0.0, "max": 5000.0, "step": 0.01, "round": False}


class KarrasScheduler(Node):
    schema = NodeSchema(
        name="KarrasScheduler", category="sampling/custom_sampling/schedulers",
        inputs=[
            Input("steps", INT, default=20, min=1, max=10000),
            Input("sigma_max", FLOAT, default=14.614642, **_SIGMA_RANGE),
            Input("sigma_min", FLOAT, default=0.0291675, **_SIGMA_RANGE),
            Input("rho", FLOAT, default=7.0, min=0.0, max=100.0, step=0.01, round=False),
        ],
        outputs=[Output(SIGMAS)],
    )

    @classmethod
    def execute(cls, steps, sigma_max, sigma_min, rho):
        return (karras_sigmas(steps, sigma_min, sigma_max, rho),)


class ExponentialScheduler(Node):
    schema = NodeSchema(
        name="ExponentialScheduler", category="sampling/custom_sampling/schedulers",
        inputs=[
            Input("steps", INT, default=20, min=1, max=10000),
            Input("sigma_max", FLOAT, default=14.614642, **_SIGMA_RANGE),
            Input("sigma_min", FLOAT, default=0.0291675, **_SIGMA_RANGE),
        ],
        outputs=[Output(SIGMAS)],
    )

    @classmethod
    def execute(cls, steps, sigma_max, sigma_min):
        return (exponential_sigmas(steps, sigma_min, sigma_max),)


class SplitSigmas(Node):
    schema = NodeSchema(
        name="SplitSigmas", category="sampling/custom_sampling/sigmas",
        inputs=[Input("sigmas", SIGMAS), Input("step", INT, default=0, min=0, max=10000)],
        outputs=[Output(SIGMAS, "high_sigmas"), Output(SIGMAS, "low_sigmas")],
    )

    @classmethod
    def execute(cls, sigmas, step):
        """sigmas[:step + 1] and sigmas[step:] (they share the sigma at ``step``)."""
        return (sigmas[:step + 1], sigmas[step:])


class DisableNoise(Node):
    schema = NodeSchema(name="DisableNoise", category="sampling/custom_sampling/noise",
                        inputs=[], outputs=[Output(NOISE)])

    @classmethod
    def execute(cls):
        return (ZeroNoise(),)


class RandomNoise(Node):
    schema = NodeSchema(
        name="RandomNoise", category="sampling/custom_sampling/noise",
        inputs=[Input("noise_seed", INT, default=0, min=0, max=MAX_SEED,
                      control_after_generate=True)],
        outputs=[Output(NOISE)],
    )

    @classmethod
    def execute(cls, noise_seed):
        return (SeededNoise(noise_seed),)


SAMPLING_NODES = [KSamplerSelect, BasicScheduler, KarrasScheduler, ExponentialScheduler,
                  SplitSigmas, DisableNoise, RandomNoise]
