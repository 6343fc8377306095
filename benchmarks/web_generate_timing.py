"""Generation page (/) timings as a user sees them: click Generate -> first step preview shown,
and -> final image shown, with the built-in default model.

    python benchmarks/web_generate_timing.py                      # default model, 128 px, 20 steps
    python benchmarks/web_generate_timing.py --runs 5 --steps 30
    python benchmarks/web_generate_timing.py --url http://127.0.0.1:8188   # a running server

Without ``--url`` it starts a real ``noisecraft serve`` (``tests/server/harness.py``) on an empty
data folder, so the only checkpoint is the built-in default model, with one worker of
``--threads`` torch threads.  Headless Debian Chromium (``/usr/bin/chromium``, as the web tests)
drives the page: the size, steps and seed are filled in, Generate is clicked, and the page
itself stamps (``performance.now()``) the click, the first progress text ``step 1/N``, the
first step preview drawn (``#preview`` load event), and the result card's image loaded.

The first run includes the worker loading the model (cold); the rest are warm, and their
median is reported too.  Prints one line per run and a summary; ``--json`` also writes them
with the machine's load average (read it: on a machine busy with other jobs every figure is
slower and noisier than on a quiet one).  The started server inherits this script's
niceness: under ``nice`` on a machine whose cores are taken by other work at normal priority,
the worker gets a small share of the CPU and the times measure that share, not the code.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from noisecraft.models_folder import DEFAULT_CHECKPOINT_NAME  # noqa: E402
from tests.server.harness import Server  # noqa: E402
from tests.web.browser import ARGS, CHROMIUM  # noqa: E402

# Page-side stamps, in ms since the click (performance.now() of the page).
STAMP = """() => {
  const t = { click: null, step1: null, preview: null, final: null };
  window.__timing = t;
  const since = () => performance.now() - t.click;
  document.getElementById('generate').addEventListener('click', () => {
    t.click = performance.now();
  }, { capture: true });
  document.getElementById('preview').addEventListener('load', () => {
    if (t.click !== null && t.preview === null) t.preview = since();
  });
  new MutationObserver(() => {
    if (t.click !== null && t.step1 === null &&
        /step 1\\//.test(document.getElementById('progress_text').textContent)) {
      t.step1 = since();
    }
  }).observe(document.getElementById('progress_text'),
             { childList: true, characterData: true, subtree: true });
  new MutationObserver((records) => {
    for (const r of records) for (const node of r.addedNodes) {
      const img = node.querySelector?.('img');
      if (!img || t.click === null || t.final !== null) continue;
      const done = () => { if (t.final === null) t.final = since(); };
      if (img.complete && img.naturalWidth) done(); else img.addEventListener('load', done);
    }
  }).observe(document.getElementById('gallery'), { childList: true });
}"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="a running noisecraft server (default: start one)")
    p.add_argument("--runs", type=int, default=3, help="generations (the first is cold)")
    p.add_argument("--size", type=int, default=128, help="width and height (multiple of 8)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="torch threads of the started server's worker")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds per generation")
    p.add_argument("--json", type=Path, help="also write the results here")
    return p.parse_args(argv)


def one_run(page, args, seed: int) -> dict:
    page.reload()
    page.wait_for_function("document.querySelectorAll('#model option').length > 0")
    models = page.evaluate("[...document.querySelectorAll('#model option')].map(o => o.value)")
    if DEFAULT_CHECKPOINT_NAME in models:
        page.select_option("#model", DEFAULT_CHECKPOINT_NAME)
    page.fill("#prompt", "a red circle on a blue background")
    page.select_option("#size_preset", "custom")
    page.fill("#width", str(args.size))
    page.fill("#height", str(args.size))
    page.fill("#steps", str(args.steps))
    page.fill("#seed", str(seed))
    page.evaluate(STAMP)
    page.click("#generate")
    page.wait_for_function("window.__timing.final !== null", timeout=args.timeout * 1000)
    t = page.evaluate("window.__timing")
    model = page.locator("#model").input_value() or "(the built-in default model)"
    return {"model": model, "seed": seed,
            **{k: t[k] / 1000 for k in ("step1", "preview", "final")}}


def run(args, url: str) -> list[dict]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(url + "/")
            results = []
            for i in range(args.runs):
                r = one_run(page, args, seed=i)
                r["cold"] = i == 0
                print(f"run {i + 1}{' (cold)' if i == 0 else ''}: first step text "
                      f"{r['step1']:.2f} s, first preview {r['preview']:.2f} s, final image "
                      f"{r['final']:.2f} s  [{r['model']}]", flush=True)
                results.append(r)
            return results
        finally:
            browser.close()


def main(argv=None) -> None:
    args = parse_args(argv)
    before = os.getloadavg()
    print(f"load average before: {before[0]:.2f} {before[1]:.2f} {before[2]:.2f}; "
          f"{args.size}x{args.size}, {args.steps} steps", flush=True)
    if args.url:
        results = run(args, args.url.rstrip("/"))
    else:
        with tempfile.TemporaryDirectory(prefix="noisecraft-webtiming-") as tmp, \
                Server(Path(tmp) / "data", lease=30.0,
                       env={"OMP_NUM_THREADS": str(args.threads)}) as server:
            results = run(args, server.url)
    after = os.getloadavg()
    warm = results[1:]
    if warm:
        print(f"warm median ({len(warm)} runs): first preview "
              f"{statistics.median(r['preview'] for r in warm):.2f} s, final image "
              f"{statistics.median(r['final'] for r in warm):.2f} s")
    print(f"load average after: {after[0]:.2f} {after[1]:.2f} {after[2]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(
            {"settings": {k: v for k, v in vars(args).items() if k != "json"},
             "loadavg_before": before, "loadavg_after": after, "at": time.time(),
             "runs": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
