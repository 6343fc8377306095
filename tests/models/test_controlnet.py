"""ControlNet model, its application window and loading, without a reference implementation
(parity with diffusers: tests/parity/test_controlnet_parity.py)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from noisecraft.checkpoints.controlnet_keys import (
    controlnet_config_from_state_dict,
    controlnet_module_map,
    load_controlnet,
)
from noisecraft.checkpoints.files import CheckpointError
from noisecraft.diffusion import Denoiser
from noisecraft.models.controlnet import (
    ControlledModel,
    ControlNet,
    ControlNetConfig,
    ControlSpec,
    percent_to_timestep,
)
from noisecraft.models.unet import UNetModel
from noisecraft.models.unet_configs import UNET_PRESETS
from noisecraft.schedules import DiscreteSchedule, karras_sigmas

SD1 = ControlNetConfig(UNET_PRESETS["tiny_sd15"])


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(model: torch.nn.Module, seed: int):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 / max(1, p[0].numel()) ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def nets():
    unet = _randomize(UNetModel(SD1.unet), 0)
    return unet, _randomize(ControlNet(SD1), 1), _randomize(ControlNet(SD1), 2)


def _inputs(batch=2, t=(700.0, 300.0)):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    ctx = torch.randn(batch, 5, SD1.unet.context_dim, generator=g)
    hint = torch.rand(1, 3, 64, 64, generator=g)
    return x, torch.tensor(t[:batch]), ctx, hint


def test_state_dict_keys_are_the_original_layout():
    keys = set(ControlNet(SD1, device="meta").state_dict())
    hint = {k for k in keys if k.startswith("input_hint_block.")}
    assert hint == {f"input_hint_block.{i}.{p}" for i in range(0, 15, 2)
                    for p in ("weight", "bias")}
    n_inputs = 1 + 2 * 3 + 2  # conv_in, 2 ResBlocks per level (3 levels), 2 Downsamples
    assert {k for k in keys if k.startswith("zero_convs.")} == {
        f"zero_convs.{n}.0.{p}" for n in range(n_inputs) for p in ("weight", "bias")}
    assert {"middle_block_out.0.weight", "time_embed.0.weight", "input_blocks.0.0.weight",
            "middle_block.1.proj_in.weight"} <= keys
    assert not any(k.startswith(("output_blocks.", "out.", "label_emb.")) for k in keys)
    unet_keys = set(UNetModel(SD1.unet, device="meta").state_dict())
    shared = {k for k in keys if k.startswith(("input_blocks.", "middle_block.", "time_embed."))}
    assert shared <= unet_keys  # the encoder half is the U-Net's own, key for key
    xl = ControlNetConfig(UNET_PRESETS["tiny_sdxl_base"])
    assert "label_emb.0.0.weight" in ControlNet(xl, device="meta").state_dict()
    mapped = set(controlnet_module_map(SD1).values())
    assert {k.rpartition(".")[0] for k in keys} == mapped


def test_fresh_controlnet_gives_zero_residuals():
    x, t, ctx, hint = _inputs()
    down, mid = ControlNet(SD1)(x, hint.expand(2, -1, -1, -1), t, ctx)
    assert all(torch.count_nonzero(d) == 0 for d in down) and torch.count_nonzero(mid) == 0


@pytest.mark.parametrize("spec_kwargs", [dict(strength=0.0), dict(end_percent=0.0),
                                         dict(start_percent=0.8, end_percent=0.2)])
def test_inactive_control_leaves_the_unet_output_identical(nets, spec_kwargs):
    unet, cn, _ = nets
    x, t, ctx, hint = _inputs()
    with torch.no_grad():
        plain = unet(x, t, ctx)
        controlled = ControlledModel(unet, [ControlSpec(cn, hint, **spec_kwargs)])(x, t, ctx)
        active = ControlledModel(unet, [ControlSpec(cn, hint)])(x, t, ctx)
    assert torch.equal(controlled, plain)
    assert (active - plain).abs().max() > 1e-3  # the same ControlNet, when active, acts


def test_window_follows_comfyui_percent_to_sigma():
    """Through a Denoiser (sigma -> timestep), a ControlNet acts at sigma iff
    sigma(end) <= sigma <= sigma(start), sigma(p) = sigma at timestep (1 - p) * 999."""
    schedule = DiscreteSchedule.from_betas()
    start, end = 0.2, 0.6
    s_start, s_end = (float(schedule.t_to_sigma(torch.tensor((1 - p) * 999.0)))
                      for p in (start, end))
    spec = ControlSpec(ControlNet(SD1, device="meta"), torch.zeros(1, 3, 8, 8),
                       start_percent=start, end_percent=end)
    sigmas = karras_sigmas(30, schedule.sigma_min, schedule.sigma_max)[:-1]
    t = schedule.sigma_to_t(sigmas.to(torch.float32))
    got = spec.active(t, 1000)
    want = (sigmas <= s_start) & (sigmas >= s_end)
    assert 0 < int(want.sum()) < len(sigmas)
    assert torch.equal(got, want)
    assert percent_to_timestep(0.0) == float("inf") and percent_to_timestep(1.0) == -float("inf")


def test_mixed_batch_gets_residuals_only_inside_the_window(nets):
    unet, cn, _ = nets
    x, t, ctx, hint = _inputs(t=(800.0, 300.0))
    spec = ControlSpec(cn, hint, start_percent=0.0, end_percent=0.5)  # t >= 499.5
    with torch.no_grad():
        mixed = ControlledModel(unet, [spec])(x, t, ctx)
        plain = unet(x, t, ctx)
        full = ControlledModel(unet, [ControlSpec(cn, hint)])(x, t, ctx)
    torch.testing.assert_close(mixed[0], full[0], atol=1e-6, rtol=0)
    assert torch.equal(mixed[1], plain[1])


def test_several_controlnets_sum_their_residuals(nets):
    unet, a, b = nets
    x, t, ctx, hint = _inputs()
    hint_b = torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = ControlledModel(unet, [ControlSpec(a, hint, 0.6), ControlSpec(b, hint_b, 1.3)])(
            x, t, ctx)
        hint_a = hint.expand(2, -1, -1, -1)
        hb = torch.nn.functional.interpolate(hint_b, size=(64, 64), mode="nearest-exact")
        da, ma = a(x, hint_a, t, ctx, strength=0.6)
        db, mb = b(x, hb, t, ctx, strength=1.3)
        want = unet(x, t, ctx, down_residuals=[p + q for p, q in zip(da, db, strict=True)],
                    mid_residual=ma + mb)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


def test_controlled_model_is_a_denoiser_model_and_doubles_for_cfg(nets):
    unet, cn, _ = nets
    schedule = DiscreteSchedule.from_betas()
    x, _, ctx, hint = _inputs()
    model = ControlledModel(unet, [ControlSpec(cn, hint, 0.8)])
    with torch.no_grad():
        x0 = Denoiser(model, schedule)(x, torch.tensor([3.0, 3.0]), {"context": ctx})
        x0_plain = Denoiser(unet, schedule)(x, torch.tensor([3.0, 3.0]), {"context": ctx})
    assert x0.shape == x.shape and torch.isfinite(x0).all()
    assert (x0 - x0_plain).abs().max() > 1e-3


def test_inpainting_unet_feeds_the_noisy_latent_channels(nets):
    _, cn, _ = nets
    unet = _randomize(UNetModel(UNET_PRESETS["tiny_sd15_inpaint"]), 4)
    x, t, ctx, hint = _inputs()
    x9 = torch.cat([x, torch.rand(2, 5, 8, 8)], dim=1)
    with torch.no_grad():
        got = ControlledModel(unet, [ControlSpec(cn, hint)])(x9, t, ctx)
        down, mid = cn(x, hint.expand(2, -1, -1, -1), t, ctx)
        want = unet(x9, t, ctx, down_residuals=down, mid_residual=mid)
    assert torch.equal(got, want)


def test_errors_teach():
    unet_xl = UNetModel(UNET_PRESETS["tiny_sdxl_base"], device="meta")
    cn = ControlNet(SD1, device="meta")
    with pytest.raises(ValueError, match=r"does not fit the U-Net.*context_dim"):
        ControlledModel(unet_xl, [ControlSpec(cn, torch.zeros(1, 3, 8, 8))])
    with pytest.raises(ValueError, match="end_percent must lie in"):
        ControlSpec(cn, torch.zeros(1, 3, 8, 8), end_percent=1.5)
    x, t, ctx, hint = _inputs()
    with pytest.raises(ValueError, match="fit_control_image"):
        ControlNet(SD1)(x, hint[..., :32, :32].expand(2, -1, -1, -1), t, ctx)


@pytest.mark.parametrize("preset,family", [("tiny_sd15", "sd1"), ("tiny_sd2", "sd2"),
                                           ("tiny_sdxl_base", "sdxl")])
def test_detection_round_trip(preset, family):
    config = ControlNetConfig(UNET_PRESETS[preset])
    sd = ControlNet(config, device="meta").state_dict()
    detected = controlnet_config_from_state_dict(sd)
    assert detected == config and detected.family == family


def test_bad_files_are_refused_by_name(tmp_path, nets):
    _, cn, _ = nets
    sd = {k: v.contiguous() for k, v in cn.state_dict().items()}
    del sd["zero_convs.3.0.weight"]
    save_file(sd, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"broken\.safetensors.*zero_convs\.3\.0\.weight"):
        load_controlnet(tmp_path / "broken.safetensors")
    unet_sd = {"model.diffusion_model." + k: v.contiguous()
               for k, v in UNetModel(SD1.unet).state_dict().items()}
    save_file(unet_sd, tmp_path / "unet.safetensors")
    with pytest.raises(CheckpointError, match="not a loadable ControlNet"):
        load_controlnet(tmp_path / "unet.safetensors")


def test_loading_in_another_dtype(tmp_path, nets):
    _, cn, _ = nets
    save_file({k: v.contiguous() for k, v in cn.state_dict().items()},
              tmp_path / "control_v11p_sd15_shuffle.safetensors")
    loaded = load_controlnet(tmp_path / "control_v11p_sd15_shuffle.safetensors",
                             dtype=torch.bfloat16)
    assert next(loaded.parameters()).dtype == torch.bfloat16
    assert loaded.config.global_average_pooling  # ComfyUI's file-name rule for shuffle
    x, t, ctx, hint = _inputs()
    down, mid = loaded(x.bfloat16(), hint.expand(2, -1, -1, -1), t, ctx.bfloat16())
    assert mid.shape == (2, 64, 1, 1) and down[0].shape == (2, 32, 1, 1)
