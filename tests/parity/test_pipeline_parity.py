"""noisecraft's txt2img against diffusers' StableDiffusionPipeline: same tiny random SD1 model,
same seed, same scheduler configuration -> the same image.  (img2img and inpainting:
``test_img2img_inpaint_parity.py``; the models: ``sd_pair.py``.)

Seeds: noisecraft's start is ``randn(seed) * sigmas[0]``; diffusers' is ``randn(seed) *
init_noise_sigma`` in its own convention.  For Euler-type schedulers with ``linspace`` or
``trailing`` spacing ``init_noise_sigma == sigmas[0]``, so the bare generator reproduces the image
(and ancestral noise continues from that generator on both sides).  Two cases need the start
passed as ``latents``, the same ``randn(seed)`` tensor rescaled by ``sigma0 / sqrt(1 +
sigma0^2)`` (:func:`~tests.parity.sd_pair.start_scale`), which is exactly noisecraft's start:
VP schedulers (DDIM, DPM-Solver), whose sample lives in the variance-preserving scale, and
Euler with ``leading`` spacing, whose ``init_noise_sigma`` is ``sqrt(1 + sigma0^2)`` rather than
sigma0 (A1111 and noisecraft start at ``sigma0``).  Tolerances: latents within 1e-5 of their
largest magnitude (measured ~1e-6: float32 with different summation orders), 8-bit images within
1 level (rounding).

``leading`` spacing: noisecraft's default ``steps_offset`` is the model family's, 1 for SD (its
diffusers configs); the cases without an explicit offset check that default against diffusers'
``steps_offset=1``.  SD 1.5's own DDIM config also has ``set_alpha_to_one=False``, which ends
the run at alpha_bar[0] (sigma ~0.03) instead of sigma 0; every noisecraft spacing ends at 0, so
the DDIM cases use ``set_alpha_to_one=True``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noisecraft.request import GenerationRequest
from tests.parity.sd_pair import NEGATIVE, PROMPT, SD_BETAS, SIZE, sd_pair, start_scale

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SEED, STEPS, CFG = 1234, 6, 5.0
DDIM = {"set_alpha_to_one": True, "clip_sample": False}

# noisecraft (sampler, spacing, steps_offset or None for the default) -> diffusers scheduler
# class, its configuration, and whether the start must be passed rescaled (see above).
CASES = {
    ("euler", "linspace", None): (
        "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}, False),
    ("euler", "trailing", None): (
        "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, False),
    ("euler", "leading", None): (
        "EulerDiscreteScheduler", {"timestep_spacing": "leading", "steps_offset": 1}, True),
    ("euler_ancestral", "trailing", None): (
        "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, False),
    ("dpmpp_2m", "trailing", None): (
        "DPMSolverMultistepScheduler",
        {"timestep_spacing": "trailing", "algorithm_type": "dpmsolver++", "solver_order": 2,
         "final_sigmas_type": "zero"}, True),
    ("ddim", "leading", 0): (
        "DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 0, **DDIM}, True),
    ("ddim", "leading", None): (
        "DDIMScheduler", {"timestep_spacing": "leading", "steps_offset": 1, **DDIM}, True),
}


@pytest.fixture(scope="module")
def pair():
    return sd_pair()


def _diffusers_run(pair, scheduler, rescale: bool):
    pipe = pair.pipeline("StableDiffusionPipeline", scheduler)
    generator = torch.Generator("cpu").manual_seed(SEED)
    kwargs = {}
    if rescale:
        noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)
        kwargs["latents"] = noise * start_scale(scheduler, STEPS)
    result = pipe(**pair.prompts(), num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE,
                  width=SIZE, generator=generator, output_type="latent", **kwargs)
    latents = result.images
    return latents, (pair.decode(latents) * 255).round().astype(np.int16)


def _request(pair, sampler, spacing, offset, seed=SEED):
    return GenerationRequest(PROMPT, negative_prompt=NEGATIVE, model=pair.name, steps=STEPS,
                             cfg_scale=CFG, seed=seed, sampler=sampler, scheduler=spacing,
                             steps_offset=offset)


@pytest.mark.parametrize("sampler,spacing,offset", list(CASES))
def test_txt2img_matches_diffusers(pair, sampler, spacing, offset):
    cls_name, config, rescale = CASES[(sampler, spacing, offset)]
    scheduler = getattr(diffusers, cls_name)(**SD_BETAS, **config)
    ref_latents, ref_image = _diffusers_run(pair, scheduler, rescale)

    result = pair.engine.generate(_request(pair, sampler, spacing, offset))
    expected_offset = config["steps_offset"] if spacing == "leading" else None
    assert result.request.steps_offset == expected_offset
    scale = ref_latents.abs().max()
    err = (result.latents - ref_latents).abs().max() / scale
    print(f"{sampler}/{spacing}/{offset}: latent error {err:.2e} of scale {scale:.3g}")
    assert err < 1e-5, f"latents differ by {err:.2e} of their scale"
    ours = np.asarray(result.pil_images[0]).astype(np.int16)
    assert np.abs(ours - ref_image).max() <= 1
    assert 10 < ref_image.std() and ((ref_image > 0) & (ref_image < 255)).mean() > 0.2
    # Not trivially equal: a different seed gives a clearly different image.
    other = pair.engine.generate(_request(pair, sampler, spacing, offset, seed=SEED + 1))
    assert (other.latents - ref_latents).abs().max() / scale > 0.05


def test_leading_offset_changes_the_run(pair):
    """The offset is not a no-op: steps_offset 0 and 1 give latents 100x further apart than the
    parity tolerance (each is matched to diffusers above; measured 5e-3 of their scale), and
    the image's settings record the offset used."""
    one = pair.engine.generate(_request(pair, "euler", "leading", None))
    zero = pair.engine.generate(_request(pair, "euler", "leading", 0))
    scale = one.latents.abs().max()
    assert (one.latents - zero.latents).abs().max() / scale > 1e-3
    assert one.images[0].settings["steps_offset"] == 1
    assert zero.images[0].settings["steps_offset"] == 0
