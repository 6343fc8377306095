"""An interrupted-and-resumed training run equals an uninterrupted one, bit for bit."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from noisecraft.training.state import latest_checkpoint, load_state
from noisecraft.training.trainer import train
from tests.training.test_trainer import quiet, tiny_config


def _same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


def test_resumed_run_equals_uninterrupted(tmp_path):
    # latent space, caption dropout, EMA, warm-up and checkpoints every 2 steps
    whole = train(tiny_config(tmp_path / "whole", steps=5, latent=True), progress=quiet)
    part = train(tiny_config(tmp_path / "split", steps=5, latent=True, stop_after=3),
                 progress=quiet)
    assert not part.finished and part.model_path is None and part.step == 3
    assert latest_checkpoint(tmp_path / "split").name == "step_00000003"
    rest = train(tiny_config(tmp_path / "split", steps=5, latent=True), progress=quiet)
    assert rest.finished and rest.step == 5
    assert part.losses + rest.losses == whole.losses

    _same_tensors(load_file(str(whole.model_path)), load_file(str(rest.model_path)))
    a = load_state(latest_checkpoint(tmp_path / "whole") / "state.safetensors")
    b = load_state(latest_checkpoint(tmp_path / "split") / "state.safetensors")
    assert a["step"] == b["step"] == 5 and a["extra"] == b["extra"]
    _same_tensors(a["trained"], b["trained"])
    _same_tensors(a["ema"]["shadow"], b["ema"]["shadow"])
    assert a["ema"]["num_updates"] == b["ema"]["num_updates"] == 5
    opt_a, opt_b = a["optimizer"], b["optimizer"]
    assert opt_a["param_groups"] == opt_b["param_groups"]
    assert opt_a["state"].keys() == opt_b["state"].keys()
    for pid, entries in opt_a["state"].items():
        _same_tensors(entries, opt_b["state"][pid])
    def losses(run):  # it_per_s is a timing, the rest must match
        return [line.split(",")[:3] for line in (run / "metrics.csv").read_text().splitlines()]

    assert losses(tmp_path / "whole") == losses(tmp_path / "split")
    assert len(losses(tmp_path / "split")) == 6  # header + steps 1..5, none twice


def test_resume_refuses_to_overwrite_or_change(tmp_path):
    train(tiny_config(tmp_path, steps=2), progress=quiet)
    cfg = tiny_config(tmp_path, steps=4)
    with pytest.raises(FileExistsError, match="already holds a training run"):
        train(cfg.__class__(**{**cfg.__dict__, "run": cfg.run.__class__(
            **{**cfg.run.__dict__, "resume": False})}), progress=quiet)
    changed = cfg.__class__(**{**cfg.__dict__, "optim": cfg.optim.__class__(
        **{**cfg.optim.__dict__, "lr": 1e-4})})
    with pytest.raises(ValueError, match="optim.lr"):
        train(changed, progress=quiet)


def test_a_run_recorded_before_a_new_option_resumes_at_its_default(tmp_path):
    """A config.json without a setting (the run predates it) means that setting's default:
    the run resumes; asking for another value on resume is still refused by name."""
    import json
    from dataclasses import replace

    config = tiny_config(tmp_path / "run", steps=4)
    train(replace(config, run=replace(config.run, stop_after=2)), progress=quiet)
    recorded = tmp_path / "run" / "config.json"
    old = json.loads(recorded.read_text())
    del old["optim"]["text_lr_scale"], old["objective"]["zero_terminal_snr"]
    del old["model"]["init_weights"]
    recorded.write_text(json.dumps(old))
    changed = replace(config, optim=replace(config.optim, text_lr_scale=2.0))
    with pytest.raises(ValueError, match="optim.text_lr_scale"):
        train(changed, progress=quiet)
    assert train(config, progress=quiet).step == 4
