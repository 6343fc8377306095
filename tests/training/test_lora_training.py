"""LoRA fine-tuning of a tiny real-format SD checkpoint: only the adapters train, the file is
kohya's format and the project's LoRA loader applies it to the same effect, resume is exact,
bad input is explained."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from noisecraft.checkpoints import load_checkpoint
from noisecraft.checkpoints.lora import apply_loras, read_lora
from noisecraft.training.loop import diffusion_loss, to_x0, tokenize
from noisecraft.training.lora_network import (
    TEXT_TARGETS,
    UNET_TARGETS,
    LoRANetwork,
    LoRANetworkConfig,
    save_lora_file,
)
from noisecraft.training.lora_train import LoRARun, LoRATrainConfig, SampleConfig, train_lora
from noisecraft.training.runtime import DataConfig, DistEnv, OptimConfig, RunConfig, load_batch
from noisecraft.training.state import latest_checkpoint, load_state, read_metadata
from tests.fixtures.checkpoints import unet_inputs, write_single_file

KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
COLOURS = ("red", "blue", "green", "yellow")


def quiet(event) -> None:
    pass


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD1 checkpoint and 4 captioned 16 px images (a white bar on a coloured ground)."""
    root = tmp_path_factory.mktemp("lora_training")
    data = root / "images"
    data.mkdir()
    for i, colour in enumerate(COLOURS):
        image = Image.new("RGB", (16, 16), colour)
        image.paste((255, 255, 255), (4, 4 + i, 12, 8 + i))
        image.save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a white bar on {colour}")
    return {"base": write_single_file(root / "base.safetensors", "sd1", seed=1),
            "sd2": write_single_file(root / "sd2.safetensors", "sd2", seed=2), "data": data}


def config(files, out: Path, *, steps: int = 3, **changes) -> LoRATrainConfig:
    """Batch = the whole data set, lr high enough to move the loss in a few steps."""
    base = LoRATrainConfig(
        base=files["base"],
        data=DataConfig(source=str(files["data"]), resolution=16, random_crop=False,
                        random_flip=False, caption_dropout=0.25),
        network=LoRANetworkConfig(rank=4, alpha=2.0),
        optim=OptimConfig(lr=3e-2, batch_size=4, warmup_steps=1, ema_decay=None,
                          precision="fp32"),
        run=RunConfig(out_dir=out, steps=steps, checkpoint_every=2, sample_every=0,
                      log_every=1),
        name="bars",
    )
    return replace(base, **changes)


def outputs(bundle) -> tuple[torch.Tensor, torch.Tensor]:
    """U-Net output on fixed inputs, and the text context of a fixed prompt."""
    x, t, ctx, _, _ = unet_inputs(bundle.unet.config)
    with torch.no_grad():
        return bundle.unet(x, t, ctx), bundle.text_encoder.encode_prompts(["a white bar"]).context


def base_state(bundle) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part in ("unet", "text_encoder", "vae")
            for k, v in getattr(bundle, part).state_dict().items()}


# ----------------------------------------------------------------------------- training


def test_only_the_adapters_train_and_step_zero_is_the_base_model(files, tmp_path):
    r = LoRARun(config(files, tmp_path), DistEnv())
    trainable = {n for n, p in r.model.named_parameters() if p.requires_grad}
    layers = [n for n, _ in r.network.named_children()]
    assert trainable == {f"lora.{n}.lora_{d}.weight" for n in layers for d in ("down", "up")}
    assert all(n.endswith(("_to_q", "_to_k", "_to_v", "_to_out_0")) for n in layers)
    assert len(layers) == 8 * 11  # 4 projections x 2 attentions x 11 transformer blocks
    assert not any(p.requires_grad for part in (r.bundle.unet, r.bundle.text_encoder,
                                                r.bundle.vae) for p in part.parameters())
    with_lora = outputs(r.bundle)
    r.network.detach()
    assert all(torch.equal(a, b) for a, b in zip(with_lora, outputs(r.bundle), strict=True))
    r.network.attach()

    before = base_state(r.bundle)
    for _ in range(2):
        r.train_step()
    after = base_state(r.bundle)
    assert all(torch.equal(before[k], after[k]) for k in before)  # bit-identical base
    assert all(p.grad is None for n, p in r.model.named_parameters() if not n.startswith("lora."))
    ups = [m.lora_up.weight for m in r.network.children()]
    assert all(u.abs().max() > 0 for u in ups)  # every adapter moved off zero


