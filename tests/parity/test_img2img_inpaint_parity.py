"""noisecraft's img2img and inpainting against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (9-channel inpainting U-Net): same tiny random SD1 weights
(``sd_pair.py``), same seed, same scheduler configuration -> the same latents and image.

What is compared like for like, and the one swap made on the diffusers side:

* **Start step** (the same on both sides): with N steps and strength s, ``int(N * s)`` steps
  run, from index ``N - int(N * s)`` of the full N-step schedule, and the image latent is noised
  to that step's sigma (diffusers' ``get_timesteps``; noisecraft's ``strength_start``).
* **VAE encode** (different; swapped here): noisecraft encodes with the posterior mode (as
  ComfyUI's VAEEncode), so the result does not depend on the seed through the encoder.
  diffusers' pipelines draw a posterior sample from the pipeline's generator
  (``retrieve_latents(..., sample_mode="sample")``) before they draw the noise, so their noise
  is the generator's second draw where noisecraft's is the first.  The tests replace diffusers'
  ``retrieve_latents`` by itself with ``sample_mode="argmax"`` (the posterior mode, no draw);
  everything else (image and mask preprocessing, the masked image, the mask's resize, the noise,
  the scheduler) is diffusers' own code.
* **Inpainting at strength 1** (different; documented): diffusers' inpaint pipeline then starts
  from pure noise, ``randn * init_noise_sigma``, dropping the image; noisecraft starts from
  ``image latent + sigma0 * randn`` as at every strength (as diffusers' own img2img pipeline
  does at strength 1, and ComfyUI).  That case hands diffusers noisecraft's start as
  ``latents`` and also checks that diffusers' own start differs.
* **Paste-back** (noisecraft only): outside the mask noisecraft's image is the input's pixels
  (AUTOMATIC1111's overlay); diffusers decodes the latent everywhere (it pastes only with
  ``padding_mask_crop``).  Compared: latents, the decoded images, noisecraft's output pixels
  where the mask is 1, and exact input pixels where it is 0.  ``mask_blur=0`` (diffusers
  neither blurs nor grows masks).

Tolerances: latents within 1e-5 of their largest magnitude (measured <= 1e-5: float32 in
different summation orders); decoded float32 images within 1e-3 in [0, 1]; 8-bit images within
1 level.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from noisecraft.pipelines.common import decode_latents
from noisecraft.request import GenerationRequest
from tests.parity.sd_pair import NEGATIVE, PROMPT, SD_BETAS, SIZE, sd_pair

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

SEED, STEPS, CFG = 1234, 6, 5.0
LATENT_TOL, FLOAT_TOL = 3e-5, 1e-3
DDIM = {"set_alpha_to_one": True, "clip_sample": False}
# noisecraft (sampler, scheduler) -> diffusers scheduler class and configuration (the pairs of
# the txt2img parity test; ``leading`` with noisecraft's default offset is SD 1.5's).
SCHEDULERS = {
    ("euler", "linspace"): ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}),
    ("euler", "leading"): (
        "EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}),
    ("euler_ancestral", "trailing"): (
        "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}),
    ("dpmpp_2m", "trailing"): (
        "DPMSolverMultistepScheduler",
        {"timestep_spacing": "trailing", "algorithm_type": "dpmsolver++", "solver_order": 2,
         "final_sigmas_type": "zero"}),
    ("ddim", "leading"): (
        "DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1, **DDIM}),
}


def _scheduler(sampler, spacing):
    cls_name, config = SCHEDULERS[(sampler, spacing)]
    return getattr(diffusers, cls_name)(**SD_BETAS, **config)


@pytest.fixture
def posterior_mode(monkeypatch):
    """diffusers' pipelines encode with the posterior mode (noisecraft's convention)."""
    from diffusers.pipelines.stable_diffusion import (
        pipeline_stable_diffusion_img2img,
        pipeline_stable_diffusion_inpaint,
    )

    original = pipeline_stable_diffusion_img2img.retrieve_latents

    def mode(encoder_output, generator=None, sample_mode="sample"):
        return original(encoder_output, generator, sample_mode="argmax")

    for module in (pipeline_stable_diffusion_img2img, pipeline_stable_diffusion_inpaint):
        monkeypatch.setattr(module, "retrieve_latents", mode)


def _init_image() -> Image.Image:
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    rgb = np.stack([x * 4, y * 4, (x + y) * 2], axis=-1).astype(np.uint8)
    rgb[20:40, 10:30] = (200, 30, 30)
    return Image.fromarray(rgb, "RGB")


def _mask() -> np.ndarray:
    """255 = repaint: a block off the 8-pixel latent grid, plus a strip of 127 (just below the
    0.5 threshold: kept) and one of 128 (just above: repainted)."""
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[13:45, 21:51] = 255
    m[0:8, 0:16], m[0:8, 16:32] = 127, 128
    return m


def _request(pair, sampler, spacing, strength, seed=SEED, **extra):
    return GenerationRequest(PROMPT, negative_prompt=NEGATIVE, model=pair.name, steps=STEPS,
                             cfg_scale=CFG, seed=seed, sampler=sampler, scheduler=spacing,
                             init_image=_init_image(), strength=strength, **extra)


def _compare(pair, result, ref_latents, region: np.ndarray | None = None) -> None:
    """Latents, float decodes, and 8-bit outputs (inside ``region`` [H, W] bool if given)."""
    scale = ref_latents.abs().max()
    err = (result.latents - ref_latents).abs().max() / scale
    print(f"latent error {err:.2e} of scale {scale:.3g}")
    assert err < LATENT_TOL, f"latents differ by {err:.2e} of their scale"
    ref = pair.decode(ref_latents)
    ours = decode_latents(pair.engine.model(pair.name), result.latents)
    ours = (ours / 2 + 0.5)[0].permute(1, 2, 0).numpy()
    assert np.abs(ours - ref).max() < FLOAT_TOL
    out = np.asarray(result.pil_images[0]).astype(np.int16)
    diff = np.abs(out - (ref * 255).round().astype(np.int16))
    assert (diff if region is None else diff[region]).max() <= 1
    assert 10 < ref.std() * 255


def _differs_with_another_seed(pair, request, ref_latents) -> None:
    other = pair.engine.generate(request.with_seed(SEED + 1))
    assert (other.latents - ref_latents).abs().max() / ref_latents.abs().max() > 0.05


IMG2IMG_CASES = [
    ("euler", "linspace", 0.6), ("euler", "linspace", 1.0), ("euler", "leading", 0.6),
    ("euler_ancestral", "trailing", 0.6), ("dpmpp_2m", "trailing", 0.6),
    ("ddim", "leading", 0.6), ("ddim", "leading", 1.0),
]


@pytest.fixture(scope="module")
def pair():
    return sd_pair()


@pytest.fixture(scope="module")
def inpaint_pair():
    return sd_pair(inpaint=True, name="tiny-inpaint")


@pytest.mark.parametrize("sampler,spacing,strength", IMG2IMG_CASES)
def test_img2img_matches_diffusers(pair, posterior_mode, sampler, spacing, strength):
    pipe = pair.pipeline("StableDiffusionImg2ImgPipeline", _scheduler(sampler, spacing))
    generator = torch.Generator("cpu").manual_seed(SEED)
    ref = pipe(**pair.prompts(), image=_init_image(), strength=strength,
               num_inference_steps=STEPS, guidance_scale=CFG, generator=generator,
               output_type="latent").images
    request = _request(pair, sampler, spacing, strength)
    _compare(pair, pair.engine.generate(request), ref)
    _differs_with_another_seed(pair, request, ref)


INPAINT_CASES = [("euler", "linspace", 0.6), ("ddim", "leading", 0.6),
                 ("dpmpp_2m", "trailing", 0.75)]


def _inpaint_reference(pair, sampler, spacing, strength, **kwargs):
    pipe = pair.pipeline("StableDiffusionInpaintPipeline", _scheduler(sampler, spacing))
    generator = torch.Generator("cpu").manual_seed(SEED)
    return pipe(**pair.prompts(), image=_init_image(), mask_image=Image.fromarray(_mask(), "L"),
                strength=strength, num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE,
                width=SIZE, generator=generator, output_type="latent", **kwargs).images


def _check_inpaint(pair, result, ref_latents) -> None:
    mask = _mask()
    _compare(pair, result, ref_latents, region=mask == 255)
    out = np.asarray(result.pil_images[0])
    assert np.array_equal(out[mask == 0], np.asarray(_init_image())[mask == 0])


@pytest.mark.parametrize("sampler,spacing,strength", INPAINT_CASES)
def test_inpaint_matches_diffusers(inpaint_pair, posterior_mode, sampler, spacing, strength):
    pair = inpaint_pair
    ref = _inpaint_reference(pair, sampler, spacing, strength)
    request = _request(pair, sampler, spacing, strength, mask=Image.fromarray(_mask(), "L"),
                       mask_blur=0)
    _check_inpaint(pair, pair.engine.generate(request), ref)
    _differs_with_another_seed(pair, request, ref)


def test_inpaint_at_full_strength(inpaint_pair, posterior_mode):
    """Strength 1: the runs agree from noisecraft's start (image latent + sigma0 * randn, passed
    as ``latents``); diffusers' own start (pure noise) is the documented difference."""
    pair = inpaint_pair
    request = _request(pair, "euler", "linspace", 1.0, mask=Image.fromarray(_mask(), "L"),
                       mask_blur=0)
    result = pair.engine.generate(request)

    scheduler = _scheduler("euler", "linspace")
    scheduler.set_timesteps(STEPS)
    pipe = pair.pipeline("StableDiffusionInpaintPipeline", scheduler)
    with torch.no_grad():
        pixels = pipe.image_processor.preprocess(_init_image())
        latent = pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor
    noise = torch.randn(latent.shape, generator=torch.Generator("cpu").manual_seed(SEED))
    start = latent + float(scheduler.sigmas[0]) * noise
    ref = _inpaint_reference(pair, "euler", "linspace", 1.0,
                             latents=start / scheduler.init_noise_sigma)
    _check_inpaint(pair, result, ref)

    own = _inpaint_reference(pair, "euler", "linspace", 1.0)
    assert (own - result.latents).abs().max() / own.abs().max() > 100 * LATENT_TOL
