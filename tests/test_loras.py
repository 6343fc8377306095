"""LoRAs of a generation request (``loras`` entries and ``<lora:NAME:W>`` prompt tags) through
the engine, ``generate_image`` and ``noisecraft generate``: a tiny real-format SD1 checkpoint
and kohya / PEFT LoRA files from the test fixtures."""

from __future__ import annotations

import hashlib
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from noisecraft.api import generate_image
from noisecraft.cli import app
from noisecraft.engine import Engine
from noisecraft.metadata import format_parameters, parse_parameters
from noisecraft.request import GenerationRequest, InputError
from tests.fixtures.checkpoints import write_single_file
from tests.fixtures.loras import write_kohya_lora, write_peft_lora

SETTINGS = dict(steps=2, seed=5, width=32, height=32)
FLAGS = ("--steps", 2, "--seed", 5, "-W", 32, "-H", 32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("loras")
    loras = root / "loras"
    (loras / "sub").mkdir(parents=True)
    ckpt = write_single_file(root / "tiny.safetensors", "sd1")
    write_kohya_lora(loras / "style.safetensors", "sd1", seed=3)
    write_peft_lora(loras / "sub" / "detail.safetensors", "sd1", seed=4)
    return SimpleNamespace(ckpt=str(ckpt), dir=str(loras), style=str(loras / "style.safetensors"),
                           detail=str(loras / "sub" / "detail.safetensors"))


@pytest.fixture(scope="module")
def engine(files):
    return Engine(device="cpu")


def gen(files, engine, prompt="a red circle", **kw):
    return engine.generate(GenerationRequest(prompt, model=files.ckpt, **SETTINGS, **kw))


def test_a_lora_changes_the_image_and_weight_zero_is_the_base(files, engine):
    base = gen(files, engine).latents
    lora = gen(files, engine, loras=[(files.style, 0.8)]).latents
    assert (lora - base).abs().max() > 1e-2
    assert torch.equal(gen(files, engine, loras=[(files.style, 0.0)]).latents, base)
    zero_tag = gen(files, engine, "a red circle <lora:style:0>", loras_dir=files.dir)
    assert torch.equal(zero_tag.latents, base)


def test_a_prompt_tag_equals_the_entry_with_the_tag_free_prompt(files, engine):
    tagged = gen(files, engine, "a red circle <lora:style:0.5>", loras_dir=files.dir)
    entry = gen(files, engine, loras=[(files.style, 0.5)])
    assert torch.equal(tagged.latents, entry.latents)
    summed = gen(files, engine, "a red circle <lora:style:0.25>", loras_dir=files.dir,
                 negative_prompt="<lora:style.safetensors:0.125>", loras=[("style", 0.125)])
    assert torch.equal(summed.latents, entry.latents)  # one file's weights add up
    for name in ("sub/detail", "detail"):
        by_name = gen(files, engine, f"a red circle <lora:{name}:0.5>", loras_dir=files.dir)
        assert torch.equal(by_name.latents,
                           gen(files, engine, loras=[(files.detail, 0.5)]).latents)


def test_text_encoder_and_unet_weights_apart(files, engine):
    unet_only = gen(files, engine, "a red circle <lora:style:0:1>", loras_dir=files.dir)
    assert torch.equal(unet_only.latents,
                       gen(files, engine, loras=[(files.style, 1.0, 0.0)]).latents)
    for other in (gen(files, engine), gen(files, engine, loras=[(files.style, 1.0)])):
        assert not torch.equal(unet_only.latents, other.latents)


def test_a_request_without_loras_after_one_with_is_the_base(files):
    engine = Engine(device="cpu")
    base = gen(files, engine).latents
    model = engine.model(files.ckpt)
    before = {k: v.clone() for m in (model.unet, model.text_encoder)
              for k, v in m.state_dict().items()}
    first = gen(files, engine, loras=[(files.style, 1.0)]).latents
    again = gen(files, engine, loras=[(files.style, 1.0)]).latents
    assert torch.equal(first, again) and not torch.equal(first, base)
    assert torch.equal(gen(files, engine).latents, base)
    after = {k: v for m in (model.unet, model.text_encoder) for k, v in m.state_dict().items()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert engine.cached_models == [files.ckpt]
    assert engine.cached_loras == [(files.ckpt, ((files.style, 1.0, 1.0),))]


def test_unknown_names_and_a_missing_loras_dir_are_clear(files, engine):
    with pytest.raises(InputError, match=r"prompt tag <lora:nope:1> names LoRA 'nope', which "
                                         r"is not in .*; available: style, sub/detail"):
        gen(files, engine, "a cat <lora:nope:1>", loras_dir=files.dir)
    with pytest.raises(InputError, match=r"negative prompt tag <lora:style> names LoRA "
                                         r"'style', but loras_dir is not set"):
        gen(files, engine, "a cat", negative_prompt="<lora:style>")
    with pytest.raises(InputError, match="'style.safetensors' is not a file, and loras_dir is "
                                         "not set"):
        gen(files, engine, loras=["style.safetensors"])
    with pytest.raises(InputError, match="loras_dir '/nonexistent' does not exist"):
        gen(files, engine, "<lora:style>", loras_dir="/nonexistent")


def test_errors_come_before_the_model_loads(files):
    engine = Engine(loader=lambda *a: pytest.fail("must not load the model"))
    with pytest.raises(InputError, match=r"'abc' in <lora:style:abc> is not a finite number"):
        engine.generate(GenerationRequest("<lora:style:abc>", model=files.ckpt,
                                          loras_dir=files.dir))
    with pytest.raises(InputError, match="which is not in"):
        engine.generate(GenerationRequest("<lora:nope>", model=files.ckpt, loras_dir=files.dir))


@pytest.mark.parametrize("loras, message", [
    ([("style", "0.5")], "a weight must be a finite number, got '0.5'"),
    ([("style", float("nan"))], "a weight must be a finite number, got nan"),
    ([("style", True)], "a weight must be a finite number, got True"),
    ([("style", 1.0, 0.5, 2.0)], r"each loras entry must be a path or name, \(path, weight\)"),
    ([("", 1.0)], "the first item must be a non-empty path or name"),
    ("style.safetensors", "loras must be a list of entries"),
])
def test_bad_entries_are_refused_by_the_request(loras, message):
    with pytest.raises(InputError, match=message):
        GenerationRequest("x", loras=loras)


def addnet_hash(path) -> str:
    """kohya's / A1111's LoRA hash: SHA-256 of a safetensors file after its header."""
    data = open(path, "rb").read()
    (n,) = struct.unpack("<Q", data[:8])
    return hashlib.sha256(data[8 + n:]).hexdigest()[:12]


def test_metadata_keeps_the_tag_and_records_lora_hashes(files, engine):
    result = gen(files, engine, "a red circle <lora:style:0.5>", loras_dir=files.dir)
    settings = result.images[0].settings
    want = addnet_hash(files.style)
    assert settings["lora_hashes"] == {"style": want}
    text = format_parameters(settings)
    assert text.startswith("a red circle <lora:style:0.5>\n")
    assert f'Lora hashes: "style: {want}"' in text
    assert parse_parameters(text)["extra"]["Lora hashes"] == f"style: {want}"
    again = engine.generate(GenerationRequest.from_settings(settings))  # generate --from
    assert torch.equal(again.latents, result.latents)
    entry = gen(files, engine, loras=[(files.detail, 0.3)]).images[0].settings
    assert entry["lora_hashes"] == {"detail": addnet_hash(files.detail)}
    assert entry["loras"] == [[files.detail, 0.3, 0.3]]


def test_generate_image_takes_loras_and_loras_dir(files, engine):
    image = generate_image("a red circle <lora:style:0.5>", model=files.ckpt, engine=engine,
                           loras=[(files.detail, 0.3)], loras_dir=files.dir, **SETTINGS)
    want = gen(files, engine, loras=[(files.detail, 0.3), (files.style, 0.5)])
    np.testing.assert_array_equal(np.asarray(image), np.asarray(want.pil_images[0]))
    assert "Lora hashes: " in image.info["parameters"]


def run(engine, *args):
    return CliRunner().invoke(app, ["generate", *map(str, args)], obj={"engine": engine})


def pixels(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_cli_lora_and_loras_dir(files, engine, tmp_path):
    out = tmp_path / "a.png"
    r = run(engine, "a red circle <lora:style:0.5>", "-m", files.ckpt, *FLAGS,
            "--lora", f"{files.detail}:0.3", "--lora", "sub/detail", "--loras-dir", files.dir,
            "-o", out)
    assert r.exit_code == 0, r.output
    want = generate_image("a red circle <lora:style:0.5>", model=files.ckpt, engine=engine,
                          loras=[(files.detail, 0.3), ("sub/detail", 1.0)],
                          loras_dir=files.dir, **SETTINGS)
    np.testing.assert_array_equal(pixels(out), np.asarray(want))
    plain = generate_image("a red circle", model=files.ckpt, engine=engine, **SETTINGS)
    assert not np.array_equal(pixels(out), np.asarray(plain))


@pytest.mark.parametrize("args, message", [
    (("--lora", "style.safetensors:strong"), "--lora takes PATH[:WEIGHT]"),
    (("--lora", "style"), "'style' is not a file, and loras_dir is not set"),
    (("--loras-dir", "LORAS", "--lora", "nope:0.5"), "available: style, sub/detail"),
])
def test_cli_bad_lora_input_exits_2(files, engine, tmp_path, args, message):
    args = [files.dir if a == "LORAS" else a for a in args]
    r = run(engine, "a red circle", "-m", files.ckpt, *FLAGS, *args, "-o", tmp_path / "x.png")
    assert r.exit_code == 2, r.output
    assert message in r.output and not (tmp_path / "x.png").exists()
