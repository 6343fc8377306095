"""The sampler nodes (KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced) and
the guiders (CFGGuider, BasicGuider).  All four samplers end in :func:`sample_latent`, which
runs the engine's own pieces: ``seeded_noise``, ``guided_denoiser`` / ``masked_denoiser`` and
``run_sampler`` (the one sampling loop, with progress out and cancellation in).

Seeds (the engine's convention, not ComfyUI's): item i of a latent batch uses its own CPU
generator seeded ``seed + i`` (``seed + batch_index[i]`` after LatentFromBatch), draws its
initial noise from it, and stochastic samplers continue drawing from it.  So a KSampler with
batch 1 equals ``generate_image`` with the same seed, and item i of a batch equals a batch-1
run with seed + i.  (ComfyUI draws a whole batch from one generator seeded once, so for
batch > 1 its images differ from ours.)  SamplerCustomAdvanced takes its initial noise from
the NOISE input (RandomNoise draws ComfyUI's way) and per-step noise as above.

Denoise (ComfyUI's): ``steps`` steps over the last ``steps + 1`` sigmas of an
``int(steps / denoise)``-step schedule; so ``generate_image(steps=N, strength=s)`` is
``KSampler(steps=int(N * s), denoise=s)`` whenever ``N * s`` is a whole number.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from noisecraft.graph.context import NodeContext
from noisecraft.graph.schema import (
    BOOLEAN,
    COMBO,
    CONDITIONING,
    FLOAT,
    GUIDER,
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
from noisecraft.nodes.guiders import guider_denoiser, latent_mask
from noisecraft.nodes.model_values import Guider, engine_of
from noisecraft.nodes.sampling import BasicScheduler, SamplerChoice
from noisecraft.pipelines.common import (
    Run,
    generators_for,
    masked_denoiser,
    run_sampler,
    seeded_noise,
)
from noisecraft.samplers import sampler_names
from noisecraft.schedules import COMFY_SPACINGS

SEED_MODULUS = 2**64


def sample_latent(
    context: NodeContext,
    guider: Guider,
    sampler: SamplerChoice,
    sigmas: torch.Tensor,
    latent: dict[str, Any],
    *,
    seed: int,
    add_noise: bool = True,
    noise: Any = None,
    on_x0=None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sample ``latent`` (raw VAE latents, ComfyUI's LATENT) over ``sigmas``; returns the new
    LATENT and the last step's x0 estimate as a LATENT.  ``noise``: a NOISE value for the
    initial noise (else the per-item generators'); ``on_x0(step, total, x0)`` sees every step."""
    context.check_interrupted()
    if len(sigmas) < 2:
        return latent, latent
    engine = engine_of(context)
    bundle = engine.runnable(guider.model.bundle)  # the U-Net behind the engine's backend
    guider = replace(guider, model=replace(guider.model, bundle=bundle))
    fmt = bundle.family.latent
    x0 = fmt.process_in(latent["samples"].float()).to(engine.device)
    indices = latent.get("batch_index") or range(x0.shape[0])
    generators = generators_for([(seed + int(i)) % SEED_MODULUS for i in indices])
    drawn = seeded_noise(generators, tuple(x0.shape[1:]))  # advances each generator
    if noise is not None:  # unit noise in the model's latent space, as ComfyUI's NOISE
        drawn = noise.generate_noise(latent).float().reshape(x0.shape)
    if not add_noise:
        drawn = torch.zeros_like(x0)
    drawn = drawn.to(engine.device)
    last: dict[str, torch.Tensor] = {}

    def on_step(event) -> None:
        last["x0"] = event.x0
        if on_x0 is not None:
            on_x0(event.step, event.total, event.x0)
        preview = engine.preview(bundle, event.x0[:1])[0]
        context.progress(event.step, event.total, preview)

    run = Run(bundle, engine.device, generators, on_step, context.cancel)
    with torch.inference_mode():
        denoiser = guider_denoiser(guider, run, x0.shape)
        mask = latent.get("noise_mask")
        if mask is not None:
            mask = latent_mask(mask, bundle, x0.shape).to(engine.device)
            denoiser = masked_denoiser(denoiser, x0, mask, drawn)
        x = x0 + drawn * float(sigmas[0])
        out = run_sampler(run, denoiser, x, sigmas, sampler.name,
                          options=sampler.options)
        if mask is not None:
            out = out * mask + x0 * (1 - mask)
        denoised = last.get("x0", out)
    result = {**latent, "samples": fmt.process_out(out).cpu()}
    return result, {**latent, "samples": fmt.process_out(denoised).cpu()}


_SEED = {"default": 0, "min": 0, "max": MAX_SEED, "control_after_generate": True}
_CFG = {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}


def _common_inputs(seed_name: str) -> list[Input]:
    return [
        Input("model", MODEL, tooltip="The model used for denoising the input latent."),
        Input(seed_name, INT, **_SEED,
              tooltip="The random seed used for creating the noise (item i: seed + i)."),
        Input("steps", INT, default=20, min=1, max=10000,
              tooltip="The number of steps used in the denoising process."),
        Input("cfg", FLOAT, **_CFG, tooltip="The Classifier-Free Guidance scale."),
        Input("sampler_name", COMBO, choices=lambda context: sampler_names(),
              tooltip="The algorithm used when sampling."),
        Input("scheduler", COMBO, choices=COMFY_SPACINGS,
              tooltip="How the sigmas (noise levels) are spaced."),
        Input("positive", CONDITIONING), Input("negative", CONDITIONING),
        Input("latent_image", LATENT, tooltip="The latent image to denoise."),
    ]


