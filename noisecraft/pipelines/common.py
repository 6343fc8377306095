"""The steps every pipeline shares: seeded noise, sigmas, the guided denoiser, the sampling loop
(progress out, cancel in), and VAE encode/decode.

Seeds (the convention diffusers, ComfyUI and AUTOMATIC1111 share): image i of a batch uses seed
``seed + i``; its initial noise is ``torch.randn(shape, generator=torch.Generator("cpu")
.manual_seed(seed + i))`` with ``shape = [1, C, H/8, W/8]``, drawn in float32 on the CPU and then
moved to the device, so a seed gives the same noise on every device.  Stochastic samplers draw
their per-step noise from the same per-image generator, continuing after the initial draw (as a
diffusers pipeline given that generator does) or, for the SDE samplers, from a Brownian tree
seeded with ``seed + i`` (ComfyUI's choice); so image i of a batch equals a batch-1 run with
seed ``seed + i``.

Latents are kept in float32 between steps whatever the model's dtype; the U-Net sees its own
dtype (cast at the call) and its output is cast back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from noisecraft.conditioning import Conditioning
from noisecraft.diffusion import BoundDenoiser, Denoiser, append_dims
from noisecraft.guidance import NO_SKIP, SkipUncond, cfg_denoiser
from noisecraft.models.controlnet import ControlSpec
from noisecraft.models.family import Family, ModelBundle
from noisecraft.pipelines.control import CONTROL_SIDE, controlled_unet, sided_unet
from noisecraft.request import (
    CancelToken,
    GenerationRequest,
    InputError,
    Interrupted,
    ProgressEvent,
)
from noisecraft.samplers import Step, get_sampler, sample
from noisecraft.samplers.cfg_pp import cfg_pp_denoiser
from noisecraft.samplers.noise import default_noise
from noisecraft.schedules import spacing_sigmas

ProgressCallback = Callable[[ProgressEvent], None]
STOCHASTIC_OPTION = "eta"


@dataclass
class Run:
    """One request's resolved context: the model, the per-image generators, progress/cancel."""

    bundle: ModelBundle
    device: torch.device
    generators: list[torch.Generator]
    callback: ProgressCallback | None = None
    cancel: CancelToken | None = None

    @property
    def batch(self) -> int:
        return len(self.generators)

    def check_cancel(self, step: int = 0, total: int = 0, stage: str = "sample") -> None:
        if self.cancel is not None and self.cancel.cancelled:
            raise Interrupted(step, total, stage)


def generators_for(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


def seeded_noise(generators: list[torch.Generator], shape: tuple[int, ...]) -> torch.Tensor:
    """[B, *shape] standard normal, row i from generator i (float32, CPU)."""
    return torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32)
                      for g in generators])


def noise_source(generators: list[torch.Generator], x: torch.Tensor, sampler: str,
                 sigmas: torch.Tensor):
    """The sampler's NoiseSource for a batch: row i is ComfyUI's choice of noise for ``sampler``
    (``samplers.noise.default_noise``) from generator i: a Brownian tree seeded with seed + i
    for the SDE samplers, else independent draws continuing generator i."""
    rows = [default_noise(sampler, x[i:i + 1], sigmas, g) for i, g in enumerate(generators)]

    def draw(sigma, sigma_next) -> torch.Tensor:
        return torch.cat([row(sigma, sigma_next) for row in rows])

    return draw


def latent_shape(bundle: ModelBundle, width: int, height: int) -> tuple[int, int, int]:
    f = vae_factor(bundle)
    if width % f or height % f:
        raise InputError(f"size {width}x{height} is not a multiple of the VAE factor {f}")
    return bundle.family.latent.channels, height // f, width // f


def vae_factor(bundle: ModelBundle) -> int:
    config = getattr(bundle.vae, "config", None)
    return getattr(config, "downscale_factor", 8)


def leading_offset(family: Family, scheduler: str, steps_offset: int | None) -> int | None:
    """The ``steps_offset`` a run of ``scheduler`` uses: for ``leading``, ``steps_offset`` or
    else the family's (diffusers' SD configs: 1); None for every other spacing (no offset)."""
    if scheduler != "leading":
        return None
    return family.steps_offset if steps_offset is None else steps_offset


