"""The built-in default model: a small latent text-to-image model trained on procedural shapes.

It uses the same U-Net, VAE and CLIP text-encoder code as the Stable Diffusion families, at
small widths, and produces 128 x 128 images.  Four stages, each resumable from its last
checkpoint (see ``docs/default_model.md`` for the command, times and results):

1. ``vae`` - an AutoencoderKL with a 4x downscale (128 x 128 x 3 -> 32 x 32 x 4), widths
   32-64, trained with L1 + L2 + a small KL on whole 128 x 128 images (``vae_trainer.py``);
   its latent scaling factor is measured from its latents (1 / std) at the end.
2. ``diffusion`` - a CLIP-architecture text encoder (width 128, 3 layers, CLIP's full 49,408
   token vocabulary) trained jointly with a U-Net (model_channels 64, 3 levels, cross-attention
   at the two lower-resolution levels), eps-prediction on SD's scaled-linear schedule, in the
   latent space of the frozen stage-1 VAE (``trainer.py``).
3. ``vpred_focus`` - stage 2's model fine-tuned to v-prediction on the zero-terminal-SNR
   schedule (so the prompt, not the seed, sets the background), with the error over each
   image's shape weighted 6x (``ObjectiveConfig.foreground_weight``, so the few latent cells
   of the shape count).
4. ``captions`` - stage 3 continued on captions that leave out size, position or background,
   so short prompts ("a red circle") work.

:func:`run_unfinished` runs whichever stage is not finished, continuing from its newest
checkpoint: run it again (``scripts/train_default_model.sh``) after any interruption.
:func:`export_default_model` writes the shipped file (float16, at most 40 MB).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from noisecraft.models.text_config import TextEncoderConfig
from noisecraft.models.unet_configs import UNetConfig
from noisecraft.models.vae import VAEConfig
from noisecraft.training.runtime import DataConfig, OptimConfig, RunConfig
from noisecraft.training.vae_trainer import VAE_FILE, VAELossConfig, VAETrainConfig

DATA_SEED = 0
RESOLUTION = 128
SHAPES_COUNT = 200_000
"""Distinct training images (rendered on the fly); far more than the stages consume, so the
model never sees an image twice."""

VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=RESOLUTION, norm_groups=8)
"""Widths 32, 64, 64; 4x downscale; mid-block attention; 0.95 M parameters.

GroupNorm with 8 groups, not SD's 32: at width 32, 32 groups normalise every channel on its
own, which removes each channel's mean over the image - the flat background colour - at every
norm, and the VAE learnt very slowly (L1 0.50 after 400 steps, 0.055 after 2,000, small shapes
still garbled). With 8 groups: L1 0.09 after 400 steps (session 2, 400-step A/B)."""

TEXT = TextEncoderConfig(width=128, layers=3, heads=2, mlp_width=512, activation="gelu")
"""6.9 M parameters, 6.3 M of them the 49,408 x 128 token embedding."""

UNET = UNetConfig(
    in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2),
    num_res_blocks=(1, 1, 1), transformer_depth=(0, 1, 1), transformer_depth_middle=1,
    num_heads=None, head_dim=32, context_dim=TEXT.width, use_linear_in_transformer=True,
    norm_groups=16,
)
"""Levels at 32, 16 and 8 latent pixels; cross-attention at 16 and 8 and in the middle.

