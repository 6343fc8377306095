"""The learning view (/learn) in headless Chromium: forward-process frames follow the t
slider with alpha_bar and SNR from the server's schedule, the schedule plot is drawn, and a
recorded generation plays back one x0 estimate per step; no console errors or failed
requests."""

from __future__ import annotations

import pytest

from tests.web.browser import screenshot

pytestmark = pytest.mark.timeout(600)


def test_learn_view(server, browser):
    page, watch = browser.page()
    page.goto(server.url + "/learn")
    page.wait_for_function("document.getElementById('fw_caption').textContent.includes('t = 0')")
    first = page.locator("#fw_caption").text_content()
    assert "ᾱ_t = 0.9991" in first  # alpha_bar_0 of Stable Diffusion's schedule
    page.locator("#t_slider").fill("20")
    last = page.locator("#fw_caption").text_content()
    assert "t = 999" in last and "ᾱ_t = 0.0047" in last
    page.locator("#t_slider").fill("10")
    assert "t = 500" in page.locator("#fw_caption").text_content()
    drawn = page.evaluate("""() => {
      const c = document.getElementById('plot');
      const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
      let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i]) n++;
      return n;
    }""")
    assert drawn > 1000  # curves and markers were drawn

    page.fill("#dn_steps", "4")
    page.click("#dn_run")
    page.wait_for_function("Number(document.getElementById('dn_slider').max) >= 4 || "
                           "!document.getElementById('error').hidden", timeout=300_000)
    assert page.locator("#error").is_hidden(), page.locator("#error").text_content()
    assert page.locator("#dn_x0_caption").text_content() == "x0 estimate after step 1/4"
    page.locator("#dn_slider").fill("4")
    assert page.locator("#dn_x0_caption").text_content() == "final image (after step 4)"
    assert "not sent yet" in page.locator("#dn_note").text_content()  # says what is missing
    screenshot(page, "learn_1280", keep=True)
    assert watch.problems() == []
    page.close()
