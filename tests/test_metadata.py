import json

import pytest
from PIL import Image

from noisecraft.metadata import (
    format_parameters,
    parse_parameters,
    read_settings,
    sampler_from_a1111,
    save_png,
)

SETTINGS = {
    "prompt": "a red circle, (bright:1.2)",
    "negative_prompt": "blurry",
    "steps": 20,
    "sampler": "euler_ancestral",
    "scheduler": "karras",
    "cfg_scale": 7.5,
    "seed": 1234,
    "width": 128,
    "height": 96,
    "version": "0.1.0",
}


def test_parameters_round_trip():
    text = format_parameters(SETTINGS)
    assert text.splitlines()[1] == "Negative prompt: blurry"
    assert "Sampler: Euler a" in text and "Schedule type: Karras" in text
    back = parse_parameters(text)
    for k in ("prompt", "negative_prompt", "steps", "sampler", "scheduler", "cfg_scale", "seed",
              "width", "height"):
        assert back[k] == SETTINGS[k], k


def test_parse_real_a1111_text():
    text = (
        "masterpiece, 1girl\nsecond line\nNegative prompt: lowres, bad anatomy\n"
        'Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 99, Size: 512x768, '
        'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "a: 1, b: 2"'
    )
    s = parse_parameters(text)
    assert s["prompt"] == "masterpiece, 1girl\nsecond line"
    assert s["negative_prompt"] == "lowres, bad anatomy"
    assert (s["sampler"], s["scheduler"]) == ("dpmpp_2m", "karras")
    assert (s["width"], s["height"], s["seed"]) == (512, 768, 99)
    assert s["extra"]["Lora hashes"] == "a: 1, b: 2"


def test_unknown_sampler_lists_names():
    with pytest.raises(ValueError, match="Euler a"):
        sampler_from_a1111("Eulerish")


def test_save_png_is_atomic_and_readable(tmp_path):
    path = save_png(Image.new("RGB", (8, 8), "red"), tmp_path / "x.png", SETTINGS)
    assert read_settings(path) == json.loads(json.dumps(SETTINGS))
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]
    with Image.open(path) as im:
        assert "Sampler: Euler a" in im.text["parameters"]


def test_save_png_failure_leaves_nothing(tmp_path):
    class Broken:
        def save(self, *a, **k):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        save_png(Broken(), tmp_path / "y.png", None)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match=".png"):
        save_png(Image.new("RGB", (2, 2)), tmp_path / "y.jpg", None)


def test_read_settings_errors(tmp_path):
    p = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(p)
    with pytest.raises(ValueError, match="no generation settings"):
        read_settings(p)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read"):
        read_settings(tmp_path / "bad.png")


def test_extra_text_chunks(tmp_path):
    path = save_png(Image.new("RGB", (4, 4)), tmp_path / "w.png", None,
                    extra_text={"prompt": '{"3": {}}', "workflow": "{}"})
    with Image.open(path) as im:
        assert im.text == {"prompt": '{"3": {}}', "workflow": "{}"}


def test_ngms_is_written_only_when_on_and_parsed_back():
    assert "NGMS" not in format_parameters({**SETTINGS, "uncond_min_sigma": 0.0,
                                            "uncond_min_sigma_all_steps": True})
    text = format_parameters({**SETTINGS, "uncond_min_sigma": 2.5})
    assert text.endswith("NGMS: 2.5, Version: noisecraft 0.1.0") and "NGMS all steps" not in text
    back = parse_parameters(text)
    assert back["uncond_min_sigma"] == 2.5 and "uncond_min_sigma_all_steps" not in back
    text = format_parameters({**SETTINGS, "uncond_min_sigma": 1.0,
                              "uncond_min_sigma_all_steps": True})
    assert "NGMS: 1.0, NGMS all steps: True" in text
    back = parse_parameters(text)
    assert (back["uncond_min_sigma"], back["uncond_min_sigma_all_steps"]) == (1.0, True)
    assert back["extra"] == {"Version": "noisecraft 0.1.0"}


def test_a1111_ngms_text_becomes_a_request():
    from noisecraft.request import GenerationRequest

    text = "a cat\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512, NGMS: 3"
    request = GenerationRequest.from_settings(parse_parameters(text))
    assert (request.uncond_min_sigma, request.uncond_min_sigma_all_steps) == (3.0, False)
