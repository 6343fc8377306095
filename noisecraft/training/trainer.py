"""Training a text-to-image diffusion model: U-Net + CLIP-architecture text encoder, in pixel
space or in the latent space of a frozen VAE.

The optimiser step, the loss and the loop are shared with the LoRA trainer and documented in
``loop.py``: eps or v target, optional min-SNR-gamma weighting, caption dropout, AdamW with
warm-up, gradient accumulation, clipping and an EMA of the weights; the EMA weights are what
samples and the saved model use.  Checkpoints and exact resume: ``state.py``.  Data-parallel:
run the same ``train()`` under ``torchrun --nproc_per_node N`` (DDP, gloo on CPU).

Outputs in ``run.out_dir``: ``config.json``, ``metrics.csv``, ``samples/step_N.png`` (a grid of
the fixed sample prompts, fixed seed, through the real sampler with CFG), ``checkpoints/`` and,
when the run has finished, ``model.safetensors`` (see ``state.py`` for its layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from noisecraft.models.family import Family
from noisecraft.models.latent_formats import LatentFormat
from noisecraft.models.text import CLIPTextEncoder
from noisecraft.models.text_config import TextEncoderConfig
from noisecraft.models.unet import UNetModel
from noisecraft.models.unet_configs import UNetConfig
from noisecraft.models.vae import AutoencoderKL, VAEConfig
from noisecraft.training import state as ckpt
from noisecraft.training.loop import (
    DiffusionRun,
    ObjectiveConfig,
    TextToImage,
    TrainResult,
    diffusion_loss,
    drop_captions,
    to_x0,
    tokenize,
    train_processes,
)
from noisecraft.training.previews import SampleConfig, save_sample_grid
from noisecraft.training.runtime import (
    DataConfig,
    DistEnv,
    OptimConfig,
    ProgressCallback,
    RunConfig,
    barrier,
)

MODEL_FILE = "model.safetensors"
PIXEL_FORMAT = LatentFormat(channels=3, scaling_factor=1.0)
"""The "latent format" of a pixel-space model: the image itself."""

__all__ = ["ModelConfig", "ObjectiveConfig", "SampleConfig", "TrainConfig", "TrainResult",
           "DataConfig", "OptimConfig", "RunConfig", "train", "diffusion_loss", "drop_captions",
           "TextToImage", "to_x0", "tokenize"]


@dataclass(frozen=True)
class ModelConfig:
    """What is trained.  Latent space when ``vae`` or ``vae_file`` is given, else pixels.

    ``vae_file``: a frozen VAE written by ``vae_trainer`` (its measured scaling factor is used
    unless ``latent_scaling`` is set); ``vae``: a freshly initialised frozen VAE (tests).
    ``train_text_encoder=False`` freezes the (randomly initialised) text encoder.
    ``init_weights``: a model file written by this trainer whose U-Net and text encoder (same
    configs) start a fresh run instead of random weights (ignored when a run resumes: its
    checkpoint holds the weights).
    """

    unet: UNetConfig
    text: TextEncoderConfig
    vae: VAEConfig | None = None
    vae_file: Path | None = None
    latent_scaling: float | None = None
    train_text_encoder: bool = True
    family_name: str = "noisecraft"
    init_weights: Path | None = None

    def __post_init__(self) -> None:
        if self.unet.context_dim != self.text.width:
            raise ValueError(
                f"ModelConfig: the U-Net's context_dim {self.unet.context_dim} must equal the "
                f"text encoder's width {self.text.width} (it cross-attends to its states)"
            )
        if self.vae is not None and self.vae_file is not None:
            raise ValueError("ModelConfig: give vae (fresh) or vae_file (trained), not both")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig
    data: DataConfig = DataConfig()
    objective: ObjectiveConfig = ObjectiveConfig()
    optim: OptimConfig = OptimConfig()
    run: RunConfig = RunConfig()
    samples: SampleConfig = SampleConfig()


# ----------------------------------------------------------------------------- building


def family_for(config: TrainConfig, latent: LatentFormat) -> Family:
    o = config.objective
    return Family(config.model.family_name, prediction=o.prediction, text="clip", latent=latent,
                  native_size=config.data.resolution, beta_schedule=o.beta_schedule,
                  beta_start=o.beta_start, beta_end=o.beta_end,
                  num_train_timesteps=o.num_train_timesteps,
                  zero_terminal_snr=o.zero_terminal_snr)


def build_vae(m: ModelConfig) -> tuple[AutoencoderKL | None, LatentFormat]:
    """The frozen VAE and the latent format (scaling factor) it implies."""
    if m.vae_file is not None:
        from noisecraft.training.vae_trainer import load_vae_file

        vae, measured = load_vae_file(Path(m.vae_file))
        scale = m.latent_scaling or measured
        if scale is None:
            raise ValueError(f"{m.vae_file} records no scaling factor; set latent_scaling")
    elif m.vae is not None:
        vae, scale = AutoencoderKL(m.vae).eval(), m.latent_scaling or 1.0
    else:
        return None, PIXEL_FORMAT
    vae.requires_grad_(False)
    return vae, LatentFormat(channels=vae.config.embed_dim, scaling_factor=float(scale))


def _check_channels(m: ModelConfig, latent: LatentFormat) -> None:
    if m.unet.in_channels != latent.channels or m.unet.out_channels != latent.channels:
        space = "pixel" if latent is PIXEL_FORMAT else "latent"
        raise ValueError(
            f"the U-Net has in/out channels {m.unet.in_channels}/{m.unet.out_channels}, but the "
            f"{space} space has {latent.channels}; set UNetConfig in_channels = out_channels = "
            f"{latent.channels}"
        )


def _load_init_weights(model: TextToImage, m: ModelConfig) -> None:
    path = Path(m.init_weights)
    if not path.is_file():
        raise FileNotFoundError(f"ModelConfig.init_weights={path} does not exist")
    loaded = ckpt.load_trained_model(path)
    for part, have, want in (("unet", loaded.unet.config, m.unet),
                             ("text encoder", loaded.text_encoder.config, m.text)):
        if have != want:
            raise ValueError(f"init_weights {path} holds a {part} with config {have}, but this "
                             f"run trains {want}; they must match")
    model.unet.load_state_dict(loaded.unet.state_dict())
    model.text.load_state_dict(loaded.text_encoder.state_dict())


# ----------------------------------------------------------------------------- the loop


class _Run(DiffusionRun):
    """The state of one invocation of :func:`train`: the whole model is trained and saved."""

    def __init__(self, config: TrainConfig, env: DistEnv):
        m = config.model
        torch.manual_seed(config.run.seed)
        vae, latent = build_vae(m)
        _check_channels(m, latent)
        self.family = family_for(config, latent)
        model = TextToImage(UNetModel(m.unet), CLIPTextEncoder(m.text))
        if m.init_weights is not None:  # before the EMA copies the weights (super().__init__)
            _load_init_weights(model, m)
        model.text.requires_grad_(m.train_text_encoder)
        super().__init__(config, env, model, model, vae=vae, latent=latent,
                         schedule=self.family.schedule(), objective=config.objective)
        self.model.train()

    def sampling_weights(self) -> dict[str, torch.Tensor]:
        if self.ema is not None:
            return self.ema.averaged_state_dict(self.model)
        return {k: v.detach() for k, v in self.model.state_dict().items()}

    def model_parts(self, weights: dict[str, torch.Tensor]) -> dict[str, dict]:
        parts = {ckpt.UNET_PREFIX: ckpt.split_prefix(weights, "unet."),
                 ckpt.TEXT_PREFIX: ckpt.split_prefix(weights, "text.")}
        if self.vae is not None:
            parts[ckpt.VAE_PREFIX] = self.vae.state_dict()
        return parts

    def metadata(self) -> dict:
        m = self.config.model
        meta = {"noisecraft.family": self.family, "noisecraft.unet_config": m.unet,
                "noisecraft.text_config": m.text,
                "noisecraft.training": {"step": self.step, "samples": self.seen}}
        if self.vae is not None:
            meta["noisecraft.vae_config"] = self.vae.config
        return meta

    def write_model_file(self, directory: Path) -> None:
        ckpt.save_model_file(directory / MODEL_FILE, self.model_parts(self.sampling_weights()),
                             self.metadata())

    def save_samples(self) -> Path | None:
        if not self.env.is_main or not self.config.samples.prompts:
            return None
        weights = self.sampling_weights()
        unet = UNetModel(self.config.model.unet)
        unet.load_state_dict(ckpt.split_prefix(weights, "unet."))
        text = CLIPTextEncoder(self.config.model.text, tokenizer=self.model.text.tokenizer)
        text.load_state_dict(ckpt.split_prefix(weights, "text."))
        out = self.config.run.out_dir / "samples" / f"step_{self.step:08d}.png"
        return save_sample_grid(out, self.config.samples, unet.eval(), text.eval(), self.vae,
                                self.family, self.config.data.resolution)

    def export(self) -> Path:
        path = self.config.run.out_dir / MODEL_FILE
        if self.env.is_main:
            self.write_model_file(self.config.run.out_dir)
        barrier(self.env)
        return path


def train(config: TrainConfig, *, progress: ProgressCallback | None = None) -> TrainResult:
    """Train (or resume, see ``RunConfig.resume``) a text-to-image model; see the module doc.

    Under torchrun the process group is joined here (and left at the end if joined here).
    """
    return train_processes(config, _Run, progress, "train")
