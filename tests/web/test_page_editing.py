"""The generation page's other paths in headless Chromium against a real server: img2img and
outpaint from a loaded image, a batch count of 2 (seeds s and s+1), and dropping an
AUTOMATIC1111 PNG onto the page to load its settings; the learning view's CFG x steps grid.
No console errors or failed requests on the way."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from tests.web.browser import screenshot
from tests.web.test_generate_page import open_page, two_halves

pytestmark = pytest.mark.timeout(600)

CARD_IMAGES = "() => [...document.querySelectorAll('.card img')].map((i) => i.src)"


def _fetch(url: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(httpx.get(url).content)).convert("RGB"), np.int16)


def _settings(page, n: int) -> list[dict[str, str]]:
    """The settings shown on the newest ``n`` cards, newest first."""
    return page.evaluate(f"""() => [...document.querySelectorAll('.card')].slice(0, {n})
      .map((c) => Object.fromEntries([...c.querySelectorAll('dd')]
        .map((d) => [d.dataset.key, d.textContent])))""")


def _wait_cards(page, n: int) -> None:
    page.wait_for_function(f"document.querySelectorAll('.card').length >= {n} || "
                           "!document.getElementById('error').hidden", timeout=300_000)
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()


def test_img2img_and_outpaint_from_a_loaded_image(server, browser, tmp_path):
    page, watch = open_page(browser, server)
    source = tmp_path / "halves.png"
    source.write_bytes(two_halves())
    original = np.asarray(Image.open(source).convert("RGB"), np.int16)
    page.fill("#prompt", "a green square")
    page.fill("#steps", "3")
    page.fill("#seed", "11")

    page.check("input[name=mode][value=img2img]")
    page.set_input_files("#init_file", str(source))
    page.wait_for_function("document.getElementById('init_canvas').width === 64")
    page.evaluate("document.getElementById('strength').value = 0.5")
    page.click("#generate")
    _wait_cards(page, 1)
    (shown,) = _settings(page, 1)
    assert shown["size"] == "64x64" and shown["strength"] == "0.5", shown
    img2img = _fetch(page.evaluate(CARD_IMAGES)[0])
    assert img2img.shape == original.shape
    assert np.abs(img2img - original).mean() > 1  # repainted, at strength 0.5

    page.check("input[name=mode][value=outpaint]")
    page.fill("#out_right", "32")
    page.dispatch_event("#out_right", "change")
    page.click("#generate")
    _wait_cards(page, 2)
    out = _fetch(page.evaluate(CARD_IMAGES)[0])
    assert out.shape == (64, 96, 3), out.shape  # the canvas grew by 32 px on the right
    # the old canvas is kept away from the seam (mask blur 4 px + 8 px of overlap blending)
    kept = np.abs(out[:, :20] - original[:, :20])
    assert kept.max() <= 2, kept.max()
    screenshot(page, "outpaint_1280", keep=True)
    assert watch.problems() == []
    page.close()


def test_batch_count_two_runs_seeds_s_and_s_plus_1(server, browser):
    page, watch = open_page(browser, server)
    before = page.evaluate("document.querySelectorAll('.card').length")
    page.fill("#prompt", "a blue triangle")
    page.select_option("#size_preset", "64x64")
    page.fill("#steps", "2")
    page.fill("#seed", "500")
    page.fill("#batch_count", "2")
    page.click("#generate")
    _wait_cards(page, before + 2)
    page.wait_for_function("document.getElementById('progress_text').textContent === 'done'")
    newest, older = _settings(page, 2)
    assert (older["seed"], newest["seed"]) == ("500", "501")
    a, b = (_fetch(u) for u in page.evaluate(CARD_IMAGES)[:2])
    assert not np.array_equal(a, b)
    assert watch.problems() == []
    page.close()


def a1111_png() -> bytes:
    info = PngInfo()
    info.add_text("parameters", "a purple circle, (masterpiece:1.2)\nNegative prompt: ugly\n"
                  "Steps: 13, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 5.5, "
                  "Seed: 4242, Size: 64x64, Model: something")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (40, 40, 40)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _drop(page, data: bytes, name: str, mime: str) -> None:
    """Dispatch a real drop event on the page body carrying ``data`` as a File."""
    page.evaluate("""([b64, name, mime]) => {
      const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
      const dt = new DataTransfer();
      dt.items.add(new File([bytes], name, { type: mime }));
      for (const type of ['dragenter', 'dragover', 'drop']) {
        document.querySelector('.results').dispatchEvent(
          new DragEvent(type, { dataTransfer: dt, bubbles: true, cancelable: true }));
      }
    }""", [base64.b64encode(data).decode(), name, mime])


def test_dropping_an_a1111_png_loads_its_settings(server, browser):
    page, watch = open_page(browser, server)
    _drop(page, a1111_png(), "from_a1111.png", "image/png")
    page.wait_for_function("document.getElementById('prompt').value !== ''")
    assert page.locator("#prompt").input_value() == "a purple circle, (masterpiece:1.2)"
    assert page.locator("#negative_prompt").input_value() == "ugly"
    assert page.locator("#steps").input_value() == "13"
    assert page.locator("#cfg_scale").input_value() == "5.5"
    assert page.locator("#seed").input_value() == "4242"
    assert page.locator("#sampler").input_value() == "dpmpp_2m"
    assert page.locator("#scheduler").input_value() == "karras"
    assert (page.locator("#width").input_value(), page.locator("#height").input_value()) == \
        ("64", "64")
    assert page.locator("#drop_overlay").is_hidden()

    _drop(page, b"just text", "notes.txt", "text/plain")  # not an image: said in words
    page.locator("#error").wait_for()
    assert "notes.txt" in page.locator("#error").text_content()
    assert watch.problems() == []
    page.close()


def test_learn_grid_shows_one_image_per_cfg_and_step_count(server, browser):
    page, watch = browser.page()
    page.goto(server.url + "/learn")
    page.wait_for_function("document.getElementById('fw_caption').textContent.includes('t = 0')")
    page.fill("#grid_cfg", "1, 6")
    page.fill("#grid_steps", "1, 3")
    page.click("#grid_run")
    page.wait_for_function("document.querySelectorAll('#grid img').length >= 4 || "
                           "!document.getElementById('error').hidden", timeout=300_000)
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
    page.wait_for_function("[...document.querySelectorAll('#grid img')]"
                           ".every((i) => i.complete && i.naturalWidth > 0)")
    srcs = page.evaluate("[...document.querySelectorAll('#grid img')].map((i) => i.src)")
    assert len(srcs) == 4
    images = [_fetch(s) for s in srcs]  # four settings, four different pictures
    assert len({i.tobytes() for i in images}) == 4
    labels = page.locator("#grid").text_content()
    assert "CFG 1" in labels and "CFG 6" in labels, labels
    screenshot(page, "learn_grid", keep=True)
    assert watch.problems() == []
    page.close()
