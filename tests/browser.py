"""What the browser tests share: Debian's chromium through Playwright (``playwright-core``'s
Python package; never ``playwright install``), the chat page's helpers, screenshots in
``artifacts/`` and a gate that holds the engine between decoding steps."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.factories import wait_for

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
PHONE = {"width": 390, "height": 844}
DESKTOP = {"width": 1280, "height": 1000}
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]

sync_api = pytest.importorskip("playwright.sync_api")
expect = sync_api.expect
needs_chromium = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no chromium at {CHROMIUM}")


@contextmanager
def chromium():
    """A headless Debian chromium, closed afterwards."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


def open_page(browser, url: str, viewport: dict, context=None):
    """The chat page in its own browser profile (its own localStorage, so its own key) unless
    ``context`` is given."""
    context = context or browser.new_context(viewport=viewport)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(url)
    expect(page.locator("#chatbot")).to_be_visible()
    return page


def idle(ctx) -> bool:
    """Waits until no answer is being written in the app."""
    return wait_for(lambda: not ctx.extras["chat_service"]._active, timeout_s=60)


def fill_kept(field, value: str, timeout_s: float = 20) -> None:
    """Fills ``field`` until the value stays for half a second.  A field Gradio mounts on a
    section's first open can be set back to its server value once, just after it appears
    (seen under a loaded machine in full runs), which would silently drop a single fill."""
    def kept() -> bool:
        field.fill(value)
        field.page.wait_for_timeout(500)
        return field.input_value() == value

    assert wait_for(kept, timeout_s=timeout_s, interval_s=0.2), "the field kept losing what was typed"


def send(page, ctx, message: str) -> None:
    """Sends a message and waits until the turn is stored and no answer is being written."""
    box = page.locator("#message textarea")
    box.fill(message)
    box.press("Enter")

    def answered() -> bool:
        rows = ctx.store.query("SELECT conversation_id, turn FROM messages WHERE role = 'user' AND content = ?",
                               (message,))
        return bool(rows) and len(ctx.store.conversation_messages(rows[-1]["conversation_id"])) > rows[-1]["turn"] + 1

    assert wait_for(answered, timeout_s=60) and idle(ctx)
    expect(page.locator("#chatbot")).to_contain_text(message)


def screenshot(page, name: str, full_page: bool = True) -> None:
    """``full_page=False`` while the sidebar (fixed over the page on a phone) is open."""
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=full_page)


class DecodeGate:
    """Holds the engine between decoding steps while closed, so a test can act on the page
    while an answer is still being written (no timing involved)."""

    def __init__(self, engine):
        self.engine, self.original = engine, engine.decoder.decode
        self.open = threading.Event()
        self.open.set()
        self.reached = threading.Event()

        def decode(tokens):
            if not self.open.is_set():
                self.reached.set()
                self.open.wait(60)
            return self.original(tokens)

        engine.decoder.decode = decode

    def close(self):
        self.reached.clear()
        self.open.clear()

    def release(self):
        self.open.set()

    def remove(self):
        self.open.set()
        self.engine.decoder.decode = self.original
