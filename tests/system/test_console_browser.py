"""The console in a real headless browser (Debian's chromium via Playwright): log in, open a
record, exclude it.  Leaves a screenshot at ``artifacts/console.png`` for CI.

Skipped when the ``playwright`` package or ``/usr/bin/chromium`` is missing
(``pip install playwright`` and ``apt-get install chromium``; never ``playwright install``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.factories import PASSWORD, app_settings, launch_app, populate

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"

sync_api = pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"no chromium at {CHROMIUM}")


def test_login_open_and_exclude_in_browser(tmp_path, tiny_model_dir):
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir, admin_password=PASSWORD))
    try:
        ids = populate(ctx.store, ctx.registry, str(tiny_model_dir))
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"])
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1800})
                page.set_default_timeout(30_000)
                page.goto(url.rstrip("/") + "/console")
                page.locator("#console-user input, #console-user textarea").first.fill("admin")
                page.locator("#console-password input").first.fill(PASSWORD)
                page.locator("#console-login").click()
                table = page.locator("#console-table")
                sync_api.expect(table).to_contain_text(ids["comparison0"], timeout=30_000)
                # open the record by clicking its row
                page.locator("#console-table").get_by_text(f"comparison:{ids['comparison0']}").click()
                detail = page.locator("#console-detail")
                sync_api.expect(detail).to_contain_text("capital of France")
                sync_api.expect(detail).to_contain_text("answer B0")
                page.locator("#console-reason textarea, #console-reason input").first.fill("off-topic test data")
                page.locator("#console-exclude").click()
                sync_api.expect(detail).to_contain_text("EXCLUDED")
                sync_api.expect(page.locator("#console-action-msg")).to_contain_text("Excluded")
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "console.png"), full_page=True)
            finally:
                browser.close()
        row = ctx.store.comparison(ids["comparison0"])
        assert row["excluded"] == 1 and row["excluded_by"] == "admin" and row["exclude_reason"] == "off-topic test data"
        assert ids["comparison0"] not in {r["id"] for r in ctx.store.usable_comparisons()}
    finally:
        close()
