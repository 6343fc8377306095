"""LoRA: kohya and PEFT files change the outputs exactly as a hand merge of
``W + weight * alpha / rank * up @ down`` does; several stack; remove() restores exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from noisecraft.checkpoints import CheckpointError, load_checkpoint
from noisecraft.checkpoints.lora import apply_loras, read_lora
from tests.fixtures.checkpoints import unet_inputs, write_single_file
from tests.fixtures.loras import write_kohya_lora, write_peft_lora


def outputs(bundle):
    x, t, ctx, y, _ = unet_inputs(bundle.unet.config)
    with torch.no_grad():
        emb = bundle.text_encoder.encode_prompts(["a small blue sphere", ""])
        return bundle.unet(x, t, ctx, y), emb.context


def hand_merge(bundle, loras):
    """The reference: add weight * alpha/rank * up @ down to each listed layer, in place."""
    with torch.no_grad():
        for layers, weight in loras:
            for layer in layers:
                w = getattr(bundle, layer.part).get_submodule(layer.module).weight
                rank = layer.down.shape[0]
                scale = 1.0 if layer.alpha is None else layer.alpha / rank
                product = layer.up.flatten(1) @ layer.down.flatten(1)
                w += (weight * scale * product).reshape(w.shape).to(w.dtype)


def assert_outputs_close(a, b):
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    out = {}
    for family in ("sd1", "sd2", "sdxl", "sdxl-refiner"):
        out[family] = write_single_file(root / f"{family}.safetensors", family, seed=1)
    return root, out


@pytest.mark.parametrize("family, writer, weight", [
    ("sd1", write_kohya_lora, 0.7),
    ("sd2", write_kohya_lora, 1.3),
    ("sdxl", write_kohya_lora, 0.8),
    ("sd1", write_peft_lora, 0.6),
    ("sdxl", write_peft_lora, 1.0),
    ("sdxl-refiner", write_peft_lora, 0.9),
])
def test_lora_equals_hand_merge_and_removes_exactly(files, family, writer, weight):
    root, models = files
    lora = root / f"{family}-{writer.__name__}.safetensors"
    layers = writer(lora, family, seed=3)
    bundle, reference = load_checkpoint(models[family]), load_checkpoint(models[family])
    base = outputs(bundle)
    originals = {name: p for name, p in bundle.unet.named_parameters()}
    handle = apply_loras(bundle, [(lora, weight)])
    hand_merge(reference, [(layers, weight)])
    merged = outputs(bundle)
    assert_outputs_close(merged, outputs(reference))
    for before, after in zip(base, merged, strict=True):
        assert (before - after).abs().max() > 1e-3  # the LoRA changed U-Net and text outputs
    handle.remove()
    for b, r in zip(base, outputs(bundle), strict=True):
        assert torch.equal(b, r)
    assert all(p is originals[n] for n, p in bundle.unet.named_parameters())


def test_two_loras_stack_in_one_call_and_in_two(files):
    root, models = files
    kohya = write_kohya_lora(root / "k.safetensors", "sd1", seed=4, alpha=1.0, rank=2)
    peft = write_peft_lora(root / "p.safetensors", "sd1", seed=5, alpha=None)
    bundle, reference = load_checkpoint(models["sd1"]), load_checkpoint(models["sd1"])
    base = outputs(bundle)
    hand_merge(reference, [(kohya, 0.5), (peft, -0.8)])
    expected = outputs(reference)
    with apply_loras(bundle, [(root / "k.safetensors", 0.5), (root / "p.safetensors", -0.8)]):
        assert_outputs_close(outputs(bundle), expected)
    assert all(torch.equal(a, b) for a, b in zip(base, outputs(bundle), strict=True))
    first = apply_loras(bundle, [(root / "k.safetensors", 0.5)])
    second = apply_loras(bundle, [(root / "p.safetensors", -0.8)])
    assert_outputs_close(outputs(bundle), expected)
    with pytest.raises(RuntimeError, match="remove LoRA handles in reverse order"):
        first.remove()
    second.remove()
    first.remove()
    first.remove()  # idempotent
    assert not first.active
    assert all(torch.equal(a, b) for a, b in zip(base, outputs(bundle), strict=True))


def test_lora_on_a_half_model(files):
    root, models = files
    layers = write_kohya_lora(root / "h.safetensors", "sdxl", seed=6)
    bundle = load_checkpoint(models["sdxl"], dtype=torch.bfloat16)
    reference = load_checkpoint(models["sdxl"], dtype=torch.bfloat16)
    snapshot = {k: v.clone() for k, v in bundle.unet.state_dict().items()}
    handle = apply_loras(bundle, [(root / "h.safetensors", 1.0)])
    hand_merge(reference, [(layers, 1.0)])
    touched, expected = 0, reference.unet.state_dict()
    for k, v in bundle.unet.state_dict().items():
        assert v.dtype == torch.bfloat16
        torch.testing.assert_close(v, expected[k], atol=1e-2, rtol=1e-2)
        touched += not torch.equal(v, snapshot[k])
    assert touched == 8  # the U-Net layers the fixture LoRA lists for SDXL
    handle.remove()
    assert all(torch.equal(v, snapshot[k]) for k, v in bundle.unet.state_dict().items())


def test_unknown_keys_error_or_warning(files):
    root, models = files
    bundle = load_checkpoint(models["sd1"])
    write_peft_lora(root / "xl.safetensors", "sdxl", seed=7)
    with pytest.raises(CheckpointError, match=r"xl\.safetensors: .*address no layer.*"
                                              r"text_encoder_2\.text_model"):
        apply_loras(bundle, [(root / "xl.safetensors", 1.0)])
    sd = {"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}
    sd.update({f"lora_unet_time_embedding_linear_1.lora_{r}.weight": torch.zeros(s)
               for r, s in (("down", (2, 32)), ("up", (128, 2)))})
    save_file(sd, root / "loha.safetensors")
    with pytest.raises(CheckpointError, match=r"1 LoRA key\(s\).*hada_w1_a.*strict=False"):
        read_lora(root / "loha.safetensors", bundle)
    with pytest.warns(UserWarning, match="hada_w1_a.*skipped"):
        layers = read_lora(root / "loha.safetensors", bundle, strict=False)
    assert [(la.module, la.alpha) for la in layers] == [("time_embed.0", None)]
    save_file({"something.else": torch.zeros(1)}, root / "none.safetensors")
    with pytest.raises(CheckpointError, match="no usable LoRA layers"):
        read_lora(root / "none.safetensors", bundle, strict=False)


def test_bad_lora_layers_are_named(files):
    root, models = files
    bundle = load_checkpoint(models["sd1"])
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 33, 1, 1),
               f"{name}.lora_up.weight": torch.zeros(32, 2, 1, 1)}, root / "shape.safetensors")
    with pytest.raises(CheckpointError, match=rf"{name}.*does not fit "
                                              r"unet\.input_blocks\.1\.1\.proj_in\.weight"):
        apply_loras(bundle, [(root / "shape.safetensors", 1.0)])
    save_file({f"{name}.lora_down.weight": torch.zeros(2, 32, 1, 1)}, root / "half.safetensors")
    with pytest.raises(CheckpointError, match="has only.*needs both down and up"):
        apply_loras(bundle, [(root / "half.safetensors", 1.0)])
