"""One contender in its own process: ``python benchmarks/worker.py '<spec json>'``.

Loads the weights, wraps the module with the requested backend, times the first call
(compilation / conversion included), the warm-up and the timed runs, saves the output for the
error comparison, and prints one JSON line.  Run by ``benchmarks/run.py``; each contender in a
fresh process so that its peak RSS is its own.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import workloads as W  # noqa: E402
from noisecraft.backends import get_backend  # noqa: E402

SUITE_MODEL = {"unet": "sd15_unet", "sdxl_unet": "sdxl_unet", "vae_decode": "sd_vae",
               "vae_encode": "sd_vae", "text": "clip_l"}


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _wrap(spec: dict, module: torch.nn.Module, cache_tag: str):
    if spec["impl"] == "diffusers":
        return module
    options = dict(spec.get("options", {}))
    if spec["backend"].startswith("openvino"):
        options.setdefault("cache_dir", str(Path(spec["tmp"]) / f"ov-{spec['label']}"))
        options.setdefault("weights_hash", f"{spec['weights'][cache_tag]}")
    return get_backend(spec["backend"], **spec.get("knobs", {}), **options).wrap(module)


def _kernel_call(spec: dict, sizes: W.Sizes):
    """(call, precision) for the single-module suites."""
    suite, model = spec["suite"], SUITE_MODEL[spec["suite"]]
    path = Path(spec["weights"][model])
    diffusers = spec["impl"] == "diffusers"
    if suite in ("unet", "sdxl_unet"):
        module = W.DiffusersUNetCall(W.load_diffusers(model, path)) if diffusers \
            else W.load_ours(model, path)
        args = W.unet_inputs(sizes, sdxl=suite == "sdxl_unet")
    elif suite == "vae_decode":
        vae = W.load_diffusers(model, path) if diffusers else W.load_ours(model, path)
        from noisecraft.backends import VAEDecode

        module = W.DiffusersVAEDecode(vae) if diffusers else VAEDecode(vae)
        args = (W.latent_input(sizes),)
    elif suite == "vae_encode":
        vae = W.load_diffusers(model, path) if diffusers else W.load_ours(model, path)
        from noisecraft.backends import VAEEncode

        module = W.DiffusersVAEEncode(vae) if diffusers else VAEEncode(vae)
        args = (W.image_input(sizes),)
    elif suite == "text":
        encoder = W.load_ours(model, path)
        module = W.TextHidden(encoder)
        args = (W.token_ids(encoder),)
    else:
        raise ValueError(f"unknown suite {suite!r}")
    fast = _wrap(spec, module, model)
    return (lambda: fast(*args)), getattr(fast, "precision", "fp32")


def _txt2img_call(spec: dict, sizes: W.Sizes):
    """Text encode -> ``steps`` Euler steps with CFG -> VAE decode, composed from the pieces."""
    from noisecraft.backends import VAEDecode
    from noisecraft.diffusion import Denoiser
    from noisecraft.guidance import cfg_denoiser
    from noisecraft.models.family import FAMILIES
    from noisecraft.samplers import sample
    from noisecraft.schedules import normal_sigmas

    w = spec["weights"]
    family = FAMILIES["sd1"]
    encoder = W.load_ours("clip_l", Path(w["clip_l"]))
    if spec["impl"] == "diffusers":
        unet = W.DiffusersUNetCall(W.load_diffusers("sd15_unet", Path(w["sd15_unet"])))
        decode = W.DiffusersVAEDecode(W.load_diffusers("sd_vae", Path(w["sd_vae"])))
    else:
        unet = _wrap(spec, W.load_ours("sd15_unet", Path(w["sd15_unet"])), "sd15_unet")
        decode = _wrap(spec, VAEDecode(W.load_ours("sd_vae", Path(w["sd_vae"]))), "sd_vae")
    schedule = family.schedule()
    sigmas = normal_sigmas(schedule, sizes.steps).float()
    ids = W.token_ids(encoder)

    def run():
        with torch.inference_mode():
            ctx = encoder(ids)[0]
            denoiser = cfg_denoiser(Denoiser(unet, schedule), {"context": ctx[:1]},
                                    {"context": ctx[1:]}, sizes.cfg)
            g = torch.Generator().manual_seed(W.SEED + 4)
            x = torch.randn(1, 4, sizes.latent, sizes.latent, generator=g) * sigmas[0]
            latent = sample("euler", denoiser, x, sigmas)
            return decode(family.latent.process_out(latent)).clamp(-1, 1)

    return run, getattr(unet, "precision", "fp32")


def run(spec: dict) -> dict:
    torch.manual_seed(W.SEED)
    sizes = W.Sizes(**spec["sizes"])
    t0 = time.perf_counter()
    maker = _txt2img_call if spec["suite"] == "txt2img" else _kernel_call
    call, precision = maker(spec, sizes)
    load_s = time.perf_counter() - t0
    rss_loaded = _rss_mb()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = call()
        first = time.perf_counter() - t0
        for _ in range(max(spec["warmup"] - 1, 0)):
            call()
        times = []
        for _ in range(spec["runs"]):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    torch.save(out.detach().float().contiguous(), spec["out"])
    return {
        "label": spec["label"], "suite": spec["suite"], "impl": spec["impl"],
        "backend": spec.get("backend"), "knobs": spec.get("knobs", {}),
        "options": spec.get("options", {}), "precision": precision,
        "median_s": statistics.median(times), "times_s": times, "first_call_s": first,
        "load_and_wrap_s": load_s, "rss_after_load_mb": rss_loaded,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    print("RESULT " + json.dumps(run(json.loads(sys.argv[1]))), flush=True)
