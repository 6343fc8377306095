"""LoRA fine-tuning of a loaded Stable Diffusion checkpoint; the result is a kohya LoRA file.

What kohya's sd-scripts ``train_network.py`` and diffusers' ``train_text_to_image_lora.py`` do,
for SD 1.x, SD 2.x (eps and v) and noisecraft's own CLIP models:

1. the base model (a single-file checkpoint or a diffusers folder) is loaded with the project
   loader; its U-Net, text encoder and VAE are frozen (``requires_grad`` False, eval mode);
2. low-rank adapters (``lora_network.py``) are hooked onto the targeted layers: by default the
   U-Net's attention projections ``to_q``/``to_k``/``to_v``/``to_out.0``; optionally its
   ``proj_in``/``proj_out`` and feed-forward layers and the text encoder's ``q/k/v/out_proj``
   and ``fc1``/``fc2``.  Their up matrices start at zero, so step 0 is the base model;
3. only the adapters train, on the checkpoint's own objective: its family's prediction type
   (eps or v) and noise schedule, in its VAE's latent space (scaled by its latent format), with
   its text encoder (its default clip skip).  The step, loss, optimiser, caption dropout,
   optional min-SNR weighting, EMA and data order are the full trainer's (``loop.py``);
4. checkpoints hold the LoRA weights, the optimiser, the EMA and the RNG states, so a resumed
   run continues bit for bit (the base checkpoint's SHA-256 is recorded and checked);
5. the output is ``<out_dir>/<name>.safetensors`` in kohya's format - ``lora_unet_*`` /
   ``lora_te_*`` keys with ``.lora_down.weight``, ``.lora_up.weight`` and ``.alpha`` - with
   ``ss_*`` metadata (``ss_network_dim``, ``ss_network_alpha``, ``ss_sd_model_name``, ...), which
   ``noisecraft.checkpoints.lora.apply_loras`` (and AUTOMATIC1111 / ComfyUI) apply.  Each
   checkpoint directory holds the LoRA of its step as well.

Not supported, with an error that says so: SDXL (its size/crop conditioning needs each training
image's original size and crop, which the data sets here do not record) and inpainting U-Nets.

Python::

    from noisecraft.training.lora_train import LoRATrainConfig, train_lora
    from noisecraft.training.runtime import DataConfig, RunConfig

    train_lora(LoRATrainConfig(base="v1-5.safetensors",
                               data=DataConfig(source="my_images", resolution=512),
                               run=RunConfig(out_dir="runs/my_lora", steps=1000)))

Command line: ``noisecraft train-lora my_images --base v1-5.safetensors --rank 8 -o runs/my_lora``.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from noisecraft.checkpoints.loader import load_model
from noisecraft.models.family import ModelBundle
from noisecraft.training import state as ckpt
from noisecraft.training.loop import (
    DiffusionRun,
    ObjectiveConfig,
    TextToImage,
    TrainResult,
    train_processes,
)
from noisecraft.training.lora_network import LoRANetwork, LoRANetworkConfig, save_lora_file
from noisecraft.training.previews import SampleConfig, save_sample_grid
from noisecraft.training.runtime import (
    DataConfig,
    DistEnv,
    OptimConfig,
    ProgressCallback,
    RunConfig,
    barrier,
)

TRAINABLE_ARRANGEMENTS = ("sd1", "sd2", "clip")
"""Text arrangements (``Family.text``) whose conditioning is the text encoder's context alone."""
BASE_MODEL_VERSION = {"sd1": "sd_v1", "sd2": "sd_v2", "clip": "noisecraft"}
"""kohya's ``ss_base_model_version`` values (AUTOMATIC1111 reads them to sort LoRAs)."""

__all__ = ["LoRATrainConfig", "LoRANetworkConfig", "DataConfig", "OptimConfig", "RunConfig",
           "SampleConfig", "TrainResult", "train_lora", "load_base"]


@dataclass(frozen=True)
class LoRATrainConfig:
    """A LoRA run: the base checkpoint, the network and the shared data/optimiser/run settings.

    ``family`` overrides the detected model family (e.g. ``"sd2-v"``), as for the loader.
    ``name`` is the output file's stem (``<run.out_dir>/<name>.safetensors``) and its
    ``ss_output_name``.  Sample grids are off unless ``samples.prompts`` are given.
    """

    base: Path
    data: DataConfig
    network: LoRANetworkConfig = LoRANetworkConfig()
    optim: OptimConfig = OptimConfig(lr=1e-4, batch_size=1, ema_decay=None)
    run: RunConfig = RunConfig(out_dir=Path("runs/lora"))
    samples: SampleConfig = SampleConfig(prompts=())
    min_snr_gamma: float | None = None
    family: str | None = None
    name: str = "lora"

    def __post_init__(self) -> None:
        object.__setattr__(self, "base", Path(self.base))
        if self.min_snr_gamma is not None and not self.min_snr_gamma > 0:
            raise ValueError(f"min_snr_gamma={self.min_snr_gamma} must be > 0 (e.g. 5), or None")
        if not self.name or Path(self.name).name != self.name or self.name.startswith("."):
            raise ValueError(f"name={self.name!r} must be a plain file stem (no folders), "
                             "e.g. 'my_style'; the file is <out_dir>/<name>.safetensors")


