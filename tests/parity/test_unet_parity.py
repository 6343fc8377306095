"""UNetModel against diffusers' UNet2DConditionModel with identical random weights.

The diffusers model is built from ``unet_config_to_diffusers(config)``, its state dict is
renamed through ``unet_state_dict_from_diffusers`` and loaded strictly into UNetModel.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from noisecraft.checkpoints.unet_keys import (
    unet_config_to_diffusers,
    unet_state_dict_from_diffusers,
    unet_state_dict_to_diffusers,
)
from noisecraft.models.unet import UNetModel, sdxl_refiner_vector, sdxl_vector
from noisecraft.models.unet_configs import UNET_PRESETS

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-zero random weights everywhere (diffusers zero-inits some output convs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 / max(1, p[0].numel()) ** 0.5)


def _pair(name: str, seed: int = 0):
    config = _config(name)
    ref = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(config)).eval()
    _randomize(ref, seed)
    ours = UNetModel(config, device="meta").eval()
    ours.load_state_dict(unet_state_dict_from_diffusers(ref.state_dict(), config), assign=True)
    return config, ref, ours


def _config(name: str):
    """A preset, or ``"<preset>:groups=N"`` for the preset with N GroupNorm groups."""
    preset, _, groups = name.partition(":groups=")
    config = UNET_PRESETS[preset]
    return replace(config, norm_groups=int(groups)) if groups else config


def _inputs(config, batch=2, size=(16, 16), seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, *size, generator=g)
    t = torch.tensor([999.0, 17.25])[:batch]
    ctx = torch.randn(batch, 7, config.context_dim, generator=g)
    return x, t, ctx


def _sdxl_kwargs(config, batch, refiner: bool, seed=2):
    g = torch.Generator().manual_seed(seed)
    pooled_dim = config.adm_in_channels - (5 if refiner else 6) * 256
    pooled = torch.randn(batch, pooled_dim, generator=g)
    if refiner:
        ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 6.0], [512.0, 512.0, 32.0, 0.0, 2.5]])
        y = sdxl_refiner_vector(pooled, ids[:, 0:2], ids[:, 2:4], ids[:, 4])
    else:
        ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0],
                            [512.0, 512.0, 32.0, 0.0, 640.0, 512.0]])
        y = sdxl_vector(pooled, ids[:, 0:2], ids[:, 2:4], ids[:, 4:6])
    return y, {"text_embeds": pooled, "time_ids": ids[:batch]}


def _max_diff(name, size=(16, 16), residuals=False):
    config, ref, ours = _pair(name)
    x, t, ctx = _inputs(config, size=size)
    kw_ours, kw_ref = {}, {}
    if config.adm_in_channels is not None:
        y, added = _sdxl_kwargs(config, x.shape[0], refiner="refiner" in name)
        kw_ours["y"], kw_ref["added_cond_kwargs"] = y, added
    if residuals:
        down, mid = _residuals(ours, x, t, ctx, kw_ours.get("y"))
        kw_ours.update(down_residuals=down, mid_residual=mid)
        kw_ref.update(down_block_additional_residuals=tuple(down),
                      mid_block_additional_residual=mid)
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx, **kw_ref).sample
        got = ours(x, t, ctx, **kw_ours)
    assert got.shape == expected.shape == (x.shape[0], config.out_channels, *size)
    assert expected.abs().mean() > 1e-2  # the comparison is not between near-zero outputs
    return (got - expected).abs().max().item()


def _residuals(model, x, t, ctx, y):
    """Random tensors shaped like each input block's output and the middle block's output."""
    shapes = []
    hooks = [b.register_forward_hook(lambda m, i, o: shapes.append(o.shape))
             for b in [*model.input_blocks, model.middle_block]]
    with torch.no_grad():
        model(x, t, ctx, y)
    for h in hooks:
        h.remove()
    g = torch.Generator().manual_seed(5)
    tensors = [torch.randn(s, generator=g) for s in shapes]
    return tensors[:-1], tensors[-1]


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sd2", "tiny_sdxl_base", "tiny_sdxl_refiner",
                                  "tiny_sd15_inpaint", "tiny_sdxl_inpaint", "tiny_sd2:groups=8"])
def test_matches_diffusers(name):
    assert _max_diff(name) <= TOL


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sdxl_base"])
def test_controlnet_residuals_match_diffusers(name):
    assert _max_diff(name, residuals=True) <= TOL


def test_odd_latent_size_matches_diffusers():
    # 4 levels: 13x10 latents are not divisible by 8, so upsampling must follow the skips.
    assert _max_diff("tiny_sdxl_refiner", size=(13, 10)) <= TOL


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sdxl_refiner"])
def test_round_trip_original_diffusers_original_is_identity(name):
    config, ref, ours = _pair(name, seed=3)
    original = ours.state_dict()
    back = unet_state_dict_from_diffusers(unet_state_dict_to_diffusers(original, config), config)
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
    assert unet_state_dict_to_diffusers(original, config).keys() == ref.state_dict().keys()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sdxl_base"])
def test_full_size_matches_diffusers(name):
    start = time.perf_counter()
    diff = _max_diff(name, size=(16, 16))
    print(f"\n{name}: max abs diff vs diffusers {diff:.3e} ({time.perf_counter() - start:.1f} s)")
    assert diff <= TOL


@pytest.mark.parametrize("name", ["tiny_sd15", "tiny_sd2", "tiny_sdxl_base", "tiny_sdxl_refiner"])
def test_original_key_names_agree_with_diffusers_single_file_converter(name):
    """diffusers' own LDM -> diffusers converter is an independent oracle for the original
    key names: both renamings of the same checkpoint must put every tensor in the same place."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = UNET_PRESETS[name]
    original = UNetModel(config, device="meta").state_dict()
    original = {k: torch.full(v.shape, float(i)) for i, (k, v) in enumerate(original.items())}
    kwargs = unet_config_to_diffusers(config)
    assert len(set(config.num_res_blocks)) == 1  # the converter only handles a uniform count
    kwargs.update(layers_per_block=config.num_res_blocks[0], num_class_embeds=None)
    checkpoint = {"model.diffusion_model." + k: v for k, v in original.items()}
    theirs = convert_ldm_unet_checkpoint(checkpoint, kwargs)
    ours = unet_state_dict_to_diffusers(original, config)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
