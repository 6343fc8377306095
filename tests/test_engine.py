"""Engine: model cache (by file, bounded by memory), default model, cancel token, progress."""

from __future__ import annotations

import threading

import pytest
import torch

from noisecraft.engine import DEFAULT_MODEL_PATH, DefaultModelMissing, Engine, ModelNotFound
from noisecraft.request import CancelToken, GenerationRequest, InputError, Interrupted
from tests.pipelines.tiny import shared_bundle, tiny_bundle, tiny_engine


def test_files_are_loaded_once_and_evicted_least_recently_used(tmp_path):
    calls = []

    def loader(path, device, dtype):
        calls.append(path.name)
        return tiny_bundle("sd1", seed=len(calls))

    paths = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    for p in paths:
        p.write_bytes(b"x")
    one = Engine(loader=loader).model(paths[0])
    engine = Engine(loader=loader, max_cache_bytes=int(2.5 * _bytes(one)))
    calls.clear()
    a = engine.model(paths[0])
    assert engine.model(str(paths[0])) is a and calls == ["m0.safetensors"]
    engine.model(paths[1])
    engine.model(paths[0])  # m0 now most recently used
    engine.model(paths[2])  # over the bound: m1 goes
    assert [p.rsplit("/", 1)[1] for p in engine.cached_models] == ["m0.safetensors",
                                                                     "m2.safetensors"]
    assert engine.cache_bytes <= engine.max_cache_bytes
    paths[0].write_bytes(b"changed")  # new size/mtime: a different file, loaded again
    engine.model(paths[0])
    assert calls.count("m0.safetensors") == 2


def _bytes(bundle):
    from noisecraft.model_cache import bundle_bytes

    return bundle_bytes(bundle)


def test_missing_default_model_and_unknown_paths_are_clear_errors(tmp_path):
    engine = Engine()
    if not DEFAULT_MODEL_PATH.exists():
        with pytest.raises(DefaultModelMissing, match="not been trained and shipped yet"):
            engine.model(None)
    with pytest.raises(ModelNotFound, match="neither a registered model name"):
        engine.model(tmp_path / "nope.safetensors")


def test_unknown_sampler_or_scheduler_fail_before_loading():
    engine = Engine(loader=lambda *a: pytest.fail("must not load"))
    with pytest.raises(InputError, match="unknown sampler 'eulr'"):
        engine.generate(GenerationRequest("x", model="m.safetensors", sampler="eulr"))
    with pytest.raises(InputError, match="unknown scheduler"):
        engine.generate(GenerationRequest("x", model="m.safetensors", scheduler="nope"))


def test_progress_events_and_random_seed_reported():
    engine = tiny_engine("sd1")
    events = []
    result = engine.generate(GenerationRequest("x", model="sd1", steps=3),
                             callback=events.append)
    assert [(e.stage, e.step, e.total) for e in events] == [("sample", i, 3) for i in (1, 2, 3)]
    assert events[0].x0.shape == (1, 4, 8, 8) and events[0].sigma > events[-1].sigma
    assert isinstance(result.seed, int) and result.request.seed == result.seed
    assert result.images[0].settings["seed"] == result.seed
    again = engine.generate(GenerationRequest("x", model="sd1", steps=3, seed=result.seed))
    assert torch.equal(again.latents, result.latents)


def test_cancel_interrupts_between_steps_and_engine_stays_usable():
    engine = tiny_engine("sd1")
    token = CancelToken()
    seen = []

    def on_step(event):
        seen.append(event.step)
        if event.step == 2:
            token.cancel()

    with pytest.raises(Interrupted, match="after step 2 of 5") as info:
        engine.generate(GenerationRequest("x", model="sd1", steps=5, seed=1),
                        callback=on_step, cancel=token)
    assert seen == [1, 2] and info.value.step == 2
    ok = engine.generate(GenerationRequest("x", model="sd1", steps=2, seed=1))
    assert ok.latents.shape == (1, 4, 8, 8)


def test_cancel_from_another_thread_before_start():
    engine = tiny_engine("sd1")
    token = CancelToken()
    t = threading.Thread(target=token.cancel)
    t.start()
    t.join()
    with pytest.raises(Interrupted, match="after step 0"):
        engine.generate(GenerationRequest("x", model="sd1", steps=2), cancel=token)


def test_registered_models_are_pinned():
    engine = Engine(max_cache_bytes=1)
    engine.register("a", shared_bundle("sd1"))
    engine.register("b", shared_bundle("sd2"))
    assert engine.cached_models == ["a", "b"]
    assert engine.model("a") is shared_bundle("sd1")