16 GroupNorm groups (4 channels each at width 64) rather than SD's 32 (2 each): at this width
32 groups come close to normalising every channel on its own, which cost the VAE most of its
learning speed on these flat-coloured images (see ``VAE``)."""

VAE_STEPS = 2800
"""Planned 3,000; the run diverged at step ~2,865 (L1 0.03 -> 0.39 within 40 steps at the flat
lr 1e-3), so it was rolled back to its step-2,800 checkpoint, which reads back 62 of 64 held-out
reconstructions right (colour, shape, size, position, background: 100/97/100/100/100%)."""
VAE_LOSS_FOREGROUND_WEIGHT = 5.0
"""Pixels of the shape weigh 6x the background in the reconstruction loss (400-step A/B:
colour read back right on 78% of reconstructions, against 17% unweighted)."""
DIFFUSION_STEPS = 4000
"""Stage 2 (eps-prediction on SD's schedule) ends at 4,000 steps: the first shipped model.

Its images took their background colour, and mostly the shape's place and size, from the
seed, whatever the prompt said (same seed, four background words: four identical images).
SD's schedule keeps 7% of the image at its last step; on flat-coloured 32 x 32 latents the
model reads the background from that leak in the initial noise instead of from the text
(session 3). More eps steps cannot fix that, so stage 3 changes the schedule."""
VPRED_FOCUS_STEPS = 6000
"""Stage 3 fine-tunes stage 2's weights to v-prediction on the zero-terminal-SNR schedule, with
the shape's pixels weighted (``FOREGROUND_WEIGHT``) and the text encoder at the U-Net's lr.

Session 5: after 2,000 steps (21 min at ~1.5 it/s) it scored colour / shape / size /
background 98 / 94.5 / 73.5 / 100% at CFG 1 on the 200 held-out prompts.  It replaced two
stages (sessions 3-4): v-prediction with the text encoder at 5x lr for 8,000 steps, then
6,000 steps with the shape weighted.  That path reached colour 95% but lost shape to chance
(34.5%) within its first 2,000 steps; the 2,000-step A/B that became this stage changed
exactly two things, the weighting from the start and the text lr (docs/default_model.md)."""
FOREGROUND_WEIGHT = 5.0
"""The v-prediction error over each image's shape weighs 1 + 5 (pooled to the latent grid),
the weight that made the stage-1 VAE keep shapes' colours (78% against 17% in a 400-step
A/B).  A shape covers 1.4-6.8% of the image; unweighted, its cells are a few percent of the
loss, and a session-3 run learnt the background (95%) long before the shape's colour (38%)."""
CAPTIONS_STEPS = 1500
"""Stage 4 (session 5, 15 min at ~1.7 it/s): stage 3 trained only on full captions and painted
the whole canvas in the shape's colour for short prompts ("a red circle": colour and shape
0% on held-out prompts with size, position and background left out).  After this stage: 80.5%
colour / 79.5% shape on those at CFG 2, the full-caption targets still met (CFG 7: colour
96.5%, shape 88.5%), size lower (CFG 2: 94.5% -> 82%)."""
PARTIAL_CAPTIONS = 0.3
"""Stage 4 leaves each of size, position and background out of a caption with this
probability (``DataConfig.shapes_partial_captions``): 34% of captions stay full."""
STAGES = ("vae", "diffusion", "vpred_focus", "captions")
STAGE_STEPS = {"diffusion": DIFFUSION_STEPS, "vpred_focus": VPRED_FOCUS_STEPS,
               "captions": CAPTIONS_STEPS}


def vae_stage(root: Path) -> VAETrainConfig:
    return VAETrainConfig(
        vae=VAE,
        data=DataConfig(source="shapes", resolution=RESOLUTION, random_flip=True,
                        caption_dropout=0.0, shapes_count=SHAPES_COUNT, seed=DATA_SEED),
        # Whole images, not crops: a VAE trained on 64 x 64 crops (session 1) reconstructed whole
        # 128 x 128 images with a tinted box over the interior, because its mid-block attention
        # and GroupNorm statistics see 4x the positions they were trained on.
        crop=None,
        loss=VAELossConfig(foreground_weight=VAE_LOSS_FOREGROUND_WEIGHT),
        optim=OptimConfig(lr=1e-3, batch_size=8, warmup_steps=100, weight_decay=0.0,
                          ema_decay=None, precision="auto"),
        run=RunConfig(out_dir=Path(root) / "vae", steps=VAE_STEPS, seed=DATA_SEED,
                      checkpoint_every=100, sample_every=0, log_every=10),
        scale_images=512,
    )


def diffusion_stage(root: Path):
    """The stage-2 config; needs the finished stage-1 VAE file."""
    from noisecraft.training.trainer import ModelConfig, ObjectiveConfig, SampleConfig, TrainConfig

    root = Path(root)
    return TrainConfig(
        data=DataConfig(source="shapes", resolution=RESOLUTION, random_flip=True,
                        caption_dropout=0.1, shapes_count=SHAPES_COUNT, seed=DATA_SEED + 1),
        model=ModelConfig(unet=UNET, text=TEXT, train_text_encoder=True,
                          vae_file=root / "vae" / VAE_FILE, family_name="noisecraft-shapes"),
        objective=ObjectiveConfig(prediction="eps", min_snr_gamma=5.0),
        optim=OptimConfig(lr=3e-4, batch_size=16, warmup_steps=200, weight_decay=0.01,
                          ema_decay=0.999, precision="auto"),
        run=RunConfig(out_dir=root / "diffusion", steps=DIFFUSION_STEPS, seed=DATA_SEED,
                      checkpoint_every=50, sample_every=500, log_every=10),
        samples=SampleConfig(),
    )


def vpred_focus_stage(root: Path):
    """The stage-3 config: stage 2's model fine-tuned to v-prediction with zero terminal SNR
    (no min-SNR weighting: for v it is ~0 at the last step, the one that must read the text),
    the error over each image's shape weighted ``1 + FOREGROUND_WEIGHT``."""
    from noisecraft.training.trainer import MODEL_FILE, ObjectiveConfig

    root = Path(root)
    base = diffusion_stage(root)
    return replace(
        base,
        model=replace(base.model, init_weights=root / "diffusion" / MODEL_FILE),
        objective=ObjectiveConfig(prediction="v", zero_terminal_snr=True,
                                  foreground_weight=FOREGROUND_WEIGHT),
        optim=replace(base.optim, warmup_steps=100),
        run=replace(base.run, out_dir=root / "vpred_focus", steps=VPRED_FOCUS_STEPS),
    )