class KSampler(Node):
    schema = NodeSchema(
        name="KSampler", category="sampling", needs_context=True,
        description="Uses the provided model, positive and negative conditioning to denoise "
                    "the latent image.",
        inputs=[*_common_inputs("seed"),
                Input("denoise", FLOAT, default=1.0, min=0.0, max=1.0, step=0.01,
                      tooltip="The amount of denoising applied; lower values keep more of "
                              "the input latent (image to image).")],
        outputs=[Output(LATENT, tooltip="The denoised latent.")],
    )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, denoise=1.0, context: NodeContext = None):
        (sigmas,) = BasicScheduler.execute(model, scheduler, steps, denoise)
        guider = Guider(model, positive, negative, cfg)
        out, _ = sample_latent(context, guider, SamplerChoice(sampler_name), sigmas,
                               latent_image, seed=seed)
        return (out,)


class KSamplerAdvanced(Node):
    schema = NodeSchema(
        name="KSamplerAdvanced", display_name="KSampler (Advanced)", category="sampling",
        needs_context=True,
        inputs=[
            Input("model", MODEL),
            Input("add_noise", COMBO, choices=["enable", "disable"]),
            *_common_inputs("noise_seed")[1:],
            Input("start_at_step", INT, default=0, min=0, max=10000),
            Input("end_at_step", INT, default=10000, min=0, max=10000),
            Input("return_with_leftover_noise", COMBO, choices=["disable", "enable"]),
        ],
        outputs=[Output(LATENT)],
    )

    @classmethod
    def execute(cls, model, add_noise, noise_seed, steps, cfg, sampler_name, scheduler,
                positive, negative, latent_image, start_at_step, end_at_step,
                return_with_leftover_noise, context: NodeContext = None):
        """Steps [start_at_step, end_at_step) of a ``steps``-step schedule; with leftover noise
        the latent stays at the noise level of end_at_step (a hand-off to another sampler,
        e.g. SDXL base -> refiner), else the last sigma is set to 0."""
        (sigmas,) = BasicScheduler.execute(model, scheduler, steps, 1.0)
        if end_at_step < steps:
            sigmas = sigmas[:end_at_step + 1].clone()
            if return_with_leftover_noise != "enable":
                sigmas[-1] = 0
        if start_at_step >= len(sigmas) - 1:
            return (latent_image,)
        sigmas = sigmas[start_at_step:]
        guider = Guider(model, positive, negative, cfg)
        out, _ = sample_latent(context, guider, SamplerChoice(sampler_name), sigmas,
                               latent_image, seed=noise_seed, add_noise=add_noise == "enable")
        return (out,)


class SamplerCustom(Node):
    schema = NodeSchema(
        name="SamplerCustom", category="sampling/custom_sampling", needs_context=True,
        inputs=[
            Input("model", MODEL),
            Input("add_noise", BOOLEAN, default=True),
            Input("noise_seed", INT, **_SEED),
            Input("cfg", FLOAT, **_CFG),
            Input("positive", CONDITIONING), Input("negative", CONDITIONING),
            Input("sampler", SAMPLER), Input("sigmas", SIGMAS),
            Input("latent_image", LATENT),
        ],
        outputs=[Output(LATENT, "output"), Output(LATENT, "denoised_output")],
    )

    @classmethod
    def execute(cls, model, add_noise, noise_seed, cfg, positive, negative, sampler, sigmas,
                latent_image, context: NodeContext = None):
        guider = Guider(model, positive, negative, cfg)
        return sample_latent(context, guider, sampler, sigmas, latent_image, seed=noise_seed,
                             add_noise=add_noise)


class SamplerCustomAdvanced(Node):
    schema = NodeSchema(
        name="SamplerCustomAdvanced", category="sampling/custom_sampling", needs_context=True,
        inputs=[Input("noise", NOISE), Input("guider", GUIDER), Input("sampler", SAMPLER),
                Input("sigmas", SIGMAS), Input("latent_image", LATENT)],
        outputs=[Output(LATENT, "output"), Output(LATENT, "denoised_output")],
    )

    @classmethod
    def execute(cls, noise, guider, sampler, sigmas, latent_image, context: NodeContext = None):
        return sample_latent(context, guider, sampler, sigmas, latent_image,
                             seed=int(getattr(noise, "seed", 0)), noise=noise)


class CFGGuider(Node):
    schema = NodeSchema(
        name="CFGGuider", category="sampling/custom_sampling/guiders",
        inputs=[Input("model", MODEL), Input("positive", CONDITIONING),
                Input("negative", CONDITIONING), Input("cfg", FLOAT, **_CFG)],
        outputs=[Output(GUIDER)],
    )

    @classmethod
    def execute(cls, model, positive, negative, cfg):
        return (Guider(model, positive, negative, cfg),)


class BasicGuider(Node):
    schema = NodeSchema(
        name="BasicGuider", category="sampling/custom_sampling/guiders",
        inputs=[Input("model", MODEL), Input("conditioning", CONDITIONING)],
        outputs=[Output(GUIDER)],
    )

    @classmethod
    def execute(cls, model, conditioning):
        """The conditional prediction alone (no negative prompt, CFG 1)."""
        return (Guider(model, conditioning, None, 1.0),)


SAMPLER_NODES = [KSampler, KSamplerAdvanced, SamplerCustom, SamplerCustomAdvanced, CFGGuider,
                 BasicGuider]
