"""Custom-sampling building blocks that need no loaded weights: sampler choice, sigma
schedules and sigma-list edits, noise.  (SamplerCustomAdvanced, which runs them, needs a model
and lives with the model nodes.)  Names, inputs and ranges are ComfyUI's
(``comfy_extras/nodes_custom_sampler.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from noisecraft.diffusion import add_noise
from noisecraft.graph.schema import (
    COMBO,
    FLOAT,
    INT,
    LATENT,
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
    beta_sigmas,
    exponential_sigmas,
    karras_sigmas,
    laplace_sigmas,
    polyexponential_sigmas,
    sd_turbo_sigmas,
    spacing_sigmas,
    vp_sigmas,
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


class PolyexponentialScheduler(Node):
    schema = NodeSchema(
        name="PolyexponentialScheduler", category="sampling/custom_sampling/schedulers",
        inputs=[
            Input("steps", INT, default=20, min=1, max=10000),
            Input("sigma_max", FLOAT, default=14.614642, **_SIGMA_RANGE),
            Input("sigma_min", FLOAT, default=0.0291675, **_SIGMA_RANGE),
            Input("rho", FLOAT, default=1.0, min=0.0, max=100.0, step=0.01, round=False),
        ],
        outputs=[Output(SIGMAS)],
    )

    @classmethod
    def execute(cls, steps, sigma_max, sigma_min, rho):
        return (polyexponential_sigmas(steps, sigma_min, sigma_max, rho),)


class LaplaceScheduler(Node):
    schema = NodeSchema(
        name="LaplaceScheduler", category="sampling/custom_sampling/schedulers",
        inputs=[
            Input("steps", INT, default=20, min=1, max=10000),
            Input("sigma_max", FLOAT, default=14.614642, **_SIGMA_RANGE),
            Input("sigma_min", FLOAT, default=0.0291675, **_SIGMA_RANGE),
            Input("mu", FLOAT, default=0.0, min=-10.0, max=10.0, step=0.1, round=False),
            Input("beta", FLOAT, default=0.5, min=0.0, max=10.0, step=0.1, round=False),
        ],
        outputs=[Output(SIGMAS)],
    )

    @classmethod
    def execute(cls, steps, sigma_max, sigma_min, mu, beta):
        """``steps`` sigmas and no final 0, as ComfyUI's: a sampler given them stops at the
        last, still noisy, level (:func:`~noisecraft.schedules.laplace_sigmas`)."""
        return (laplace_sigmas(steps, sigma_min, sigma_max, mu, beta),)


class VPScheduler(Node):
    schema = NodeSchema(
        name="VPScheduler", category="sampling/custom_sampling/schedulers",
        inputs=[
            Input("steps", INT, default=20, min=1, max=10000),
            Input("beta_d", FLOAT, default=19.9, **_SIGMA_RANGE),
            Input("beta_min", FLOAT, default=0.1, **_SIGMA_RANGE),
            Input("eps_s", FLOAT, default=0.001, min=0.0, max=1.0, step=0.0001, round=False),
        ],
        outputs=[Output(SIGMAS)],
    )

    @classmethod
    def execute(cls, steps, beta_d, beta_min, eps_s):
        return (vp_sigmas(steps, beta_d, beta_min, eps_s),)


class SDTurboScheduler(Node):
    schema = NodeSchema(
        name="SDTurboScheduler", category="sampling/custom_sampling/schedulers",
        inputs=[
            Input("model", MODEL),
            Input("steps", INT, default=1, min=1, max=10),
            Input("denoise", FLOAT, default=1.0, min=0, max=1.0, step=0.01),
        ],
        outputs=[Output(SIGMAS)],
    )

    @classmethod
    def execute(cls, model, steps, denoise):
        return (sd_turbo_sigmas(model_schedule(model), steps, denoise),)


class BetaSamplingScheduler(Node):
    schema = NodeSchema(
        name="BetaSamplingScheduler", category="sampling/custom_sampling/schedulers",
        inputs=[
            Input("model", MODEL),
            Input("steps", INT, default=20, min=1, max=10000),
            Input("alpha", FLOAT, default=0.6, min=0.0, max=50.0, step=0.01, round=False),
            Input("beta", FLOAT, default=0.6, min=0.0, max=50.0, step=0.01, round=False),
        ],
        outputs=[Output(SIGMAS)],
    )

    @classmethod
    def execute(cls, model, steps, alpha, beta):
        return (beta_sigmas(model_schedule(model), steps, alpha, beta),)


class SplitSigmasDenoise(Node):
    schema = NodeSchema(
        name="SplitSigmasDenoise", category="sampling/custom_sampling/sigmas",
        inputs=[Input("sigmas", SIGMAS),
                Input("denoise", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01)],
        outputs=[Output(SIGMAS, "high_sigmas"), Output(SIGMAS, "low_sigmas")],
    )

    @classmethod
    def execute(cls, sigmas, denoise):
        """The last round(steps x denoise) steps become low_sigmas, the ones before
        high_sigmas (they share the sigma where they meet; denoise 0 leaves high empty and low
        the last sigma, as ComfyUI's slicing does)."""
        total = round(max(len(sigmas) - 1, 0) * denoise)
        return (sigmas[:-total], sigmas[-(total + 1):])


class FlipSigmas(Node):
    schema = NodeSchema(
        name="FlipSigmas", category="sampling/custom_sampling/sigmas",
        inputs=[Input("sigmas", SIGMAS)], outputs=[Output(SIGMAS)],
    )

    @classmethod
    def execute(cls, sigmas):
        """Reversed (ascending, e.g. to add noise back step by step); a leading 0 becomes
        0.0001 so the first step has a noise level."""
        if len(sigmas) == 0:
            return (sigmas,)
        out = sigmas.flip(0)
        if out[0] == 0:
            out[0] = 0.0001
        return (out,)


def latent_format_of(model: Any):
    """The latent scaling of a MODEL value (its bundle's or its own family's)."""
    family = getattr(getattr(model, "bundle", model), "family", None)
    if family is None:
        raise TypeError(f"cannot find a model family on the MODEL value {type(model).__name__}")
    return family.latent


class AddNoise(Node):
    schema = NodeSchema(
        name="AddNoise", category="_for_testing/custom_sampling/noise",
        inputs=[Input("model", MODEL), Input("noise", NOISE), Input("sigmas", SIGMAS),
                Input("latent_image", LATENT)],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, model, noise, sigmas, latent_image):
        """The latent with the NOISE added at the level the sigmas span, |sigmas[0] -
        sigmas[-1]| (or sigmas[0] alone), in the model's latent space: x + sigma * noise.  An
        all-zero latent is left unscaled, as ComfyUI does."""
        if len(sigmas) == 0:
            return (latent_image,)
        fmt = latent_format_of(model)
        x = latent_image["samples"].float()
        drawn = noise.generate_noise(latent_image).float().reshape(x.shape)
        scale = abs(float(sigmas[0]) - float(sigmas[-1])) if len(sigmas) > 1 else float(sigmas[0])
        if torch.count_nonzero(x) > 0:
            x = fmt.process_in(x)
        noisy = torch.nan_to_num(fmt.process_out(add_noise(x, drawn, scale)),
                                 nan=0.0, posinf=0.0, neginf=0.0)
        return ({**latent_image, "samples": noisy},)


SAMPLING_NODES = [KSamplerSelect, BasicScheduler, KarrasScheduler, ExponentialScheduler,
                  PolyexponentialScheduler, LaplaceScheduler, VPScheduler, SDTurboScheduler,
                  BetaSamplingScheduler, SplitSigmas, SplitSigmasDenoise, FlipSigmas,
                  DisableNoise, RandomNoise, AddNoise]