def load_base(config: LoRATrainConfig) -> ModelBundle:
    """The base model, float32 on the CPU, checked to be one this trainer supports."""
    base = config.base
    if not base.exists():
        raise FileNotFoundError(
            f"base checkpoint {base} does not exist; give the Stable Diffusion model to "
            "fine-tune: a single-file .safetensors/.ckpt or a diffusers folder")
    bundle = load_model(base, family=config.family)
    if bundle.family.text not in TRAINABLE_ARRANGEMENTS:
        raise ValueError(
            f"{base}: a {bundle.family.name} model; LoRA training supports SD 1.x, SD 2.x and "
            f"noisecraft models (text arrangements {', '.join(TRAINABLE_ARRANGEMENTS)}), not "
            f"{bundle.family.text!r}: SDXL's size/crop conditioning needs each image's original "
            "size and crop, which the data sets here do not record")
    if bundle.inpaint:
        raise ValueError(f"{base}: an inpainting model (9-channel U-Net); LoRA training "
                         "needs a plain text-to-image checkpoint")
    return bundle


def objective_for(bundle: ModelBundle, min_snr_gamma: float | None) -> ObjectiveConfig:
    """The checkpoint's own objective: its prediction type and training schedule."""
    f = bundle.family
    return ObjectiveConfig(prediction=f.prediction, min_snr_gamma=min_snr_gamma,
                           beta_schedule=f.beta_schedule, beta_start=f.beta_start,
                           beta_end=f.beta_end, num_train_timesteps=f.num_train_timesteps)


class LoRARun(DiffusionRun):
    """One invocation of :func:`train_lora`: the frozen base bundle, the attached LoRA network
    (``model.lora``, the only trainable parameters) and the shared stepping state."""

    def __init__(self, config: LoRATrainConfig, env: DistEnv):
        bundle = load_base(config)
        for part in (bundle.unet, bundle.text_encoder, bundle.vae):
            part.requires_grad_(False)
            part.eval()
        torch.manual_seed(config.run.seed)
        self.bundle = bundle
        self.network = LoRANetwork.for_bundle(bundle, config.network).attach()
        model = TextToImage(bundle.unet, bundle.text_encoder)
        model.lora = self.network
        fam = bundle.family
        super().__init__(config, env, model, self.network, vae=bundle.vae, latent=fam.latent,
                         schedule=fam.schedule(), objective=objective_for(bundle,
                                                                          config.min_snr_gamma))

    def extra_state(self) -> dict[str, Any]:
        return {**super().extra_state(), "base_sha256": self.bundle.sha256}

    def restore(self, path: Path) -> dict[str, Any]:
        saved = super().restore(path)
        recorded = saved["extra"].get("base_sha256")
        if recorded != self.bundle.sha256:
            raise ValueError(
                f"cannot resume {self.config.run.out_dir}: its checkpoints were trained on a "
                f"base with SHA-256 {recorded}, but {self.config.base} now has "
                f"{self.bundle.sha256}; resume with the same base file or use a new output "
                "directory")
        return saved

    # --------------------------------------------------------------------- outputs

    def lora_weights(self) -> dict[str, torch.Tensor]:
        """The network's state dict (kohya keys); the EMA averages when EMA is on."""
        if self.ema is None:
            return {k: v.detach() for k, v in self.network.state_dict().items()}
        return ckpt.split_prefix(self.ema.averaged_state_dict(self.model), "lora.")

    def metadata(self) -> dict[str, str]:
        c, fam = self.config, self.bundle.family
        net = c.network
        meta = {
            "ss_network_module": "networks.lora",
            "ss_network_dim": str(net.rank),
            "ss_network_alpha": str(net.effective_alpha),
            "ss_network_args": json.dumps({"unet_targets": list(net.unet_targets),
                                           "text_targets": list(net.text_targets)}),
            "ss_sd_model_name": self.bundle.name,
            "ss_base_model_version": BASE_MODEL_VERSION[fam.text],
            "ss_v2": str(fam.text == "sd2"),
            "ss_v_parameterization": str(fam.prediction == "v"),
            "ss_output_name": c.name,
            "ss_resolution": f"({c.data.resolution}, {c.data.resolution})",
            "ss_steps": str(self.step),
            "ss_max_train_steps": str(c.run.steps),
            "ss_learning_rate": str(c.optim.lr),
            "ss_lr_warmup_steps": str(c.optim.warmup_steps),
            "ss_gradient_accumulation_steps": str(c.optim.grad_accum),
            "ss_caption_dropout_rate": str(c.data.caption_dropout),
            "ss_min_snr_gamma": str(c.min_snr_gamma),
            "ss_seed": str(c.run.seed),
            "ss_num_train_images": str(len(self.dataset)),
            "ss_network_train_unet_only": str("text_encoder" not in self.network.parts()),
            "ss_network_train_text_encoder_only": str("unet" not in self.network.parts()),
        }
        if self.bundle.sha256:
            meta["ss_new_sd_model_hash"] = self.bundle.sha256
        return meta

    def write_model_file(self, directory: Path) -> None:
        save_lora_file(Path(directory) / f"{self.config.name}.safetensors", self.lora_weights(),
                       self.metadata())

    def save_samples(self) -> Path | None:
        if not self.env.is_main or not self.config.samples.prompts:
            return None
        out = self.config.run.out_dir / "samples" / f"step_{self.step:08d}.png"
        b = self.bundle
        ema = self.ema.swapped(self.model) if self.ema is not None else contextlib.nullcontext()
        with ema:
            return save_sample_grid(out, self.config.samples, b.unet, b.text_encoder, b.vae,
                                    b.family, self.config.data.resolution)

    def export(self) -> Path:
        if self.env.is_main:
            self.write_model_file(self.config.run.out_dir)
        barrier(self.env)
        return self.config.run.out_dir / f"{self.config.name}.safetensors"


def train_lora(config: LoRATrainConfig, *,
               progress: ProgressCallback | None = None) -> TrainResult:
    """Train (or resume, see ``RunConfig.resume``) a LoRA on ``config.base``; see the module
    doc.  ``TrainResult.model_path`` is the LoRA file once the run has finished."""
    return train_processes(config, LoRARun, progress, "lora")
