"""Headless Chromium driving the search page: Playwright for Python with the system's Chromium (Debian's
`chromium`, never a browser Playwright downloads). The web benchmark and the browser tests share it.

`SearchPage` does what a person does on the page (give the API key when asked, pick a photo, upload photos,
switch the match, click "more like this") and reads what the page reports (`window.concord`).
"""

from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from server.web.assets import find_ort

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync")
"""Chromium's flags here: headless, as root, and no calls to Google's hosts (the network is closed)."""
CHROMIUM_HINT = ("no Chromium found (looked at $CONCORD_CHROMIUM, /usr/bin/chromium and `chromium` on PATH): "
                 "`make test` installs it (Debian: apt-get install -y chromium); never `playwright install`, which "
                 "downloads a browser")
PLAYWRIGHT_HINT = "Playwright for Python is missing: `make test` installs it (pip install -e '.[dev]')"
TIMEOUT_MS = 120_000


class BrowserMissing(RuntimeError):
    """Something the browser checks need is not installed; the message says how to get it."""


def chromium_path() -> Path:
    """The Chromium executable: $CONCORD_CHROMIUM, else /usr/bin/chromium, else `chromium` on PATH."""
    given = os.environ.get("CONCORD_CHROMIUM")
    candidates = [given] if given else ["/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")]
    for candidate in candidates:
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return Path(candidate)
    raise BrowserMissing(CHROMIUM_HINT if not given else f"CONCORD_CHROMIUM={given} is no executable file")


def check_ready() -> None:
    """Raise BrowserMissing naming what is missing: Playwright, Chromium or onnxruntime-web's files."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        raise BrowserMissing(PLAYWRIGHT_HINT) from None
    chromium_path()
    assets = find_ort()
    if not assets.available:
        raise BrowserMissing(f"{assets.to_dict()['hint']} (missing: {', '.join(assets.missing)})")


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless Chromium (Playwright `Browser`), closed on exit."""
    check_ready()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium_path()), args=list(CHROMIUM_FLAGS),
                                             headless=True)
        try:
            yield browser
        finally:
            browser.close()


class SearchPage:
    """One tab of the search page, driven as a person would, with the API key given when the page asks."""

    def __init__(self, browser: Any, url: str, api_key: str | None = None, viewport: tuple[int, int] = (1280, 860)):
        self.context = browser.new_context(viewport={"width": viewport[0], "height": viewport[1]})
        self.page = self.context.new_page()
        self.page.set_default_timeout(TIMEOUT_MS)
        self.url = url.rstrip("/")
        self.api_key = api_key
        self.key_asked = 0
        """How many times the page asked for the key."""
        self.errors: list[str] = []
        self.page.on("pageerror", lambda err: self.errors.append(str(err)))

    def close(self) -> None:
        """Close the tab and its browser context."""
        self.context.close()

    def __enter__(self) -> SearchPage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def open(self) -> bool:
        """Load the page and wait until it has started (encoder loaded or fallen back); False when it could not."""
        self.page.goto(self.url + "/")
        self.wait("window.concord && window.concord.started")
        return self.state("startError") is None

    def wait(self, condition: str) -> Any:
        """Wait until the JS `condition` holds, giving the API key whenever the page asks for it; its value."""
        expression = f"() => document.getElementById('key-dialog').open ? 'key' : (({condition}) || false)"
        while True:
            value = self.page.wait_for_function(expression).json_value()
            if value != "key":
                return value
            self.give_key()

    def give_key(self) -> None:
        """Answer the page's key dialog."""
        if self.api_key is None:
            raise AssertionError("the page asks for an API key and none was given")
        self.key_asked += 1
        self.page.get_by_test_id("key-input").fill(self.api_key)
        self.page.get_by_test_id("key-submit").click()

    def state(self, name: str) -> Any:
        """A field of the page's `window.concord` (encoder, fallbackReason, last, ...)."""
        return self.page.evaluate(f"() => window.concord.{name}")

    def tab(self, name: str) -> None:
        """Show the page's Search, Library or Models view."""
        self.page.get_by_test_id(f"tab-{name}").click()

    def search(self, photo: Path, match: str = "similar") -> dict[str, Any]:
        """Pick `photo` as the query with `match` set; the page's report of the search (`window.concord.last`)."""
        self.tab("search")
        self.set_match(match, rerun=False)
        before = self.state("searches")
        self.page.get_by_test_id("query-input").set_input_files(str(photo))
        self.wait(f"window.concord.searches > {before}")
        return dict(self.state("last"))

    def set_match(self, match: str, rerun: bool = True) -> dict[str, Any] | None:
        """Flip the similar / duplicate switch; with `rerun`, wait for the search it repeats and return it."""
        radio = self.page.get_by_test_id(f"match-{match}")
        if radio.is_checked():
            return None
        before = self.state("searches")
        radio.check()
        if not rerun:
            return None
        self.wait(f"window.concord.searches > {before}")
        return dict(self.state("last"))

    def more_like_this(self, index: int = 0) -> dict[str, Any]:
        """Click "more like this" on the `index`-th result; the search it makes."""
        before = self.state("searches")
        self.page.get_by_test_id("results").get_by_test_id("more-like-this").nth(index).click()
        self.wait(f"window.concord.searches > {before}")
        return dict(self.state("last"))

    def upload(self, photos: list[Path]) -> str:
        """Add photos to the library through the page's file picker; the page's summary when it is done."""
        self.tab("library")
        before = self.state("uploads")
        self.page.get_by_test_id("library-input").set_input_files([str(p) for p in photos])
        self.wait(f"window.concord.uploads > {before}")
        return str(self.page.get_by_test_id("upload-text").inner_text())

    def wait_images(self, container: str) -> None:
        """Wait until every thumbnail in the `container` grid (results, library) has loaded."""
        self.wait(f"(() => {{ const imgs = [...document.querySelectorAll('[data-testid={container}] img')]; "
                  f"return imgs.length > 0 && imgs.every((i) => i.complete && i.naturalWidth > 0); }})()")

    def time_encodes(self, photo: bytes, rounds: int) -> dict[str, Any]:
        """Encode `photo` `rounds` times in the page: per-run timings (ms) and the embedding."""
        encoded = base64.b64encode(photo).decode("ascii")
        return dict(self.page.evaluate("([b, n]) => window.concord.timeEncodes(b, n)", [encoded, rounds]))

    def screenshot(self, path: Path) -> Path:
        """Write a PNG of the whole page."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(path), full_page=True)
        return path
