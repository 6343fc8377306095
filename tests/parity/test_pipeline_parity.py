"""noisecraft's txt2img against diffusers' StableDiffusionPipeline: same tiny random SD1 model,
same seed, same scheduler configuration -> the same image.

The weights are created on the diffusers side (UNet2DConditionModel, AutoencoderKL, transformers
CLIPTextModel), randomised everywhere (no zero-initialised layers), and reach noisecraft through
the key-mapping tables.  diffusers gets the prompt as ``prompt_embeds`` computed by its own
CLIPTextModel on the CLIP token ids (the same ids its tokenizer would give; the tokenizer has its
own tests), so no tokenizer files are needed.

Seeds: noisecraft's start is ``randn(seed) * sigmas[0]``; diffusers' is ``randn(seed) *
init_noise_sigma`` in its own convention.  For Euler-type schedulers with ``linspace`` or
``trailing`` spacing ``init_noise_sigma == sigmas[0]``, so the bare generator reproduces the image
(and ancestral noise continues from that generator on both sides).  For VP schedulers (DDIM,
DPM-Solver) diffusers starts at ``latents`` in the variance-preserving scale; the test passes the
same ``randn(seed)`` tensor rescaled by ``sigma0 / sqrt(1 + sigma0^2)``, which is exactly
noisecraft's start.  Tolerances: latents within 1e-5 of their largest magnitude (measured
~1e-6: float32 with different summation orders), 8-bit images within 1 level (rounding).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from noisecraft.checkpoints.text_keys import diffusers_to_original
from noisecraft.checkpoints.unet_keys import (
    unet_config_to_diffusers,
    unet_state_dict_from_diffusers,
)
from noisecraft.checkpoints.vae_keys import vae_config_to_diffusers, vae_state_dict_from_diffusers
from noisecraft.engine import Engine
from noisecraft.models.family import FAMILIES, ModelBundle
from noisecraft.models.text import build_text_encoder
from noisecraft.models.text_config import CLIP_L, tiny
from noisecraft.models.unet import UNetModel
from noisecraft.models.unet_configs import UNET_PRESETS
from noisecraft.models.vae import AutoencoderKL
from noisecraft.request import GenerationRequest
from tests.pipelines.tiny import TINY_VAE8, randomize

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                num_train_timesteps=1000)
PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"
SEED, STEPS, SIZE, CFG = 1234, 6, 64, 5.0

# noisecraft (sampler, spacing) -> diffusers scheduler class and configuration; "vp" marks
# schedulers whose sample lives in the variance-preserving scale (latents rescaled, see above).
CASES = {
    ("euler", "linspace"): ("EulerDiscreteScheduler", {"timestep_spacing": "linspace"}, False),
    ("euler", "trailing"): ("EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, False),
    ("euler_ancestral", "trailing"): (
        "EulerAncestralDiscreteScheduler", {"timestep_spacing": "trailing"}, False),
    ("dpmpp_2m", "trailing"): (
        "DPMSolverMultistepScheduler",
        {"timestep_spacing": "trailing", "algorithm_type": "dpmsolver++", "solver_order": 2,
         "final_sigmas_type": "zero"}, True),
    ("ddim", "leading"): (
        "DDIMScheduler",
        {"timestep_spacing": "leading", "steps_offset": 0, "set_alpha_to_one": True,
         "clip_sample": False}, True),
}


@pytest.fixture(scope="module")
def models():
    text_cfg = tiny(CLIP_L)
    unet_cfg = replace(UNET_PRESETS["tiny_sd15"], context_dim=text_cfg.width)
    ref_unet = randomize(diffusers.UNet2DConditionModel(**unet_config_to_diffusers(unet_cfg)), 1)
    ref_vae = randomize(diffusers.AutoencoderKL(**vae_config_to_diffusers(
        TINY_VAE8, scaling_factor=0.18215)), 2, gain=1.0)
    ref_text = randomize(transformers.CLIPTextModel(text_cfg.hf_config()), 3)
    for m in (ref_unet, ref_vae, ref_text):
        m.eval().requires_grad_(False)

    unet = UNetModel(unet_cfg, device="meta")
    unet.load_state_dict(unet_state_dict_from_diffusers(ref_unet.state_dict(), unet_cfg),
                         assign=True)
    vae = AutoencoderKL(TINY_VAE8, device="meta")
    vae.load_state_dict(vae_state_dict_from_diffusers(ref_vae.state_dict()), assign=True)
    text = build_text_encoder("sd1", configs=[text_cfg])
    # transformers 5 dropped the "text_model." level that files (and transformers 4) have.
    ref_sd = {k if k.startswith("text_model.") else f"text_model.{k}": v
              for k, v in ref_text.state_dict().items()}
    text.load_state_dict(diffusers_to_original(ref_sd, "hf"))
    bundle = ModelBundle(replace(FAMILIES["sd1"], native_size=SIZE), unet, vae, text,
                         name="tiny-parity")
    engine = Engine(device="cpu")
    engine.register("tiny", bundle)

    tok = text.tokenizer
    ids = torch.tensor([tok(PROMPT), tok(NEGATIVE)])
    with torch.no_grad():
        embeds = ref_text(input_ids=ids)[0]
    pipe = diffusers.StableDiffusionPipeline(
        vae=ref_vae, text_encoder=ref_text, tokenizer=None, unet=ref_unet,
        scheduler=diffusers.DDIMScheduler(**SD_BETAS), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return engine, pipe, embeds


def _diffusers_run(pipe, embeds, scheduler, vp: bool):
    pipe.scheduler = scheduler
    generator = torch.Generator("cpu").manual_seed(SEED)
    kwargs = {}
    if vp:
        scheduler.set_timesteps(STEPS)
        t0 = int(scheduler.timesteps[0])
        ac = scheduler.alphas_cumprod.double()[t0]
        sigma0 = float(((1 - ac) / ac).sqrt())
        noise = torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=generator)
        kwargs["latents"] = noise * (sigma0 / (1 + sigma0**2) ** 0.5)
    result = pipe(prompt_embeds=embeds[:1], negative_prompt_embeds=embeds[1:],
                  num_inference_steps=STEPS, guidance_scale=CFG, height=SIZE, width=SIZE,
                  generator=generator, output_type="latent", **kwargs)
    latents = result.images
    with torch.no_grad():  # what the pipeline's output_type="np" does
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor).sample
    image = (decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()
    return latents, (image * 255).round().astype(np.int16)


@pytest.mark.parametrize("sampler,spacing", list(CASES))
def test_txt2img_matches_diffusers(models, sampler, spacing):
    engine, pipe, embeds = models
    cls_name, config, vp = CASES[(sampler, spacing)]
    scheduler = getattr(diffusers, cls_name)(**SD_BETAS, **config)
    ref_latents, ref_image = _diffusers_run(pipe, embeds, scheduler, vp)

    result = engine.generate(GenerationRequest(
        PROMPT, negative_prompt=NEGATIVE, model="tiny", steps=STEPS, cfg_scale=CFG, seed=SEED,
        sampler=sampler, scheduler=spacing,
    ))
    scale = ref_latents.abs().max()
    err = (result.latents - ref_latents).abs().max() / scale
    print(f"{sampler}/{spacing}: latent error {err:.2e} of scale {scale:.3g}")
    assert err < 1e-5, f"latents differ by {err:.2e} of their scale"
    ours = np.asarray(result.pil_images[0]).astype(np.int16)
    assert np.abs(ours - ref_image).max() <= 1
    assert 10 < ref_image.std() and ((ref_image > 0) & (ref_image < 255)).mean() > 0.2
    # Not trivially equal: a different seed gives a clearly different image.
    other = engine.generate(GenerationRequest(
        PROMPT, negative_prompt=NEGATIVE, model="tiny", steps=STEPS, cfg_scale=CFG,
        seed=SEED + 1, sampler=sampler, scheduler=spacing,
    ))
    assert (other.latents - ref_latents).abs().max() / scale > 0.05