def test_loss_falls_on_a_fixed_batch(files, tmp_path):
    c = config(files, tmp_path)
    r = LoRARun(replace(c, data=replace(c.data, caption_dropout=0.0)), DistEnv())
    images, captions = load_batch(r.dataset, 0, 0, 4)

    def fixed_loss() -> float:  # the same images, noise and timesteps every time
        g = torch.Generator().manual_seed(7)
        x0 = to_x0(images.repeat(8, 1, 1, 1), r.vae, r.latent, g, "fp32")
        with torch.no_grad():
            loss, _ = diffusion_loss(r.model, x0, tokenize(r.model.text, captions * 8),
                                     r.objective, r.schedule, g)
        return loss.item()

    start = fixed_loss()
    for _ in range(10):
        r.train_step()
    assert fixed_loss() < 0.85 * start


def test_trained_lora_file_is_kohya_and_the_loader_applies_it(files, tmp_path):
    result = train_lora(config(files, tmp_path), progress=quiet)
    assert result.finished and result.model_path == tmp_path / "bars.safetensors"
    tensors = load_file(str(result.model_path))
    assert tensors and all(KOHYA_KEY.match(k) for k in tensors), sorted(tensors)[:3]
    layers = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0]
              for k in tensors}
    assert len(tensors) == 3 * len(layers) == 3 * 88
    assert all(tensors[f"{n}.alpha"].item() == 2.0 for n in layers)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in layers
    meta = read_metadata(result.model_path)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_sd_model_name"]) == (
        4, 2.0, "base")
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_steps"] == 3

    bundle = load_checkpoint(files["base"])
    base = outputs(bundle)
    resolved = read_lora(result.model_path, bundle)
    assert len(resolved) == 88 and all(
        la.part == "unet" and la.module.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))
        for la in resolved)
    with apply_loras(bundle, [(result.model_path, 0.0)]):
        assert all(torch.equal(a, b) for a, b in zip(base, outputs(bundle), strict=True))
    with apply_loras(bundle, [(result.model_path, 1.0)]):
        merged = outputs(bundle)
    assert (merged[0] - base[0]).abs().max() > 1e-3  # the LoRA changes the U-Net's output
    torch.testing.assert_close(merged[1], base[1])  # and, with no text targets, not the text

    hooked = load_checkpoint(files["base"])  # the training-time computation, from the file
    network = LoRANetwork.for_bundle(hooked, LoRANetworkConfig(rank=4, alpha=2.0))
    network.load_state_dict(tensors)
    network.attach()
    torch.testing.assert_close(outputs(hooked)[0], merged[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["base", "sd2"])
def test_exported_names_are_what_the_loader_reads_for_every_target(files, tmp_path, family):
    """All U-Net and text-encoder targets (SD1: 1x1-conv proj_in/out, HF text layout; SD2:
    linear projections, OpenCLIP layout): merging the file equals running the adapters."""
    bundle = load_checkpoint(files[family])
    net_config = LoRANetworkConfig(rank=3, alpha=1.5, unet_targets=UNET_TARGETS,
                                   text_targets=TEXT_TARGETS)
    network = LoRANetwork.for_bundle(bundle, net_config)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in network.children():
            m.lora_up.weight.copy_(0.1 * torch.randn(m.lora_up.weight.shape, generator=g))
    path = save_lora_file(tmp_path / "all.safetensors", network.state_dict(), {})
    kinds = {type(getattr(bundle, la.part).get_submodule(la.module)).__name__
             for la in read_lora(path, bundle)}
    assert kinds == ({"Linear", "Conv2d"} if family == "base" else {"Linear"})
    assert network.parts() == {"unet", "text_encoder"}
    network.attach()
    expected = outputs(bundle)
    network.detach()
    with apply_loras(bundle, [(path, 1.0)]):
        for a, b in zip(outputs(bundle), expected, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_resumed_run_equals_uninterrupted(files, tmp_path):
    whole = train_lora(config(files, tmp_path / "whole", steps=4), progress=quiet)
    part = train_lora(config(files, tmp_path / "split", steps=4, run=RunConfig(
        out_dir=tmp_path / "split", steps=4, checkpoint_every=2, sample_every=0, log_every=1,
        stop_after=2)), progress=quiet)
    assert not part.finished and part.model_path is None
    rest = train_lora(config(files, tmp_path / "split", steps=4), progress=quiet)
    assert rest.finished and part.losses + rest.losses == whole.losses
    a, b = load_file(str(whole.model_path)), load_file(str(rest.model_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    state = load_state(latest_checkpoint(tmp_path / "split") / "state.safetensors")
    assert set(state["trained"]) == set(a)  # the checkpoint holds the adapters, no base weight
    assert state["extra"]["base_sha256"] == load_checkpoint(files["base"]).sha256


def test_ema_weights_are_exported_and_sampled(files, tmp_path):
    c = config(files, tmp_path, steps=2, samples=SampleConfig(prompts=("a white bar",),
                                                               steps=2))
    c = replace(c, optim=replace(c.optim, ema_decay=0.5),
                run=replace(c.run, sample_every=2))
    result = train_lora(c, progress=quiet)
    assert (tmp_path / "samples/step_00000002.png").exists()
    exported = load_file(str(result.model_path))
    state = load_state(latest_checkpoint(tmp_path) / "state.safetensors")
    shadow = {k.removeprefix("lora."): v for k, v in state["ema"]["shadow"].items()}
    assert set(shadow) == {k for k in exported if not k.endswith(".alpha")}
    assert all(torch.equal(exported[k], shadow[k]) for k in shadow)
    assert any(not torch.equal(exported[k], state["trained"][k]) for k in shadow)


# ----------------------------------------------------------------------------- errors


def test_bad_input_is_explained(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="base checkpoint .*missing.safetensors does "
                                                "not exist"):
        train_lora(config(files, tmp_path / "a", base=tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match=r"rank=0 must be an integer >= 1"):
        LoRANetworkConfig(rank=0)
    with pytest.raises(ValueError, match=r"unet_targets: unknown layer name\(s\) \['to_x'\]; "
                                         r"allowed: to_q, to_k, to_v, to_out\.0, proj_in"):
        LoRANetworkConfig(unet_targets=("to_q", "to_x"))
    with pytest.raises(ValueError, match=r"text_targets: .*\['to_q'\]; allowed: q_proj"):
        LoRANetworkConfig(text_targets=("to_q",))
    with pytest.raises(ValueError, match="alpha=0 must be > 0"):
        LoRANetworkConfig(alpha=0)
    with pytest.raises(ValueError, match="name='a/b' must be a plain file stem"):
        config(files, tmp_path, name="a/b")
    sdxl = write_single_file(tmp_path / "xl.safetensors", "sdxl")
    with pytest.raises(ValueError, match="supports SD 1.x, SD 2.x .*not 'sdxl'"):
        train_lora(config(files, tmp_path / "b", base=sdxl))


def test_resume_on_another_base_is_refused(files, tmp_path):
    mine = write_single_file(tmp_path / "mine.safetensors", "sd1", seed=1)
    first = config(files, tmp_path / "run", steps=2, base=mine)
    train_lora(replace(first, run=replace(first.run, stop_after=1)), progress=quiet)
    with pytest.raises(ValueError, match="its config differs from this one in base"):
        train_lora(config(files, tmp_path / "run", steps=2), progress=quiet)
    write_single_file(mine, "sd1", seed=9)  # the same path, other weights
    with pytest.raises(ValueError, match=r"cannot resume .*trained on a base with SHA-256 "
                                         r"[0-9a-f]{64}, but .*mine.safetensors now has"):
        train_lora(first, progress=quiet)


# ----------------------------------------------------------------------------- command line


def test_cli_trains_a_lora_that_generate_applies(files, tmp_path):
    from typer.testing import CliRunner

    from noisecraft.cli import app

    runner = CliRunner()
    result = runner.invoke(app, [
        "train-lora", str(files["data"]), "--base", str(files["base"]), "-o", str(tmp_path),
        "--name", "bars", "--rank", "2", "--steps", "3", "--batch-size", "4", "--lr", "0.05",
        "--resolution", "16", "--unet-targets", "all", "--text-targets", "q_proj,v_proj"])
    assert result.exit_code == 0, result.output
    lora = tmp_path / "bars.safetensors"
    assert f"step 3: {lora}" in result.output
    assert {la.part for la in read_lora(lora, load_checkpoint(files["base"]))} == {
        "unet", "text_encoder"}

    def generate(out: str, *lora_args: str):
        r = runner.invoke(app, ["generate", "a white bar on red", "-m", str(files["base"]),
                                "--steps", "3", "--seed", "1", "-W", "16", "-H", "16",
                                "-o", str(tmp_path / out), *lora_args])
        assert r.exit_code == 0, r.output
        with Image.open(tmp_path / out) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy())

    base = generate("base.png")
    assert torch.equal(generate("zero.png", "--lora", f"{lora}:0"), base)
    assert not torch.equal(generate("lora.png", "--lora", f"{lora}:1"), base)


def test_cli_errors_exit_2_with_the_reason(files, tmp_path):
    from typer.testing import CliRunner

    from noisecraft.cli import app

    def run(*args):
        return CliRunner().invoke(app, ["train-lora", str(files["data"]), "-o",
                                        str(tmp_path), *args])

    r = run("--base", str(tmp_path / "nope.safetensors"))
    assert r.exit_code == 2 and "nope.safetensors does not exist" in r.output
    r = run("--base", str(files["base"]), "--rank", "0")
    assert r.exit_code == 2 and "rank=0 must be an integer >= 1" in r.output
    r = run("--base", str(files["base"]), "--unet-targets", "to_q,attn")
    assert r.exit_code == 2 and "unknown layer name(s) ['attn']; allowed: to_q" in r.output
