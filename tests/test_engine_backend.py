"""``Engine(backend=...)``: every request runs its U-Net, VAE and ControlNets behind the
engine's compute backend, wrapped once per model; on a tiny real-format SD1 checkpoint.

Tolerances.  fp32 ``onednn`` computes eager's arithmetic with another blocking: a whole
generation stays within relative L2 ``FP32_TOL`` = 1e-4 of eager in latents (measured ~5e-6)
and within 1/255 in every pixel (a value landing next to a rounding boundary may round the
other way).  bf16 (8 mantissa bits) is approximate: latents within relative L2
``BF16_TOL`` = 5e-2 of eager fp32 (measured 1.3e-2 on these random-weight models).
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from noisecraft.api import generate_image
from noisecraft.backends import AcceleratedModule, Backend, get_backend
from noisecraft.cli import app
from noisecraft.engine import Engine
from noisecraft.request import (
    CancelToken,
    ControlNetUnit,
    GenerationRequest,
    InputError,
    Interrupted,
)
from noisecraft.server.config import ConfigError, ServerConfig
from noisecraft.server.supervisor import worker_command
from tests.fixtures.checkpoints import tiny_spec, write_single_file
from tests.fixtures.controlnet import write_controlnet
from tests.fixtures.loras import write_kohya_lora
from tests.pipelines.tiny import shared_bundle

FP32_TOL, BF16_TOL = 1e-4, 5e-2
SETTINGS = dict(steps=3, seed=7, width=32, height=32, cfg_scale=5.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("backend")
    rng = np.random.default_rng(0)
    hint = root / "hint.png"
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), "RGB").save(hint)
    write_kohya_lora(root / "style.safetensors", "sd1", seed=3)
    return SimpleNamespace(
        ckpt=str(write_single_file(root / "tiny.safetensors", "sd1")),
        lora=str(root / "style.safetensors"),
        controlnet=str(write_controlnet(root / "cn.safetensors", tiny_spec("sd1").unet, 5)),
        hint=str(hint),
    )


@pytest.fixture(scope="module")
def engines():
    return {"eager": Engine(device="cpu", backend="eager"),
            "onednn": Engine(device="cpu", backend="onednn")}


@pytest.fixture
def wraps(monkeypatch):
    """(backend name, module class) of every ``Backend.wrap`` call (the real wrap runs)."""
    calls, original = [], Backend.wrap

    def spy(self, module):
        calls.append((self.name, type(module).__name__))
        return original(self, module)

    monkeypatch.setattr(Backend, "wrap", spy)
    return calls


@pytest.fixture
def ran(monkeypatch):
    """How often each wrapped module's source class ran through its wrapper."""
    counts, original = Counter(), AcceleratedModule.forward

    def spy(self, *args, **kwargs):
        counts[type(self.source).__name__] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AcceleratedModule, "forward", spy)
    return counts


def gen(engine, files, prompt="a red cat", **kw):
    kw = {**SETTINGS, **kw}
    return engine.generate(GenerationRequest(prompt, negative_prompt="ugly",
                                             model=kw.pop("model", files.ckpt), **kw))


def rel_l2(a, b) -> float:
    return ((a.latents - b.latents).norm() / b.latents.norm()).item()


def pixel_diff(a, b) -> int:
    return max(int(np.abs(np.asarray(x.image, dtype=int) - np.asarray(y.image, dtype=int)).max())
               for x, y in zip(a.images, b.images, strict=True))


def assert_fp32_close(fast, ref):
    assert rel_l2(fast, ref) <= FP32_TOL
    assert pixel_diff(fast, ref) <= 1


def test_onednn_generation_equals_eager_and_runs_the_wrapped_modules(files, engines, ran):
    ref = gen(engines["eager"], files)
    assert not ran  # plain eager: the modules as they are, no wrapper
    fast = gen(engines["onednn"], files)
    assert ran["UNetModel"] == SETTINGS["steps"] and ran["VAEDecode"] == 1  # CFG: one batch
    assert_fp32_close(fast, ref)


def test_modules_are_wrapped_once_across_requests_and_released_with_the_model(files, wraps):
    engine = Engine(device="cpu", backend="onednn")
    gen(engine, files, seed=1)
    first = list(wraps)
    assert first == [("onednn", "UNetModel"), ("onednn", "VAEDecode"), ("onednn", "VAEEncode")]
    gen(engine, files, "a blue dog", seed=2, width=40, height=24)
    assert wraps == first
    assert engine.wrapped_modules.nbytes > 0
    assert engine.cache_bytes >= engine.wrapped_modules.nbytes
    engine.clear()  # the model leaves the cache, and what the backend made of it too
    assert len(engine.wrapped_modules) == 0 and engine.cache_bytes == 0


