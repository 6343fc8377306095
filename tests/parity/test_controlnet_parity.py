"""ControlNet against diffusers' ControlNetModel with identical random weights, through a whole
U-Net step: diffusers' ControlNet residuals into diffusers' UNet2DConditionModel versus ours
into ours (tiny widths, the real SD 1.x, SD 2.x and SDXL block structures), to 1e-4.  Files written
here in the original single-file layout and as a diffusers folder load to the same numbers.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from noisecraft.checkpoints.controlnet_keys import (
    controlnet_config_to_diffusers,
    controlnet_state_dict_from_diffusers,
    controlnet_state_dict_to_diffusers,
    load_controlnet,
)
from noisecraft.checkpoints.unet_keys import (
    unet_config_to_diffusers,
    unet_state_dict_from_diffusers,
)
from noisecraft.models.controlnet import ControlledModel, ControlNet, ControlNetConfig, ControlSpec
from noisecraft.models.unet import UNetModel, sdxl_vector
from noisecraft.models.unet_configs import UNET_PRESETS

diffusers = pytest.importorskip("diffusers")

TOL = 1e-4
STRENGTH = 0.7


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Non-zero random weights everywhere (both libraries zero-init the output convs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 / max(1, p[0].numel()) ** 0.5)


def _models(preset: str):
    config = ControlNetConfig(UNET_PRESETS[preset])
    ref_cn = diffusers.ControlNetModel(**controlnet_config_to_diffusers(config)).eval()
    _randomize(ref_cn, 0)
    cn = ControlNet(config, device="meta").eval()
    cn.load_state_dict(controlnet_state_dict_from_diffusers(ref_cn.state_dict(), config),
                       assign=True)
    ref_unet = diffusers.UNet2DConditionModel(**unet_config_to_diffusers(config.unet)).eval()
    _randomize(ref_unet, 1)
    unet = UNetModel(config.unet, device="meta").eval()
    unet.load_state_dict(unet_state_dict_from_diffusers(ref_unet.state_dict(), config.unet),
                         assign=True)
    return config, ref_cn, cn, ref_unet, unet


def _inputs(config: ControlNetConfig, batch: int = 2):
    g = torch.Generator().manual_seed(2)
    u = config.unet
    x = torch.randn(batch, u.in_channels, 8, 8, generator=g)
    hint = torch.rand(batch, 3, 64, 64, generator=g)
    t = torch.tensor([999.0, 311.5])[:batch]
    ctx = torch.randn(batch, 5, u.context_dim, generator=g)
    kw_ours, kw_ref = {}, {}
    if u.adm_in_channels is not None:
        pooled = torch.randn(batch, u.adm_in_channels - 6 * 256, generator=g)
        ids = torch.tensor([[1024.0, 768.0, 0.0, 16.0, 1024.0, 1024.0],
                            [512.0, 512.0, 32.0, 0.0, 640.0, 512.0]])[:batch]
        kw_ours["y"] = sdxl_vector(pooled, ids[:, 0:2], ids[:, 2:4], ids[:, 4:6])
        kw_ref["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
    return x, hint, t, ctx, kw_ours, kw_ref


@pytest.mark.parametrize("preset", ["tiny_sd15", "tiny_sd2", "tiny_sdxl_base"])
def test_controlnet_step_matches_diffusers(preset):
    config, ref_cn, cn, ref_unet, unet = _models(preset)
    x, hint, t, ctx, kw_ours, kw_ref = _inputs(config)
    with torch.no_grad():
        ref_down, ref_mid = ref_cn(x, t, ctx, controlnet_cond=hint,
                                   conditioning_scale=STRENGTH, return_dict=False, **kw_ref)
        expected = ref_unet(x, t, encoder_hidden_states=ctx,
                            down_block_additional_residuals=tuple(ref_down),
                            mid_block_additional_residual=ref_mid, **kw_ref).sample
        plain = unet(x, t, ctx, **kw_ours)
        down, mid = cn(x, hint, t, ctx, kw_ours.get("y"), strength=STRENGTH)
        got = unet(x, t, ctx, kw_ours.get("y"), down_residuals=down, mid_residual=mid)
        wrapped = ControlledModel(unet, [ControlSpec(cn, hint, STRENGTH)])(x, t, ctx, **kw_ours)
    assert len(down) == len(ref_down)
    for n, (a, b) in enumerate(zip(down, ref_down, strict=True)):
        torch.testing.assert_close(a, b, atol=TOL, rtol=0, msg=f"down residual {n}")
    torch.testing.assert_close(mid, ref_mid, atol=TOL, rtol=0)
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    assert torch.equal(wrapped, got)
    # the ControlNet changes the prediction far beyond the tolerance: the test has teeth
    assert (got - plain).abs().max() > 100 * TOL


@pytest.mark.parametrize("preset", ["tiny_sd15", "tiny_sdxl_base"])
def test_files_in_every_layout_load_to_the_same_numbers(preset, tmp_path):
    config, ref_cn, cn, _, _ = _models(preset)
    x, hint, t, ctx, kw_ours, _ = _inputs(config)
    sd = {k: v.contiguous() for k, v in cn.state_dict().items()}
    save_file({"control_model." + k: v for k, v in sd.items()}, tmp_path / "prefixed.safetensors")
    save_file(sd, tmp_path / "bare.safetensors")
    diffusers_sd = controlnet_state_dict_to_diffusers(sd, config)
    save_file({k: v.contiguous() for k, v in diffusers_sd.items()},
              tmp_path / "diffusers_named.safetensors")
    ref_cn.save_pretrained(tmp_path / "folder")
    ref_cn.save_pretrained(tmp_path / "pipeline" / "controlnet")
    with torch.no_grad():
        want = cn(x, hint, t, ctx, kw_ours.get("y"))
        for name in ("prefixed.safetensors", "bare.safetensors", "diffusers_named.safetensors",
                     "folder", "pipeline"):
            loaded = load_controlnet(tmp_path / name)
            assert loaded.config == config, name
            assert loaded.config.family == ("sdxl" if "sdxl" in preset else "sd1")
            got = loaded(x, hint, t, ctx, kw_ours.get("y"))
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=name)
