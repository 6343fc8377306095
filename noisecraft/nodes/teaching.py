"""noisecraft's teaching nodes: look inside diffusion from a graph.

* ``NoisecraftForwardProcess``: the forward process q(x_t | x_0) = N(sqrt(a_t) x_0,
  (1 - a_t) I) (Ho et al. 2020, eq. 4) of a latent at a chosen timestep t of the model's
  training schedule, seeded like the samplers (item i: seed + i).  Decode it to see how much of
  the image is left at t.
* ``NoisecraftDenoiseSteps``: a KSampler that also returns the model's clean estimate x0 after
  every step, decoded, as an IMAGE batch (first batch item; one image per step), to watch the
  picture form.
"""

from __future__ import annotations

import torch

from noisecraft.diffusion import q_sample
from noisecraft.graph.context import NodeContext
from noisecraft.graph.schema import (
    FLOAT,
    IMAGE,
    INT,
    LATENT,
    MAX_SEED,
    MODEL,
    VAE,
    Input,
    Node,
    NodeSchema,
    Output,
)
from noisecraft.nodes.model_values import Guider
from noisecraft.nodes.samplers import SEED_MODULUS, KSampler, sample_latent
from noisecraft.nodes.sampling import BasicScheduler, SamplerChoice
from noisecraft.nodes.vae import decode_to_pixels
from noisecraft.pipelines.common import generators_for, seeded_noise


class NoisecraftForwardProcess(Node):
    schema = NodeSchema(
        name="NoisecraftForwardProcess", display_name="Forward Process q(x_t | x_0)",
        category="noisecraft/teaching",
        description="Noise a latent to timestep t of the model's training schedule: "
                    "sqrt(alpha_bar_t) * x0 + sqrt(1 - alpha_bar_t) * noise.",
        inputs=[
            Input("model", MODEL, tooltip="Whose training noise schedule to use."),
            Input("samples", LATENT),
            Input("timestep", INT, default=500, min=0, max=999,
                  tooltip="t in 0 (clean) .. T-1 (pure noise); clamped to the schedule."),
            Input("seed", INT, default=0, min=0, max=MAX_SEED),
        ],
        outputs=[Output(LATENT, "noised"), Output(FLOAT, "sigma")],
    )

    @classmethod
    def execute(cls, model, samples, timestep, seed):
        schedule = model.schedule()
        t = min(timestep, schedule.num_timesteps - 1)
        fmt = model.bundle.family.latent
        x0 = fmt.process_in(samples["samples"].float())
        indices = samples.get("batch_index") or range(x0.shape[0])
        gens = generators_for([(seed + int(i)) % SEED_MODULUS for i in indices])
        noise = seeded_noise(gens, tuple(x0.shape[1:]))
        xt = q_sample(x0, noise, t, schedule.alphas_cumprod.float())
        return ({**samples, "samples": fmt.process_out(xt)}, float(schedule.sigmas[t]))


class NoisecraftDenoiseSteps(Node):
    schema = NodeSchema(
        name="NoisecraftDenoiseSteps", display_name="KSampler + x0 Previews",
        category="noisecraft/teaching", needs_context=True,
        description="Sample like KSampler and return the model's x0 estimate after each "
                    "step, decoded, as an image batch (one image per step).",
        inputs=[*KSampler.schema.inputs, Input("vae", VAE, tooltip="Decodes the x0 previews.")],
        outputs=[Output(LATENT), Output(IMAGE, "x0_steps")],
    )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, denoise, vae, context: NodeContext = None):
        (sigmas,) = BasicScheduler.execute(model, scheduler, steps, denoise)
        fmt = model.bundle.family.latent
        frames: list[torch.Tensor] = []

        def keep(step, total, x0):
            frames.append(fmt.process_out(x0[:1].float()).cpu())

        out, _ = sample_latent(context, Guider(model, positive, negative, cfg),
                               SamplerChoice(sampler_name), sigmas, latent_image, seed=seed,
                               on_x0=keep)
        if not frames:
            return (out, decode_to_pixels(vae, out["samples"][:1]))
        return (out, decode_to_pixels(vae, torch.cat(frames)))


TEACHING_NODES = [NoisecraftForwardProcess, NoisecraftDenoiseSteps]
