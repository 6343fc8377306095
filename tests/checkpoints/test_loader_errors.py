"""Bad files are refused with the file's name and what was expected, before any weight is
read (so nothing half-loaded can escape)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

import noisecraft.checkpoints.assign as assign_module
from noisecraft.checkpoints import CheckpointError, load_checkpoint, load_model
from noisecraft.models.text import build_text_encoder
from tests.fixtures.checkpoints import tiny_spec, tiny_state_dict, write_single_file


@pytest.fixture
def reads(monkeypatch):
    """Counts tensors read for loading; the refusals below must happen before the first."""
    count = []
    original = assign_module.read_tensor

    def counting(*args, **kwargs):
        count.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(assign_module, "read_tensor", counting)
    return count


def refused(path, match, reads, **kwargs):
    with pytest.raises(CheckpointError, match=match) as err:
        load_checkpoint(path, **kwargs)
    assert str(path) in str(err.value)
    assert reads == []
    return str(err.value)


def test_truncated_file(tmp_path, reads):
    path = write_single_file(tmp_path / "m.safetensors", "sd1")
    path.write_bytes(path.read_bytes()[:-1000])
    refused(path, "truncated", reads)


def test_corrupt_header(tmp_path, reads):
    path = write_single_file(tmp_path / "m.safetensors", "sd1")
    data = bytearray(path.read_bytes())
    data[10:20] = b"\x00" * 10
    path.write_bytes(bytes(data))
    refused(path, "corrupt safetensors header", reads)


def test_unknown_architecture(tmp_path, reads):
    path = tmp_path / "flux.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(4, 4)}, path)
    msg = refused(path, "unknown architecture: no Stable Diffusion U-Net", reads)
    assert "double_blocks.0" in msg and "model.diffusion_model.input_blocks.0.0.weight" in msg


@pytest.mark.parametrize("key", [
    "model.diffusion_model.output_blocks.4.1.proj_out.bias",
    "first_stage_model.decoder.up.1.block.0.conv2.weight",
    "cond_stage_model.transformer.text_model.encoder.layers.1.mlp.fc2.weight",
])
def test_missing_key_is_named(tmp_path, reads, key):
    path = write_single_file(tmp_path / "m.safetensors", "sd1", drop=(key,))
    refused(path, rf"1 missing key\(s\): {key}", reads)


def test_unexpected_key_under_a_network_prefix(tmp_path, reads):
    key = "first_stage_model.decoder.mid.attn_2.q.weight"
    path = write_single_file(tmp_path / "m.safetensors", "sd1",
                             replace={key: torch.zeros(64, 64, 1, 1)})
    refused(path, rf"1 unexpected key\(s\): {key}", reads)


@pytest.mark.parametrize("key, shape, expected", [
    ("first_stage_model.decoder.mid.block_1.conv1.weight", (64, 64, 1, 1), (64, 64, 3, 3)),
    ("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", (64, 60),
     (64, 64)),
    ("cond_stage_model.model.transformer.resblocks.1.mlp.c_fc.weight", (100, 64), (128, 64)),
])
def test_mismatched_shape_is_named_with_both_shapes(tmp_path, reads, key, shape, expected):
    family = "sd2" if key.startswith("cond_stage_model.model.") else "sd1"
    path = write_single_file(tmp_path / "m.safetensors", family,
                             replace={key: torch.zeros(shape)})
    msg = refused(path, "mis-shaped", reads)
    assert key in msg and str(expected) in msg and str(shape) in msg


def test_parts_that_do_not_belong_together(tmp_path, reads):
    spec = tiny_spec("sd1")
    wide = build_text_encoder("sd1", configs=[dataclasses.replace(
        spec.text[0], width=128, heads=2)], device="meta").state_dict()
    sd = {k: v for k, v in tiny_state_dict("sd1").items() if not k.startswith("cond_stage")}
    sd.update({"cond_stage_model." + k: torch.zeros(v.shape) for k, v in wide.items()})
    path = tmp_path / "m.safetensors"
    save_file(sd, path)
    refused(path, "128-wide hidden states but the U-Net's cross-attention expects "
                  "context_dim=64", reads)


def test_family_override_that_does_not_fit(tmp_path, reads):
    path = write_single_file(tmp_path / "m.safetensors", "sd1")
    refused(path, "family='sdxl-refiner' needs the sdxl_refiner text-encoder", reads,
            family="sdxl-refiner")


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_pickle_that_runs_code_is_refused_and_not_run(tmp_path, reads):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    sd = dict(tiny_state_dict("sd1"))
    with open(path, "wb") as f:
        torch.save({"state_dict": sd, "payload": _RunsCode(marker)}, f)
    with pytest.raises(CheckpointError, match="refused: loading this file would need to run "
                                              "code") as err:
        load_model(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    assert reads == []