def with_family_defaults(request: GenerationRequest, family: Family) -> GenerationRequest:
    """``request`` with what it leaves to the model family filled in, so that an image's
    settings record it: the ``leading`` spacing's ``steps_offset``."""
    offset = leading_offset(family, request.scheduler, request.steps_offset)
    return replace(request, steps_offset=offset)


def model_sigmas(
    bundle: ModelBundle, scheduler: str, steps: int, steps_offset: int | None = None
) -> torch.Tensor:
    """The descending sigmas [steps + 1] of ``scheduler`` (spacing) on the model's schedule;
    ``steps_offset``: see :func:`leading_offset`."""
    offset = leading_offset(bundle.family, scheduler, steps_offset)
    options = {} if offset is None else {"steps_offset": offset}
    try:
        return spacing_sigmas(scheduler, bundle.family.schedule(), steps, **options)
    except ValueError as e:
        raise InputError(str(e)) from None


def check_sampler(name: str) -> None:
    try:
        get_sampler(name)
    except ValueError as e:
        raise InputError(str(e)) from None


def strength_start(steps: int, strength: float) -> int:
    """First step of an img2img run (diffusers' convention): ``int(steps * strength)`` steps
    run, starting at index ``steps - int(steps * strength)`` of the full sigma list."""
    run_steps = min(int(steps * strength), steps)
    if run_steps < 1:
        raise InputError(
            f"strength {strength} with {steps} steps runs no step (int(steps * strength) = 0); "
            f"raise strength to at least {1 / steps:.3g} or use more steps"
        )
    return steps - run_steps


def _unet_callable(unet: torch.nn.Module) -> Callable[..., torch.Tensor]:
    """The U-Net as ``model(x, t, c_concat=None, **cond)``: casts inputs to its dtype, output to
    float32; ``c_concat`` (inpainting models) is concatenated to x along channels."""
    dtype = next(unet.parameters()).dtype

    def model(x, t, c_concat=None, **cond):
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x.dtype)], dim=1)
        cond = {k: v.to(dtype) if torch.is_tensor(v) else v for k, v in cond.items()}
        return unet(x.to(dtype), t.to(torch.float32), **cond).float()

    return model


@dataclass(frozen=True, eq=False)
class GuidedDenoiser:
    """A guided ``(x, sigma) -> x0`` that also offers ``with_uncond(x, sigma) -> (guided x0,
    unconditional x0)`` from one batched pass, which the CFG++ samplers use
    (:mod:`noisecraft.samplers.cfg_pp`); every other sampler just calls it."""

    guided: BoundDenoiser
    pair: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.guided(x, sigma)

    def with_uncond(self, x: torch.Tensor, sigma) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pair(x, sigma)


def guided_denoiser(
    bundle: ModelBundle,
    conditioning: Conditioning,
    cfg_scale: float,
    guidance_rescale: float = 0.0,
    concat: torch.Tensor | None = None,
    controls: Sequence[ControlSpec] = (),
    uncond_controls: Sequence[ControlSpec] | None = None,
    skip: SkipUncond = NO_SKIP,
) -> GuidedDenoiser:
    """CFG-guided ``(x, sigma) -> x0``; ``concat`` [B, k, h, w] goes to inpainting U-Nets.
    ``skip``: A1111's NGMS (:class:`~noisecraft.guidance.SkipUncond`); build one denoiser per
    sampling run (it counts its calls).

    ``controls``: ControlNets acting on both prompts, unless ``uncond_controls`` gives the
    negative prompt others (:mod:`noisecraft.pipelines.control`).  CFG++ samplers get the
    unconditional x0 through ``with_uncond`` (guidance rescale does not apply to them).
    """
    cond, uncond = dict(conditioning.cond), dict(conditioning.uncond)
    steps = bundle.family.num_train_timesteps
    unet = controlled_unet(bundle.unet, tuple(controls), steps)
    if uncond_controls is not None and tuple(uncond_controls) != tuple(controls):
        unet = sided_unet(bundle.unet, tuple(controls), tuple(uncond_controls), steps)
        device = conditioning.cond["context"].device
        cond[CONTROL_SIDE], uncond[CONTROL_SIDE] = torch.ones(1, device=device), \
            torch.zeros(1, device=device)
    denoiser = Denoiser(_unet_callable(unet), bundle.family.schedule(), bundle.family.prediction)
    if concat is not None:
        cond["c_concat"] = uncond["c_concat"] = concat
    guided = cfg_denoiser(denoiser, cond, uncond, cfg_scale, guidance_rescale, skip)
    return GuidedDenoiser(guided, cfg_pp_denoiser(denoiser, cond, uncond, cfg_scale).with_uncond)


