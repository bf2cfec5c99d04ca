"""The console in a real headless browser (Debian's chromium via Playwright): log in, open a
record, exclude it; a rejected run's reason and its page; the disagreement queue.  Leaves
screenshots in ``artifacts/`` (``console.png``, ``console-training.png``,
``console-quality.png``) for CI.

Skipped when the ``playwright`` package or ``/usr/bin/chromium`` is missing
(``pip install playwright`` and ``apt-get install chromium``; never ``playwright install``).
"""

from __future__ import annotations

import json
from contextlib import contextmanager

from tests.browser import chromium, expect, needs_chromium, screenshot
from tests.factories import PASSWORD, app_settings, launch_app, populate

pytestmark = needs_chromium


@contextmanager
def logged_in(url: str):
    """A headless chromium page logged in to the console."""
    with chromium() as browser:
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(30_000)
        page.goto(url.rstrip("/") + "/console")
        page.locator("#console-user input, #console-user textarea").first.fill("admin")
        page.locator("#console-password input").first.fill(PASSWORD)
        page.locator("#console-login").click()
        expect(page.locator("#console-todo")).to_contain_text("Look at first")  # the first screen
        page.get_by_role("tab", name="Feedback").click()
        expect(page.locator("#console-table")).to_be_visible()
        yield page


def test_login_open_and_exclude_in_browser(tmp_path, tiny_model_dir):
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir, admin_password=PASSWORD))
    try:
        ids = populate(ctx.store, ctx.registry, str(tiny_model_dir))
        with logged_in(url) as page:
            table = page.locator("#console-table")
            expect(table).to_contain_text(ids["comparison0"], timeout=30_000)
            # open the record by clicking its row
            page.locator("#console-table").get_by_text(f"comparison:{ids['comparison0']}").click()
            detail = page.locator("#console-detail")
            expect(detail).to_contain_text("capital of France")
            expect(detail).to_contain_text("answer B0")
            page.locator("#console-reason textarea, #console-reason input").first.fill("off-topic test data")
            page.locator("#console-exclude").click()
            expect(detail).to_contain_text("EXCLUDED")
            expect(page.locator("#console-action-msg")).to_contain_text("Excluded")
            screenshot(page, "console.png")
        row = ctx.store.comparison(ids["comparison0"])
        assert row["excluded"] == 1 and row["excluded_by"] == "admin" and row["exclude_reason"] == "off-topic test data"
        assert ids["comparison0"] not in {r["id"] for r in ctx.store.usable_comparisons()}
    finally:
        close()


def test_rejected_runs_reason_and_the_disagreement_queue_in_browser(tmp_path, tiny_model_dir):
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir, admin_password=PASSWORD))
    try:
        ids = populate(ctx.store, ctx.registry, str(tiny_model_dir))
        registry = ctx.registry
        run = registry.create_run("schedule")
        registry.update_run(run, status="running", started_at="2026-11-22T11:05:33.123+00:00", n_preferences=212)
        why = "reward model accuracy 0.513 < 0.6 (cross-fitted, n=189)"
        registry.update_run(run, status="rejected", finished_at="2026-11-22T11:17:40.000+00:00", reason=why,
                            decision={"passed": False, "reasons": [why], "checks": [
                                {"name": "rm_accuracy", "value": 0.513, "op": ">=", "threshold": 0.6,
                                 "passed": False}],
                                "judgements": {"preference": {"seen": 191, "used": 189,
                                                              "dropped": {"identical answers": 2}}}})
        (ctx.settings.runs_dir / run).mkdir(parents=True)
        (ctx.settings.runs_dir / run / "label_scores.json").write_text(json.dumps([
            {"record": f"comparison:{ids['comparison0']}", "item": ids["comparison0"], "source": "regenerate",
             "label": 1.0, "model": -2.5, "disagreement": 2.5}]))
        with logged_in(url) as page:
            # the Training tab: the reason in words in the table, and on the run's page
            page.get_by_role("tab", name="Training").click()
            runs = page.locator("#console-runs")
            expect(runs).to_contain_text("reward model accuracy 0.513")
            runs.get_by_test_id("cell-0-9").click()  # the run id cell of the first (only) run
            expect(page.locator("#console-run")).to_contain_text(f"Why: {why}")
            expect(page.locator("#console-checks")).to_contain_text("FAIL")
            expect(page.locator("#console-run-data")).to_contain_text("identical answers")
            screenshot(page, "console-training.png")

            # the disagreement queue: open the doubted vote and exclude it with a reason
            page.get_by_role("tab", name="Label quality").click()
            queue = page.locator("#console-disagreements")
            expect(queue).to_contain_text("rejected better (-2.50)")
            queue.get_by_test_id("cell-0-8").click()  # the record cell of the first (only) row
            expect(page.locator("#console-quality-record")).to_contain_text("capital of France")
            page.locator("#console-quality-reason textarea, #console-quality-reason input").first.fill("mislabel")
            page.locator("#console-quality-exclude").click()
            expect(page.locator("#console-quality-msg")).to_contain_text("Excluded")
            expect(queue).to_contain_text("excluded")
            screenshot(page, "console-quality.png")
        row = ctx.store.comparison(ids["comparison0"])
        assert (row["excluded"], row["exclude_reason"], row["excluded_by"]) == (1, "mislabel", "admin")
    finally:
        close()
