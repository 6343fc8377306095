"""The engine: the one object that owns what is expensive, behind every front door.

``Engine`` holds the loaded models, the device and the dtype (its base class
:class:`~noisecraft.model_cache.ModelCache`: a cache keyed by file and hash, bounded by memory,
LoRA'd copies made copy-on-write).  ``Engine.generate(request, callback=, cancel=)`` takes a
frozen :class:`~noisecraft.request.GenerationRequest` and returns a
:class:`~noisecraft.request.GenerationResult`; ``generate_image()``, the CLI, graph nodes and
server workers all call it.  LoRAs come from the request's ``loras`` and the ``<lora:NAME:W>``
tags of its prompts (resolved by :func:`noisecraft.loras.resolve_loras`).

Compute backend (``Engine(backend=...)``, :mod:`noisecraft.backends`): requests run the U-Net,
the VAE, the ControlNets and the TAESD preview decoder wrapped by the backend, each wrapped
once per loaded model (:mod:`noisecraft.backends.wrapped`; a LoRA'd copy is wrapped on its own,
after the merge); samplers, guidance, callbacks and cancellation never know.  ControlNets: a
:class:`~noisecraft.models.controlnet.ControlledModel` runs the wrapped ControlNets and calls
the wrapped U-Net with their residuals as keyword arguments.  The text encoder runs as it is
(called once per prompt through ``encode_prompts``, not a ``forward`` a backend could take).
Default: ``"onednn"`` on a CPU with float32 weights, else ``"eager"``.  It is float32-exact
(tests/test_engine_backend.py: generations within relative L2 1e-4 of eager, 1/255 in pixels)
and costs a packed copy of the Linear/Conv2d weights, counted against ``max_cache_bytes``;
``backend="eager"`` runs the modules as they are.

Interruption: cancelling the :class:`~noisecraft.request.CancelToken` makes ``generate`` raise
:class:`~noisecraft.request.Interrupted` before the next step starts (it is checked before
sampling and after every sampler step); no partial images are returned, and the engine and its
cache stay usable.
"""

from __future__ import annotations

import secrets

import numpy as np
import torch
from PIL import Image

from noisecraft.images import tensor_to_images
from noisecraft.loras import hash_label, resolve_loras
from noisecraft.model_cache import (  # noqa: F401 (re-exported: the engine's public names)
    DEFAULT_MODEL_PATH,
    DefaultModelMissing,
    ModelCache,
    ModelNotFound,
)
from noisecraft.models.family import ModelBundle
from noisecraft.models.latent_formats import latent_to_preview_image
from noisecraft.pipelines.common import (
    ProgressCallback,
    Run,
    check_sampler,
    generators_for,
    vae_factor,
    with_family_defaults,
)
from noisecraft.pipelines.control import control_specs, with_controls
from noisecraft.pipelines.generate import run_request
from noisecraft.request import (
    CancelToken,
    GeneratedImage,
    GenerationRequest,
    GenerationResult,
    InputError,
    image_settings,
)
from noisecraft.samplers.cfg_pp import needs_uncond
from noisecraft.schedules import SPACINGS

SEED_RANGE = 2**32


class Engine(ModelCache):
    """Runs generation requests on the models it holds.

    A :class:`~noisecraft.model_cache.ModelCache` (its constructor's arguments: device, dtype,
    memory bound, loader, default model, compute backend) plus :meth:`generate` and
    :meth:`preview`: the engine *is* the model cache every front door shares, so callers ask
    it for models (``engine.model(ref)``) and for images alike.
    """

    # ---- generation ---------------------------------------------------------------------

    def generate(
        self,
        request: GenerationRequest,
        *,
        callback: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> GenerationResult:
        """Run ``request``; image i uses seed ``seed + i`` (a random seed when None).

        Raises :class:`~noisecraft.request.Interrupted` when ``cancel`` is cancelled and
        :class:`~noisecraft.request.InputError` on bad input.
        """
        check_sampler(request.sampler)
        if request.scheduler not in SPACINGS:
            raise InputError(f"unknown scheduler (spacing) {request.scheduler!r}; choose one "
                             f"of: {', '.join(SPACINGS)}")
        if needs_uncond(request.sampler) and request.guidance_rescale > 0:
            raise InputError(f"guidance_rescale does not apply to the CFG++ sampler "
                             f"{request.sampler!r}; set it to 0 or pick another sampler")
        if needs_uncond(request.sampler) and request.uncond_min_sigma > 0:
            raise InputError(f"uncond_min_sigma (NGMS) does not apply to the CFG++ sampler "
                             f"{request.sampler!r}, which needs the unconditional pass at every "
                             f"step; set it to 0 or pick another sampler")
        plan = resolve_loras(request)
        seed = request.seed if request.seed is not None else secrets.randbelow(SEED_RANGE)
        request = request.with_seed(int(seed))
        bundle = self.model_with_loras(request.model, plan.active)
        request = with_family_defaults(request, bundle.family)
        runnable = with_controls(self.runnable(bundle), control_specs(
            request.controlnets, lambda ref: self.runnable_module(self.controlnet(ref))))
        seeds = [request.seed + i for i in range(request.batch_size)]
        run = Run(runnable, self.device, generators_for(seeds), callback, cancel)
        with torch.inference_mode():
            out = run_request(run, plan.applied_to(request))
        hashes = {hash_label(lo.name): self.lora_hash(lo.path) for lo in plan.loras}
        images = tuple(
            GeneratedImage(im, s, image_settings(request, s, out.width, out.height, bundle.name,
                                                 bundle.short_hash, hashes))
            for im, s in zip(tensor_to_images(out.images), seeds, strict=True)
        )
        return GenerationResult(images, out.latents.detach().cpu(), request)

    # ---- previews -----------------------------------------------------------------------

    @torch.inference_mode()
    def preview(
        self, bundle: ModelBundle, latents: torch.Tensor, decoder: torch.nn.Module | None = None
    ) -> list[Image.Image]:
        """Cheap RGB previews of diffusion latents [B, C, h, w] at image size: through a TAESD
        ``decoder`` if given, else the family's linear latent->RGB approximation (enlarged)."""
        if decoder is not None:
            rgb = decoder.preview(latents.to(self.device, torch.float32))
            return [Image.fromarray(np.ascontiguousarray(a.numpy()), "RGB") for a in rgb]
        scale = vae_factor(bundle)
        return [latent_to_preview_image(x, bundle.family.latent, scale=scale) for x in latents]
