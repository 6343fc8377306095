"""Headless Debian Chromium driven by Playwright, for the web UI tests.

:func:`launch` starts ``/usr/bin/chromium`` (never a downloaded browser) with a fresh profile;
:class:`PageWatch` records console errors and failed network requests of a page, so every
test can assert that a page produced none.  :func:`need_chromium` skips a test with the
reason when Chromium or Playwright is missing, except under CI (``CI`` set), where the test
must run and so fails instead.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "artifacts" / "web"  # gitignored: every screenshot the tests take
SCREENSHOTS = ROOT / "docs" / "screenshots"  # committed: small ones for the docs


def need_chromium() -> None:
    missing = []
    if not Path(CHROMIUM).exists():
        missing.append(f"{CHROMIUM} (apt-get install chromium, or scripts/ci_deps.sh)")
    try:
        import playwright  # noqa: F401
    except ImportError:
        missing.append("the playwright package (pip install -e '.[test]')")
    if missing and not os.environ.get("CI"):
        pytest.skip("browser tests need " + " and ".join(missing))
    if missing:
        pytest.fail("CI is set, so the browser tests must run, but these are missing: "
                    + "; ".join(missing))


class Browser:
    """A Chromium process with its own temporary profile; use as a context manager."""

    def __enter__(self) -> Browser:
        from playwright.sync_api import sync_playwright

        self._profile = tempfile.mkdtemp(prefix="noisecraft-chromium-")
        self._pw = sync_playwright().start()
        self.context = self._pw.chromium.launch_persistent_context(
            self._profile, executable_path=CHROMIUM, args=ARGS, headless=True,
            viewport={"width": 1280, "height": 800}, accept_downloads=True)
        self.context.set_default_timeout(60_000)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.context.close()
        finally:
            self._pw.stop()
            shutil.rmtree(self._profile, ignore_errors=True)

    def page(self, **viewport) -> tuple:
        page = self.context.new_page()
        if viewport:
            page.set_viewport_size(viewport)
        return page, PageWatch.attach(page)


@dataclass
class PageWatch:
    """Console errors and failed requests seen by one page."""

    console_errors: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    ignore_console: tuple[str, ...] = ()

    @classmethod
    def attach(cls, page) -> PageWatch:
        watch = cls()
        page.on("console", lambda m: watch.console_errors.append(m.text)
                if m.type == "error" else None)
        page.on("pageerror", lambda e: watch.console_errors.append(f"uncaught: {e}"))
        page.on("requestfailed", lambda r: watch.failed.append(
            f"{r.method} {r.url}: {r.failure}"))
        page.on("response", lambda r: watch.failed.append(f"{r.request.method} {r.url}: "
                                                          f"HTTP {r.status}")
                if r.status >= 400 else None)
        return watch

    def problems(self, allow: tuple[str, ...] = ()) -> list[str]:
        found = [f"console error: {t}" for t in self.console_errors] + self.failed
        return [p for p in found if not any(a in p for a in allow)]


def screenshot(page, name: str, keep: bool = False) -> Path:
    """Save a screenshot under artifacts/web (and docs/screenshots when ``keep``)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    if keep:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, SCREENSHOTS / f"{name}.png")
    return path
