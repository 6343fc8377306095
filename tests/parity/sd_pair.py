"""One tiny random SD 1.x model twice: as diffusers/transformers modules and as a noisecraft
model registered on an :class:`~noisecraft.engine.Engine`, for the pipeline parity tests.

The weights are created on the diffusers side (UNet2DConditionModel, AutoencoderKL, transformers
CLIPTextModel), randomised everywhere (no zero-initialised layers), and reach noisecraft through
the key-mapping tables.  diffusers gets the prompt as ``prompt_embeds`` computed by its own
CLIPTextModel on the CLIP token ids (the same ids its tokenizer would give; the tokenizer has its
own tests), so no tokenizer files are needed.  ``inpaint=True`` builds the 9-channel U-Net of an
inpainting model (``tiny_sd15_inpaint``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
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
from tests.pipelines.tiny import TINY_VAE8, randomize

SD_BETAS = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                num_train_timesteps=1000)
PROMPT, NEGATIVE = "a red circle on a blue square", "blurry"
SIZE = 64


@dataclass
class SDPair:
    """The same weights on both sides.  ``engine`` has them registered as ``name``;
    ``embeds`` [2, 77, width] are (prompt, negative) from the transformers text encoder."""

    engine: Engine
    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text: torch.nn.Module
    embeds: torch.Tensor

    def pipeline(self, cls_name: str, scheduler):
        """A diffusers pipeline (``StableDiffusionPipeline``, ``...Img2ImgPipeline``,
        ``...InpaintPipeline``) on these modules, without tokenizer or safety checker.

        ``scheduler`` is attached after construction: the pipelines' constructors rewrite a
        scheduler's config in place (``steps_offset`` forced to 1, ``clip_sample`` to False,
        with a deprecation warning), which would silently change the configuration tested."""
        import diffusers

        pipe = getattr(diffusers, cls_name)(
            vae=self.vae, text_encoder=self.text, tokenizer=None, unet=self.unet,
            scheduler=diffusers.DDIMScheduler(**SD_BETAS, steps_offset=1, clip_sample=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
        pipe.scheduler = scheduler
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def prompts(self) -> dict[str, torch.Tensor]:
        return {"prompt_embeds": self.embeds[:1], "negative_prompt_embeds": self.embeds[1:]}

    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """diffusers' decode of its latents, as ``output_type="np"`` does: [H, W, 3] in [0, 1]."""
        with torch.no_grad():
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return (decoded / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).numpy()


def sd_pair(*, inpaint: bool = False, name: str = "tiny") -> SDPair:
    import diffusers
    import transformers

    text_cfg = tiny(CLIP_L)
    preset = "tiny_sd15_inpaint" if inpaint else "tiny_sd15"
    unet_cfg = replace(UNET_PRESETS[preset], context_dim=text_cfg.width)
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
                         name=f"{name}-parity")
    assert bundle.inpaint == inpaint
    engine = Engine(device="cpu")
    engine.register(name, bundle)

    tok = text.tokenizer
    ids = torch.tensor([tok(PROMPT), tok(NEGATIVE)])
    with torch.no_grad():
        embeds = ref_text(input_ids=ids)[0]
    return SDPair(engine, name, ref_unet, ref_vae, ref_text, embeds)


def start_scale(scheduler, steps: int, timestep_index: int = 0) -> float:
    """``sigma / sqrt(1 + sigma^2)`` at the run's ``timestep_index``-th timestep: the factor
    that turns noisecraft's start ``randn * sigma`` into the ``latents`` a diffusers pipeline
    must be given when it multiplies them by an ``init_noise_sigma`` of ``sqrt(1 + sigma^2)``
    (Euler with ``leading`` spacing) or keeps its sample in the variance-preserving scale
    (``init_noise_sigma = 1``: DDIM, DPM-Solver)."""
    scheduler.set_timesteps(steps)
    t = int(scheduler.timesteps[timestep_index])
    ac = scheduler.alphas_cumprod.double()[t]
    sigma = float(((1 - ac) / ac).sqrt())
    return sigma / (1 + sigma**2) ** 0.5