def test_wrapped_forms_of_models_outside_the_cache_go_first_when_over_the_bound():
    from tests.pipelines.tiny import tiny_bundle

    a, b = tiny_bundle("sd1", seed=1), tiny_bundle("sd1", seed=2)  # e.g. a graph's LoRA copies
    engine = Engine(device="cpu", backend="onednn", max_cache_bytes=1)  # always over the bound
    engine.runnable(a)
    assert a.unet in engine.wrapped_modules and a.vae in engine.wrapped_modules  # in use: kept
    engine.runnable(b)
    assert a.unet not in engine.wrapped_modules and a.vae not in engine.wrapped_modules
    assert b.unet in engine.wrapped_modules and len(engine.wrapped_modules) == 2


def test_a_lora_request_runs_its_own_wrapped_copy(files, engines, wraps):
    base = gen(engines["onednn"], files)
    before = len(wraps)
    lora = gen(engines["onednn"], files, loras=[(files.lora, 0.8)])
    assert wraps[before:] == [("onednn", "UNetModel")]  # the merged copy; the VAE is shared
    assert rel_l2(lora, base) > 1e-2  # the LoRA matters: the base's wrapped U-Net would fail
    assert_fp32_close(lora, gen(engines["eager"], files, loras=[(files.lora, 0.8)]))
    again = gen(engines["onednn"], files, loras=[(files.lora, 0.8)])
    assert len(wraps) == before + 1 and torch.equal(again.latents, lora.latents)


def test_a_controlnet_request_keeps_its_residuals(files, engines, wraps, ran):
    unit = ControlNetUnit(files.controlnet, files.hint, 1.0)
    plain = gen(engines["onednn"], files)
    fast = gen(engines["onednn"], files, controlnets=(unit,))
    assert ("onednn", "ControlNet") in wraps and ran["ControlNet"] == SETTINGS["steps"]
    assert rel_l2(fast, plain) > 1e-2  # residuals reach the wrapped U-Net
    assert_fp32_close(fast, gen(engines["eager"], files, controlnets=(unit,)))


@pytest.mark.parametrize("model", ["sd1-inpaint", "sdxl"])
def test_inpainting_and_sdxl_models(model, ran):
    family, _, kind = model.partition("-")
    results = {}
    for name in ("eager", "onednn"):
        engine = Engine(device="cpu", backend=name)
        engine.register(model, shared_bundle(family, kind == "inpaint"))
        kw = {}
        if kind == "inpaint":  # 9-channel U-Net: the mask and masked image ride along
            rng = np.random.default_rng(1)  # not a flat image: GroupNorm of a constant
            # input divides rounding noise by a near-zero deviation, whatever the backend
            image = Image.fromarray(rng.integers(0, 256, (32, 32, 3), np.uint8), "RGB")
            mask = Image.fromarray(np.tri(32, dtype=np.uint8) * 255, "L")
            kw = dict(init_image=image, mask=mask, strength=1.0)
        results[name] = engine.generate(GenerationRequest(
            "a red cat", negative_prompt="ugly", model=model, steps=2, seed=4, width=32,
            height=32, **kw))
    assert ran["UNetModel"] == 2  # onednn only, 2 steps (SDXL: with its y vector)
    assert_fp32_close(results["onednn"], results["eager"])


@pytest.mark.parametrize("name", [pytest.param("compiled", marks=pytest.mark.slow), "openvino"])
def test_compiled_and_openvino_generations_equal_eager(name, files, engines, tmp_path):
    """torch.compile takes minutes here (a ``slow`` test); OpenVINO is an optional extra."""
    backend = name
    if name == "openvino":
        pytest.importorskip("openvino")
        backend = get_backend("openvino", cache_dir=tmp_path)
    engine = Engine(device="cpu", backend=backend)
    assert_fp32_close(gen(engine, files), gen(engines["eager"], files))


def test_bf16_backend_runs_bf16_and_is_close(files, engines):
    engine = Engine(device="cpu", backend=get_backend("onednn_bf16", bf16_native=True))
    unit = ControlNetUnit(files.controlnet, files.hint, 1.0)
    out = gen(engine, files, controlnets=(unit,))
    assert engine.backend.precision == "bf16"
    unet = engine.runnable(engine.model(files.ckpt)).unet
    assert next(unet.parameters()).dtype == torch.bfloat16
    ref = gen(engines["eager"], files, controlnets=(unit,))
    assert 0 < rel_l2(out, ref) < BF16_TOL


def test_the_preview_decoder_runs_wrapped(tmp_path, engines):
    from safetensors.torch import save_file

    from noisecraft.models.taesd import TAESD, TAESDConfig

    torch.manual_seed(0)
    src = TAESD(TAESDConfig(width=16))
    path = tmp_path / "taesd_decoder.safetensors"
    save_file({k[len("decoder."):]: v for k, v in src.state_dict().items()
               if k.startswith("decoder.")}, str(path))
    latents = torch.randn(1, 4, 6, 6)
    fast_decoder = engines["onednn"].preview_decoder(path)
    assert isinstance(fast_decoder.decoder, AcceleratedModule)
    fast = engines["onednn"].preview(None, latents, fast_decoder)[0]
    ref = engines["eager"].preview(None, latents, engines["eager"].preview_decoder(path))[0]
    assert np.abs(np.asarray(fast, dtype=int) - np.asarray(ref, dtype=int)).max() <= 1


