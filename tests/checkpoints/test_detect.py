"""Family detection from key names and shapes, on tiny files in the real layouts."""

from __future__ import annotations

import pytest
import torch

from noisecraft.checkpoints import detect_family, load_checkpoint
from noisecraft.checkpoints.files import CheckpointError, open_state_dict
from tests.fixtures.checkpoints import tiny_state_dict, write_single_file

EXPECTED = {  # fixture family -> (detected name, prediction, inpaint)
    "sd1": ("sd1", "eps", False),
    "sd1-inpaint": ("sd1", "eps", True),
    "sd2": ("sd2", "eps", False),
    "sd2-v": ("sd2-v", "v", False),
    "sd2-inpaint": ("sd2", "eps", True),
    "sdxl": ("sdxl", "eps", False),
    "sdxl-inpaint": ("sdxl", "eps", True),
    "sdxl-refiner": ("sdxl-refiner", "eps", False),
}


@pytest.mark.parametrize("name", EXPECTED)
def test_each_family_is_detected(name):
    family, details = detect_family(tiny_state_dict(name))
    assert (family, details["prediction"], details["inpaint"]) == EXPECTED[name]


def test_detect_accepts_a_path_and_an_open_file(tmp_path):
    path = write_single_file(tmp_path / "m.safetensors", "sdxl-refiner")
    assert detect_family(path)[0] == "sdxl-refiner"
    with open_state_dict(path) as f:
        assert detect_family(f)[1]["text"] == "sdxl_refiner"


def test_sd2_v_heuristic_is_reported_as_such():
    sd = tiny_state_dict("sd2")
    key = next(k for k in sd if k.endswith("output_blocks.8.1.transformer_blocks.0.norm1.bias"))
    _, eps = detect_family(sd)
    assert "heuristic" in eps["prediction_reason"] and key in eps["prediction_reason"]
    sd[key] = torch.linspace(-0.2, 0.2, sd[key].numel())  # std 0.117 > 0.09
    assert detect_family(sd)[0] == "sd2-v"
    sd[key] = torch.linspace(-0.15, 0.15, sd[key].numel())  # std 0.088 <= 0.09
    assert detect_family(sd)[0] == "sd2"


def test_explicit_v_pred_and_ztsnr_keys(tmp_path):
    path = write_single_file(tmp_path / "m.safetensors", "sdxl", v_pred=True, ztsnr=True)
    name, details = detect_family(path)
    assert (name, details["prediction"], details["zero_terminal_snr"]) == ("sdxl", "v", True)
    fam = load_checkpoint(path).family
    assert (fam.prediction, fam.zero_terminal_snr, fam.text) == ("v", True, "sdxl")


def test_without_text_encoders_the_unet_decides():
    for name in ("sd1", "sd2", "sdxl"):
        unet_only = {k: v for k, v in tiny_state_dict(name).items()
                     if k.startswith("model.diffusion_model.")}
        family, details = detect_family(unet_only)
        assert family == name and details["text"] is None


def test_family_override():
    sd = tiny_state_dict("sd2")
    assert detect_family(sd, family="sd2-v")[0] == "sd2-v"
    assert detect_family(sd, family="sd2-v")[1]["prediction"] == "v"
    with pytest.raises(CheckpointError, match="family='sdxl' needs the sdxl text-encoder"):
        detect_family(sd, family="sdxl")
    with pytest.raises(CheckpointError, match="unknown family='sd9'; allowed: sd1, sd2"):
        detect_family(sd, family="sd9")


def test_unknown_architecture_names_what_was_found(tmp_path):
    with pytest.raises(CheckpointError, match=r"unknown architecture.*found: \['foo.bar'"):
        detect_family({"foo.bar.weight": torch.zeros(2)})
    vae_only = {k: v for k, v in tiny_state_dict("sd1").items()
                if k.startswith("first_stage_model.")}
    with pytest.raises(CheckpointError, match=r"<state dict>.*load_vae\(\)"):
        detect_family(vae_only)


def test_contradicting_parts_are_refused():
    sd = {k: v for k, v in tiny_state_dict("sdxl").items() if not k.startswith("conditioner.")}
    sd.update({k: v for k, v in tiny_state_dict("sd1").items()
               if k.startswith("cond_stage_model.")})
    with pytest.raises(CheckpointError, match="laid out as sd1.*U-Net has SDXL's vector"):
        detect_family(sd)