def captions_stage(root: Path):
    """The stage-4 config: stage 3's model, same objective and optimiser, on captions that
    leave attributes out (``PARTIAL_CAPTIONS``), so short prompts work."""
    from noisecraft.training.trainer import MODEL_FILE

    root = Path(root)
    base = vpred_focus_stage(root)
    return replace(
        base,
        model=replace(base.model, init_weights=root / "vpred_focus" / MODEL_FILE),
        data=replace(base.data, shapes_partial_captions=PARTIAL_CAPTIONS),
        run=replace(base.run, out_dir=root / "captions", steps=CAPTIONS_STEPS),
    )


STAGE_CONFIGS = {"diffusion": diffusion_stage, "vpred_focus": vpred_focus_stage,
                 "captions": captions_stage}


def model_config(vae_file: Path | None = None):
    """The default architecture; in the latent space of ``vae_file`` when given, else in pixel
    space (the same U-Net with 3 input and output channels)."""
    from noisecraft.training.trainer import ModelConfig

    if vae_file is None:
        return ModelConfig(unet=replace(UNET, in_channels=3, out_channels=3), text=TEXT)
    return ModelConfig(unet=UNET, text=TEXT, vae_file=Path(vae_file))


def stage_done(root: Path, stage: str) -> bool:
    """True when the stage's final file exists, written at its ``STAGE_STEPS`` (raise them and
    the stage continues from its newest checkpoint)."""
    root = Path(root)
    if stage == "vae":
        return (root / "vae" / VAE_FILE).exists()
    if stage in STAGE_STEPS:
        from noisecraft.training.state import read_metadata
        from noisecraft.training.trainer import MODEL_FILE

        path = root / stage / MODEL_FILE
        if not path.exists():
            return False
        step = (read_metadata(path).get("noisecraft.training") or {}).get("step")
        return step is None or step >= STAGE_STEPS[stage]
    raise ValueError(f"unknown stage {stage!r}; the stages are {', '.join(STAGES)}")


def run_stage(root: str | Path, stage: str, *, stop_after: int | None = None) -> bool:
    """Run (resume) one stage unless it is finished; True when it is finished afterwards.

    ``stop_after`` ends this invocation after that many steps (with a checkpoint).
    """
    root = Path(root)
    if stage_done(root, stage):
        return True
    if stage == "vae":
        from noisecraft.training.vae_trainer import train_vae

        cfg = vae_stage(root)
        result = train_vae(replace(cfg, run=replace(cfg.run, stop_after=stop_after)))
        print(f"vae: step {result.step}, scaling factor {result.scaling_factor}", flush=True)
        if result.finished:
            check = vae_reconstruction_score(result.model_path, grid=root / "vae" / "recon.png")
            print(f"vae: reconstructions read back by the shape checker: {check}", flush=True)
    else:
        from noisecraft.training.trainer import train

        cfg = STAGE_CONFIGS[stage](root)
        result = train(replace(cfg, run=replace(cfg.run, stop_after=stop_after)))
        print(f"{stage}: step {result.step}", flush=True)
    return stage_done(root, stage)


def run_unfinished(root: str | Path = "runs/default", *, stop_after: int | None = None) -> str:
    """Run every unfinished stage in order; returns "done" or the stage left unfinished."""
    for stage in STAGES:
        if not run_stage(root, stage, stop_after=stop_after):
            return stage
    return "done"


SHIPPED_MAX_BYTES = 40_000_000


def shipped_metadata(src: Path) -> dict[str, str]:
    """``src``'s metadata with the configs re-written by the loader's own
    ``noisecraft_metadata`` (one format in shipped files); other entries kept as they are."""
    from safetensors import safe_open

    from noisecraft.checkpoints.loader import (
        META_FAMILY,
        META_TEXT,
        META_UNET,
        META_VAE,
        noisecraft_metadata,
        parse_noisecraft_metadata,
    )

    with safe_open(str(src), framework="pt") as f:
        raw = dict(f.metadata() or {})
    own = parse_noisecraft_metadata(raw, src)
    if META_FAMILY not in own or META_UNET not in own or META_TEXT not in own:
        raise ValueError(f"{src} lacks noisecraft.family / unet_config / text_config metadata: "
                         "not a model file written by noisecraft's trainer")
    family = own[META_FAMILY]
    if not family.latent.rgb_factors and META_VAE in own:
        family = replace(family, latent=_with_rgb_factors(src, own[META_VAE], family.latent))
    return {**raw, **noisecraft_metadata(family, unet=own[META_UNET],
                                         vae=own.get(META_VAE), text=own[META_TEXT])}