def test_callbacks_and_cancel_under_a_backend(files, engines):
    engine = engines["onednn"]
    events = []
    result = engine.generate(GenerationRequest("a red cat", model=files.ckpt, steps=4, seed=1,
                                               width=32, height=32), callback=events.append)
    assert [e.step for e in events] == [1, 2, 3, 4]
    token = CancelToken()

    def cancel_at_two(event):
        if event.step == 2:
            token.cancel()

    with pytest.raises(Interrupted):
        engine.generate(GenerationRequest("a red cat", model=files.ckpt, steps=4, seed=1,
                                          width=32, height=32), callback=cancel_at_two,
                        cancel=token)
    again = engine.generate(GenerationRequest("a red cat", model=files.ckpt, steps=4, seed=1,
                                              width=32, height=32))
    assert torch.equal(again.latents, result.latents)


def test_backend_choice_and_errors(engines):
    assert Engine(device="cpu").backend.name == "onednn"  # the default: float32-exact
    assert Engine(device="cpu", dtype=torch.bfloat16).backend.name == "eager"
    with pytest.raises(ValueError, match="valid backends: eager, eager_bf16, onednn"):
        Engine(device="cpu", backend="nope")
    with pytest.raises(ValueError, match="runs on the CPU.*use backend 'eager'"):
        Engine(device="meta", backend="onednn")
    with pytest.raises(ValueError, match="takes float32 weights"):
        Engine(device="cpu", dtype=torch.bfloat16, backend="onednn")
    with pytest.raises(TypeError, match="backend name or a Backend"):
        Engine(device="cpu", backend=3)
    with pytest.raises(InputError, match="the engine passed runs 'eager'"):
        generate_image("x", engine=engines["eager"], backend="onednn")


def test_cli_generate_backend(files, tmp_path, wraps):
    args = ["generate", "a red cat", "-m", files.ckpt, "--steps", "2", "--seed", "3",
            "-W", "32", "-H", "32"]
    bad = CliRunner().invoke(app, [*args, "-o", str(tmp_path / "x.png"), "--backend", "nope"])
    assert bad.exit_code == 2
    assert "unknown backend 'nope'" in bad.output and "onednn" in bad.output
    for name in ("eager", "onednn"):
        out = CliRunner().invoke(app, [*args, "-o", str(tmp_path / f"{name}.png"),
                                       "--backend", name])
        assert out.exit_code == 0, out.output
    assert {w[0] for w in wraps} == {"onednn"}
    with Image.open(tmp_path / "eager.png") as a, Image.open(tmp_path / "onednn.png") as b:
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max()
    assert diff <= 1


def test_server_and_worker_backend_settings(tmp_path):
    with pytest.raises(ConfigError, match="--backend: unknown backend 'nope'; valid backends"):
        ServerConfig(compute_backend="nope").check()
    with pytest.raises(ConfigError, match="runs on the CPU"):
        ServerConfig(compute_backend="onednn", device="meta").check()
    config = ServerConfig(data_dir=tmp_path, compute_backend="eager").check()
    cmd = worker_command(config)
    assert cmd[cmd.index("--backend") + 1] == "eager"
    bad = CliRunner().invoke(app, ["worker", "--data-dir", str(tmp_path), "--backend", "nope"])
    assert bad.exit_code == 2 and "valid backends" in bad.output


def test_graph_sampler_runs_the_same_wrapped_modules(tmp_path, ran):
    from noisecraft.graph import run_workflow_result
    from tests.nodes.test_model_nodes_support import (
        PIXELS,
        SD1_NAME,
        make_context,
        registry,
        to_uint8,
        txt2img_prompt,
        write_models,
    )

    models = write_models(tmp_path / "models")
    engine = Engine(device="cpu", backend="onednn")
    context = make_context(models, tmp_path, engine)
    run = run_workflow_result(txt2img_prompt(seed=42, steps=2), registry=registry(),
                              context=context)
    assert ran["UNetModel"] == 2 and ran["VAEDecode"] == 1
    ref = generate_image("a red cat", negative_prompt="ugly", steps=2, cfg_scale=7.5, seed=42,
                         sampler="euler_ancestral", width=PIXELS, height=PIXELS,
                         model=str(models / "checkpoints" / SD1_NAME), engine=engine)
    np.testing.assert_array_equal(to_uint8(run.values["8"][0])[0], np.asarray(ref))
