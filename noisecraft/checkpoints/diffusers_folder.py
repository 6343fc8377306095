"""Loading diffusers-format folders (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder*/``).

Each component folder has a ``config.json`` and its weights in ``diffusion_pytorch_model.
safetensors`` (U-Net, VAE) or ``model.safetensors`` (text encoders); ``*.fp16.safetensors``
variants and ``.bin`` files are found too. The tokenizer folders are ignored: noisecraft ships
CLIP's vocabulary itself. The scheduler config gives the prediction type (``epsilon``,
``v_prediction``, ``sample``) and zero-terminal-SNR rescaling.

Weights are renamed to noisecraft's original-layout modules through the one mapping table of
each network (``unet_keys``, ``vae_keys``, ``text_keys``), checked against the meta-built
modules before any weight is read, and assigned (see ``noisecraft.checkpoints.assign``).

diffusers stores SD2's text encoder without its last layer and projection (SD2 uses the
penultimate layer); such an encoder is loaded with ``default_clip_skip=1``, i.e. its own last
layer, which is the layer SD2 uses.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

import torch
from torch import nn

from noisecraft.checkpoints.assign import assign, check_state_dict, placeholders, read_tensors
from noisecraft.checkpoints.files import CheckpointError, StateDictFile, open_state_dict
from noisecraft.checkpoints.loader import check_context
from noisecraft.checkpoints.text_keys import diffusers_to_original
from noisecraft.checkpoints.unet_keys import unet_state_dict_from_diffusers
from noisecraft.checkpoints.vae_keys import vae_config_from_diffusers, vae_state_dict_from_diffusers
from noisecraft.models.family import FAMILIES, Family, ModelBundle
from noisecraft.models.text import build_text_encoder
from noisecraft.models.text_config import ACTIVATIONS, text_config_from_state_dict, text_configs
from noisecraft.models.unet import SDXL_SIZE_EMBED_DIM, UNetModel
from noisecraft.models.unet_configs import UNetConfig
from noisecraft.models.vae import AutoencoderKL

WEIGHT_NAMES = {"unet": "diffusion_pytorch_model", "vae": "diffusion_pytorch_model",
                "text_encoder": "model", "text_encoder_2": "model"}
PREDICTIONS = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
# unet/config.json entries noisecraft's U-Net does not implement, with the values it needs.
_UNET_FIXED = {
    "class_embed_type": None, "time_cond_proj_dim": None, "encoder_hid_dim": None,
    "only_cross_attention": False, "dual_cross_attention": False, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "resnet_time_scale_shift": "default", "center_input_sample": False,
    "flip_sin_to_cos": True, "freq_shift": 0, "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn", "reverse_transformer_layers_per_block": None,
    "attention_type": "default", "addition_time_embed_dim": SDXL_SIZE_EMBED_DIM,
}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "missing; a diffusers component folder needs its "
                                    "config.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None


def _per_level(cfg: dict, key: str, n: int, where: Path) -> list:
    value = cfg.get(key)
    value = [value] * n if not isinstance(value, list | tuple) else list(value)
    if len(value) != n:
        raise CheckpointError(where, f"{key}={cfg.get(key)!r} needs one entry per block ({n})")
    return value


def unet_config_from_diffusers(cfg: dict, where: Path) -> UNetConfig:
    """UNetConfig from a diffusers ``UNet2DConditionModel`` ``config.json`` dict."""
    for key, allowed in _UNET_FIXED.items():
        if key in cfg and cfg[key] != allowed and not (key == "addition_time_embed_dim"
                                                       and cfg.get("addition_embed_type") is None):
            raise CheckpointError(where, f"{key}={cfg[key]!r} is not supported; noisecraft's "
                                         f"SD U-Net needs {allowed!r}")
    down = list(cfg["down_block_types"])
    n = len(down)
    up_expected = [t.replace("Down", "Up") for t in reversed(down)]
    if any(t not in ("CrossAttnDownBlock2D", "DownBlock2D") for t in down) or \
            list(cfg.get("up_block_types", up_expected)) != up_expected:
        raise CheckpointError(where, f"down/up_block_types {down} / {cfg.get('up_block_types')} "
                                     "are not an SD layout (CrossAttn/plain blocks, mirrored)")
    widths = [int(w) for w in cfg["block_out_channels"]]
    attn = [t.startswith("CrossAttn") for t in down]
    layers = _per_level(cfg, "transformer_layers_per_block", n, where)
    heads = _per_level(cfg, "num_attention_heads", n, where) if cfg.get("num_attention_heads") \
        else _per_level(cfg, "attention_head_dim", n, where)  # diffusers' misnomer: head counts
    used = [i for i in range(n) if attn[i]] + [n - 1]
    if len({heads[i] for i in used}) == 1:
        head_kw = {"num_heads": heads[used[0]], "head_dim": None}
    elif len({widths[i] // heads[i] for i in used}) == 1:
        head_kw = {"num_heads": None, "head_dim": widths[used[0]] // heads[used[0]]}
    else:
        raise CheckpointError(where, f"attention heads {heads} over widths {widths} follow "
                                     "neither a fixed head count nor a fixed head width")
    cross = cfg.get("cross_attention_dim", 1280)
    if isinstance(cross, list | tuple):
        if len(set(cross)) != 1:
            raise CheckpointError(where, f"per-block cross_attention_dim {cross} is unsupported")
        cross = cross[0]
    adm = None
    if cfg.get("addition_embed_type") == "text_time":
        adm = cfg["projection_class_embeddings_input_dim"]
    elif cfg.get("addition_embed_type") is not None:
        raise CheckpointError(where, f"addition_embed_type={cfg['addition_embed_type']!r}; "
                                     "supported: null or 'text_time' (SDXL)")
    try:
        return UNetConfig(
            in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
            model_channels=widths[0], channel_mult=tuple(w // widths[0] for w in widths),
            num_res_blocks=tuple(_per_level(cfg, "layers_per_block", n, where)),
            transformer_depth=tuple(d if a else 0 for d, a in zip(layers, attn, strict=True)),
            transformer_depth_middle=layers[-1], context_dim=cross,
            use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
            adm_in_channels=adm, norm_groups=int(cfg.get("norm_num_groups", 32)), **head_kw,
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(where, f"cannot express this U-Net: {e}") from None


def weights_file(folder: Path, component: str, variant: str | None) -> Path:
    """The weight file of a component folder (``variant``: e.g. "fp16")."""
    stem = WEIGHT_NAMES.get(component, "model")
    stems = (stem, "pytorch_model") if stem == "model" else (stem,)
    tag = f".{variant}" if variant else ""
    for s in stems:
        for ext in (".safetensors", ".bin"):
            if (folder / f"{s}{tag}{ext}").is_file():
                return folder / f"{s}{tag}{ext}"
    if (folder / f"{stem}.safetensors.index.json").exists():
        raise CheckpointError(folder, "sharded weights (*.safetensors.index.json) are not "
                                      "supported yet; merge the shards into one file")
    variants = sorted(folder.glob(f"{stem}.*.safetensors"))
    if variant is None and len(variants) == 1:
        return variants[0]
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    raise CheckpointError(folder, f"no weights: expected {stem}{tag}.safetensors (or .bin); "
                                  f"found {found}")


class _Component:
    """One network of the folder: checked against its meta module on creation; ``load()``
    reads, renames and assigns."""

    def __init__(self, f: StateDictFile, what: str, rename: Callable[[dict], dict],
                 build: Callable[[dict], nn.Module]):
        self.f, self.what, self.rename = f, what, rename
        self.keys = {k: k for k in f.keys()}
        try:
            ph = rename(placeholders(f, self.keys))
        except (KeyError, ValueError) as e:
            raise CheckpointError(f.path, f"{what}: {e}") from None
        self.module = build(ph)
        self.reshape = check_state_dict(self.module, {k: tuple(v.shape) for k, v in ph.items()},
                                        path=f.path, what=what)

    def load(self, dtype, device) -> nn.Module:
        sd = self.rename(read_tensors(self.f, self.keys, dtype=dtype, device=device))
        return assign(self.module, sd, self.reshape, path=self.f.path, what=self.what)


def _family(path: Path, unet: UNetConfig, text_cfgs: dict[str, dict], sched: dict,
            family: str | None) -> Family:
    if unet.adm_in_channels is not None:
        name = "sdxl" if "text_encoder" in text_cfgs else "sdxl-refiner"
    elif (unet.context_dim == 1024 or unet.use_linear_in_transformer
          or text_cfgs.get("text_encoder", {}).get("hidden_act") == "gelu"):
        name = "sd2"
    else:
        name = "sd1"
    prediction = PREDICTIONS.get(sched.get("prediction_type", "epsilon"))
    if prediction is None:
        raise CheckpointError(path / "scheduler", f"prediction_type="
                              f"{sched['prediction_type']!r}; allowed: {', '.join(PREDICTIONS)}")
    if name == "sd2" and prediction == "v":
        name = "sd2-v"
    if family is not None:
        if family not in FAMILIES or FAMILIES[family].text != FAMILIES[name].text:
            raise CheckpointError(path, f"family={family!r} does not fit this {name} folder; "
                                        f"allowed: families with text={FAMILIES[name].text!r}")
        return FAMILIES[family]
    fam = FAMILIES[name]
    if prediction != fam.prediction:
        fam = fam.with_overrides(prediction=prediction)
    if sched.get("rescale_betas_zero_snr"):
        fam = fam.with_overrides(zero_terminal_snr=True)
    offset = sched.get("steps_offset")
    if isinstance(offset, int) and not isinstance(offset, bool) and offset != fam.steps_offset:
        fam = fam.with_overrides(steps_offset=offset)
    return fam


class _TextEncoders:
    """The folder's text encoder(s) as one text module of the arrangement: each file renamed
    to original names (``text_keys``) and checked against its encoder on creation."""

    def __init__(self, files: list[tuple[StateDictFile, dict]], arrangement: str):
        presets = text_configs(arrangement)
        if len(files) != len(presets):
            raise CheckpointError(files[0][0].path.parent.parent, f"{arrangement} needs "
                                  f"{len(presets)} text encoder folder(s), found {len(files)}")
        self.files, self.arrangement = files, arrangement
        self.layouts = [c.layout for c in presets]
        phs, configs = [], []
        for (f, cfg), preset in zip(files, presets, strict=True):
            try:
                ph = diffusers_to_original(placeholders(f, {k: k for k in f.keys()}),
                                           preset.layout)
                config = text_config_from_state_dict(ph, like=preset)
            except (KeyError, ValueError) as e:
                raise CheckpointError(f.path, f"text encoder: {e}") from None
            if cfg.get("hidden_act") in ACTIVATIONS:
                config = dataclasses.replace(config, activation=cfg["hidden_act"])
            if arrangement == "sd2" and config.projection_dim is None:  # diffusers' SD2 export
                config = dataclasses.replace(config, default_clip_skip=1)
            phs.append(ph)
            configs.append(config)
        self.module = build_text_encoder(arrangement, configs=configs, device="meta")
        encoders = list(getattr(self.module, "embedders", [self.module]))
        self.heads = [f"embedders.{i}." if hasattr(self.module, "embedders") else ""
                      for i in range(len(encoders))]
        self.reshape = {}
        for (f, _), enc, ph, head in zip(files, encoders, phs, self.heads, strict=True):
            shapes = {k: tuple(v.shape) for k, v in ph.items()}
            fix = check_state_dict(enc, shapes, path=f.path, what="text encoder")
            self.reshape.update({head + k: v for k, v in fix.items()})

    def load(self, dtype, device) -> nn.Module:
        sd = {}
        for (f, _), layout, head in zip(self.files, self.layouts, self.heads, strict=True):
            tensors = read_tensors(f, {k: k for k in f.keys()}, dtype=dtype, device=device)
            sd.update({head + k: v for k, v in diffusers_to_original(tensors, layout).items()})
        return assign(self.module, sd, self.reshape, path=self.files[0][0].path,
                      what="text encoder")


def load_diffusers_folder(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = torch.float32,
    variant: str | None = None,
) -> ModelBundle:
    """Load a diffusers pipeline folder into a :class:`ModelBundle` (same arguments as
    ``load_checkpoint``; ``variant="fp16"`` picks ``*.fp16.safetensors`` weights, otherwise the
    plain files, or the only variant present). ``bundle.sha256`` is None (no single file)."""
    path = Path(path)
    if not (path / "unet" / "config.json").is_file():
        raise CheckpointError(path, "not a diffusers folder: expected model_index.json with "
                                    "unet/, vae/ and text_encoder/ (text_encoder_2/) subfolders")
    cfgs = {c: _read_json(path / c / "config.json") for c in WEIGHT_NAMES
            if (path / c / "config.json").is_file()}
    text_cfgs = {c: v for c, v in cfgs.items() if c.startswith("text_encoder")}
    if "vae" not in cfgs or not text_cfgs:
        raise CheckpointError(path, f"incomplete diffusers folder: found {sorted(cfgs)}; "
                                    "noisecraft needs unet/, vae/ and text_encoder*/")
    sched_file = path / "scheduler" / "scheduler_config.json"
    sched = _read_json(sched_file) if sched_file.is_file() else {}
    unet_config = unet_config_from_diffusers(cfgs["unet"], path / "unet" / "config.json")
    fam = _family(path, unet_config, text_cfgs, sched, family)
    with ExitStack() as stack:
        def open_(c: str) -> StateDictFile:
            return stack.enter_context(open_state_dict(weights_file(path / c, c, variant)))

        unet = _Component(open_("unet"), "U-Net",
                          lambda sd: unet_state_dict_from_diffusers(sd, unet_config),
                          lambda ph: UNetModel(unet_config, device="meta"))
        vae = _Component(open_("vae"), "VAE", vae_state_dict_from_diffusers,
                         lambda ph: AutoencoderKL(vae_config_from_diffusers(cfgs["vae"]),
                                                  device="meta"))
        text = _TextEncoders([(open_(c), text_cfgs[c]) for c in sorted(text_cfgs)], fam.text)
        check_context(path, unet_config, text.module)
        modules = [unet.load(dtype, device), vae.load(dtype, device), text.load(dtype, device)]
    scaling = cfgs["vae"].get("scaling_factor")
    if scaling is not None and scaling != fam.latent.scaling_factor:
        shift = cfgs["vae"].get("shift_factor") or 0.0
        fam = fam.with_overrides(latent=dataclasses.replace(
            fam.latent, scaling_factor=scaling, shift_factor=shift))
    return ModelBundle(fam, modules[0], modules[1], modules[2], name=path.name, sha256=None,
                       extras={"source": str(path), "variant": variant})