def _with_rgb_factors(src: Path, vae_config, fmt, n: int = 256):
    """``fmt`` with latent->RGB preview factors fitted on ``n`` training images through the
    model file's own VAE (live previews and ``--gif`` need them)."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    from noisecraft.models.latent_formats import fit_rgb_factors
    from noisecraft.models.vae import AutoencoderKL
    from noisecraft.training import state as ckpt
    from noisecraft.training.shapes import ShapesDataset

    vae = AutoencoderKL(vae_config).eval()
    vae.load_state_dict({k: v.float() for k, v in
                         ckpt.split_prefix(load_file(str(src)), ckpt.VAE_PREFIX).items()})
    data = ShapesDataset(count=n, size=RESOLUTION, seed=DATA_SEED + 2)
    images = torch.from_numpy(np.stack([np.asarray(data[i].image) for i in range(n)]))
    images = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        latents = torch.cat([fmt.process_in(vae.encode(chunk).mean) for chunk in images.split(32)])
    factors, bias = fit_rgb_factors(latents, images)
    return replace(fmt, rgb_factors=factors, rgb_bias=bias)


def export_default_model(root: str | Path = "runs/default", out: str | Path | None = None,
                         *, stage: str | None = None) -> Path:
    """Write a finished model in float16 (loaders upcast), checking the 40 MB budget.

    ``stage`` (one of ``STAGE_STEPS``) picks whose model file; None: the last stage (in
    ``STAGES`` order) that has one."""
    import torch
    from safetensors.torch import load_file

    from noisecraft.training import state as ckpt
    from noisecraft.training.trainer import MODEL_FILE

    model_stages = [s for s in STAGES if s != "vae"]
    if stage is not None and stage not in model_stages:
        raise ValueError(f"stage={stage!r}; the stages with a model file are "
                         f"{', '.join(model_stages)}")
    candidates = [stage] if stage is not None else model_stages[::-1]
    found = [Path(root) / s / MODEL_FILE for s in candidates]
    src = next((p for p in found if p.exists()), found[-1])
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist yet: finish training first "
                                "(scripts/train_default_model.sh)")
    out = Path(out) if out is not None else Path(root) / "noisecraft-shapes-fp16.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt.save_model_file(out, {"": load_file(str(src))}, shipped_metadata(src),
                         dtype=torch.float16)
    size = out.stat().st_size
    if size > SHIPPED_MAX_BYTES:
        raise ValueError(f"{out} is {size / 1e6:.1f} MB, over the {SHIPPED_MAX_BYTES / 1e6:.0f} MB"
                         " budget; shrink the model in default_model.py")
    return out


def vae_reconstruction_score(vae_file: str | Path, n: int = 64, grid: str | Path | None = None
                             ) -> dict[str, float]:
    """How well a stage-1 VAE (``vae.safetensors`` or a checkpoint's ``model.safetensors``) keeps
    the shapes: encode and decode ``n`` held-out 128 x 128 images (latent mean, no sampling) and
    read them back with the shape checker against their captions. ``grid`` (a PNG path) saves
    the originals above their reconstructions. Check this before starting stage 2: the
    diffusion model cannot draw what the VAE cannot decode."""
    import numpy as np
    import torch
    from PIL import Image

    from noisecraft.training.shape_checker import score
    from noisecraft.training.shapes import heldout_specs, render
    from noisecraft.training.vae_trainer import load_vae_file

    vae, _ = load_vae_file(Path(vae_file))
    specs = heldout_specs(n)
    originals = [render(spec, RESOLUTION) for spec in specs]
    x = torch.from_numpy(np.stack([np.asarray(im) for im in originals])).permute(0, 3, 1, 2)
    x = x.float() / 127.5 - 1.0
    with torch.no_grad():
        out = torch.cat([vae.decode(vae.encode(x[i:i + 16]).mean) for i in range(0, n, 16)])
    arrays = ((out.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    recons = [Image.fromarray(a) for a in arrays]
    if grid is not None:
        cols = 8
        rows = -(-n // cols)
        sheet = Image.new("RGB", (cols * RESOLUTION, 2 * rows * RESOLUTION))
        for i, (a, b) in enumerate(zip(originals, recons, strict=True)):
            r, c = divmod(i, cols)
            sheet.paste(a, (c * RESOLUTION, 2 * r * RESOLUTION))
            sheet.paste(b, (c * RESOLUTION, (2 * r + 1) * RESOLUTION))
        sheet.save(grid)
    return score(recons, [spec.caption() for spec in specs])
