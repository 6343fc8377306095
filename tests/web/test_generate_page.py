"""The generation page (/) in headless Chromium against a real server: generate with
Ctrl+Enter (progress advances, the image and its settings appear, "reuse" restores them),
inpaint half an image (the other half is kept), and a narrow phone-width layout; no console
errors or failed requests on the way."""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.web.browser import ARTIFACTS, screenshot

pytestmark = pytest.mark.timeout(600)

WATCH_STEPS = """() => {
  window.__steps = [];
  new MutationObserver(() => window.__steps.push(
      document.getElementById('progress_text').textContent))
    .observe(document.getElementById('progress_text'), {childList: true, characterData: true,
                                                        subtree: true});
}"""


def open_page(browser, server, **viewport):
    page, watch = browser.page(**viewport)
    page.goto(server.url + "/")
    page.wait_for_function("document.querySelectorAll('#model option').length > 1")
    return page, watch


def test_generate_shows_progress_image_settings_and_reuse(server, browser):
    page, watch = open_page(browser, server)
    assert page.locator("#model").input_value() == "tiny.safetensors"
    page.fill("#prompt", "a red circle")
    page.fill("#negative_prompt", "blurry")
    page.select_option("#size_preset", "64x64")
    page.fill("#steps", "4")
    page.fill("#seed", "1234")
    page.select_option("#sampler", "euler_ancestral")
    page.evaluate(WATCH_STEPS)
    page.focus("#prompt")
    page.keyboard.press("Control+Enter")
    card = page.locator(".card").first
    card.wait_for(timeout=300_000)
    steps = page.evaluate("window.__steps")
    assert any("step 1/4" in s for s in steps), steps  # progress advanced step by step
    assert any("step 4/4" in s for s in steps), steps
    assert page.locator("#preview").is_visible()  # a step preview arrived over /ws
    assert page.evaluate("document.querySelector('.card img').naturalWidth") == 64
    shown = {k: card.locator(f"dd[data-key={k}]").text_content()
             for k in ("prompt", "negative_prompt", "seed", "steps", "sampler", "size")}
    assert shown == {"prompt": "a red circle", "negative_prompt": "blurry", "seed": "1234",
                     "steps": "4", "sampler": "euler_ancestral", "size": "64x64"}
    screenshot(page, "generate_1280", keep=True)

    page.fill("#prompt", "something else")
    page.fill("#steps", "30")
    page.fill("#seed", "-1")
    page.select_option("#sampler", "euler")
    card.get_by_role("button", name="Reuse settings").click()
    assert page.locator("#prompt").input_value() == "a red circle"
    assert page.locator("#steps").input_value() == "4"
    assert page.locator("#seed").input_value() == "1234"
    assert page.locator("#sampler").input_value() == "euler_ancestral"
    with page.expect_download() as download:
        card.get_by_role("link", name="Download").click()
    assert download.value.suggested_filename.endswith(".png")
    assert watch.problems() == []
    page.close()


def test_server_errors_are_shown_in_words(server, browser):
    page, watch = open_page(browser, server)
    page.fill("#prompt", "x")
    page.fill("#width", "100")  # not a multiple of 8: the server explains
    page.click("#generate")
    error = page.locator("#error")
    error.wait_for()
    assert "multiple of 8" in error.text_content() and "96 or 104" in error.text_content()
    # the refused request itself is the one failed request expected here
    assert watch.problems(allow=("/api/generate: HTTP 400", "status of 400")) == []
    page.close()


def two_halves(size=64) -> bytes:
    rng = np.random.default_rng(0)
    pixels = np.zeros((size, size, 3), np.uint8)
    pixels[:, : size // 2] = rng.integers(0, 256, (size, size // 2, 3))  # textured left half
    pixels[:, size // 2:] = (30, 60, 200)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_inpaint_keeps_the_unmasked_half(server, browser, tmp_path):
    page, watch = open_page(browser, server)
    source = tmp_path / "halves.png"
    source.write_bytes(two_halves())
    page.check("input[name=mode][value=inpaint]")
    page.set_input_files("#init_file", str(source))
    page.wait_for_function("document.getElementById('mask_canvas').width === 64")
    page.fill("#prompt", "a green square")
    page.fill("#steps", "3")
    page.fill("#seed", "7")
    page.fill("#strength", "1")
    page.evaluate("document.getElementById('brush').value = 32;"
                  "document.getElementById('brush').dispatchEvent(new Event('input'))")
    box = page.locator("#mask_canvas").bounding_box()
    scale = box["width"] / 64
    x = box["x"] + 48 * scale  # a 32-px brush centred at x=48 covers the right half
    page.mouse.move(x, box["y"] + 1)
    page.mouse.down()
    for y in range(0, 65, 4):
        page.mouse.move(x, box["y"] + y * scale)
    page.mouse.up()
    coverage = page.evaluate("""() => {
      const c = document.getElementById('mask_canvas');
      const d = c.getContext('2d').getImageData(0, 0, 64, 64).data;
      let left = 0, right = 0;
      for (let i = 0; i < 64 * 64; i++) {
        const on = d[i * 4 + 3] > 127 ? 1 : 0;
        if (i % 64 < 32) left += on; else right += on;
      }
      return [left / 2048, right / 2048];
    }""")
    assert coverage[0] == 0 and coverage[1] > 0.95, coverage
    screenshot(page, "inpaint_mask", keep=True)
    page.click("#generate")
    page.locator(".card").first.wait_for(timeout=300_000)
    url = page.evaluate("document.querySelector('.card img').src")
    result = np.asarray(Image.open(io.BytesIO(httpx.get(url).content)).convert("RGB"),
                        np.int16)
    original = np.asarray(Image.open(source).convert("RGB"), np.int16)
    assert result.shape == original.shape
    # Tolerance: the mask is blurred by 4 px (mask_blur) before the paste-back, so columns
    # within 12 px of the mask's edge (x >= 20) may blend; further left, pixels are the
    # original's up to 8-bit rounding.
    kept = np.abs(result[:, :20] - original[:, :20])
    assert kept.max() <= 2, kept.max()
    changed = np.abs(result[:, 40:] - original[:, 40:]).mean()
    assert changed > 10, changed  # the masked half was repainted
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    Image.fromarray(result.astype(np.uint8)).save(ARTIFACTS / "inpaint_result.png")
    assert watch.problems() == []
    page.close()


def test_phone_width_layout(server, browser):
    page, watch = open_page(browser, server, width=375, height=740)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= 375, f"the page scrolls sideways at 375 px ({width} px wide)"
    gen = page.locator("#generate").bounding_box()
    assert gen["x"] >= 0 and gen["x"] + gen["width"] <= 375
    screenshot(page, "generate_375", keep=True)
    assert watch.problems() == []
    page.close()