def masked_denoiser(
    inner: BoundDenoiser, latent: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor
) -> BoundDenoiser:
    """Inpainting with an ordinary model (ComfyUI's ``KSamplerX0Inpaint``): before each model
    call the unmasked part of x is replaced by the original latent noised to sigma with the
    run's initial noise, and the x0 estimate keeps the original latent there.  mask [B|1, 1, h, w]
    in [0, 1], 1 = repaint.  Keeps ``with_uncond`` (CFG++) when ``inner`` has it."""

    def blend(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = append_dims(sigma, x.ndim).to(x.dtype)
        return x * mask + (latent + noise * s) * (1 - mask)

    def keep(x0: torch.Tensor) -> torch.Tensor:
        return x0 * mask + latent * (1 - mask)

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return keep(inner(blend(x, sigma), sigma))

    with_uncond = getattr(inner, "with_uncond", None)
    if with_uncond is None:
        return denoise

    def pair(x: torch.Tensor, sigma: torch.Tensor):
        guided, u = with_uncond(blend(x, sigma), sigma)
        return keep(guided), keep(u)

    return GuidedDenoiser(denoise, pair)


def run_sampler(
    run: Run,
    denoiser: BoundDenoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    sampler: str,
    *,
    start_step: int = 0,
    stage: str = "sample",
    eta: float | None = None,
    options: dict | None = None,
) -> torch.Tensor:
    """Sample from ``sigmas[start_step]`` to the end, reporting a :class:`ProgressEvent` after
    each step and raising :class:`Interrupted` as soon as the cancel token is set.
    ``options`` go to the sampler as keywords (e.g. ``s_noise``, ``order``), ``eta`` too."""
    total = len(sigmas) - 1 - start_step
    run.check_cancel(0, total, stage)

    def on_step(step: Step) -> None:
        if run.callback is not None:
            run.callback(ProgressEvent(stage, step.i + 1, step.total, step.sigma,
                                       step.sigma_next, step.x, step.x0))
        run.check_cancel(step.i + 1, step.total, stage)

    options = {**(options or {}), **({} if eta is None else {"eta": eta})}
    sigmas = sigmas.to(x.device)
    noise = noise_source(run.generators, x, sampler, sigmas[start_step:])
    return sample(sampler, denoiser, x, sigmas, start_step=start_step, callback=on_step,
                  noise=noise, **options)


@torch.no_grad()
def encode_images(bundle: ModelBundle, images: torch.Tensor, device) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> diffusion latents [B, C, H/8, W/8] (posterior mode,
    as ComfyUI's VAEEncode: no randomness, so it does not depend on the seed)."""
    vae = bundle.vae
    dtype = next(vae.parameters()).dtype
    z = vae.encode(images.to(device=device, dtype=dtype)).mode().float()
    return bundle.family.latent.process_in(z)


@torch.no_grad()
def decode_latents(bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
    """Diffusion latents -> images [B, 3, H, W] float32 in [-1, 1] (clamped)."""
    vae = bundle.vae
    dtype = next(vae.parameters()).dtype
    z = bundle.family.latent.process_out(latents).to(dtype)
    return vae.decode(z).float().clamp(-1, 1)


def downsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Pixel mask [B, 1, H, W] -> latent mask [B, 1, H/f, W/f] by area averaging."""
    return F.avg_pool2d(mask, factor)
