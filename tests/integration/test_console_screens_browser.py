"""The console's screens in a real headless browser (Debian's chromium via Playwright), at
1280 px and 390 px wide, against the real app (real SQLite file, real Gradio server):

- a wrong password shows one readable line under the form, and the form stays usable: the
  right password typed next, in the same page, gets in;
- the first screen says what to look at, with and without data;
- the filters sit in one closed bar whose label says what the list is narrowed to;
- verdicts read as words;
- empty tabs say so in a sentence (Training with no runs, Versions with one version, the
  Feedback list with no judgements) instead of header-only tables, empty plots or a serve button.

Screenshots go to ``artifacts/console-<screen>-<width>.png``.  Skipped when the
``playwright`` package or ``/usr/bin/chromium`` is missing."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest

from tests.browser import DESKTOP, PHONE, chromium, expect, needs_chromium, screenshot
from tests.factories import PASSWORD, app_settings, launch_app, populate

pytestmark = needs_chromium
WIDTHS = pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])
WHY_REJECTED = "reward model accuracy 0.513 < 0.6 (cross-fitted, n=189)"
CODES = {"a", "b", "tie", "both_bad", "edit", "up", "down"}  # what the table showed before


@pytest.fixture(scope="module")
def empty_app(tmp_path_factory, tiny_model_dir):
    """A fresh app: no judgement, no run, one version (the SFT model it started with)."""
    url, ctx, close = launch_app(app_settings(tmp_path_factory.mktemp("console-empty"), tiny_model_dir,
                                              admin_password=PASSWORD))
    yield url, ctx
    close()


@pytest.fixture(scope="module")
def full_app(tmp_path_factory, tiny_model_dir):
    """``populate``'s 7 judgements (2 of 3 thumbs down), a second version, a rejected run whose
    reward models doubt one vote."""
    url, ctx, close = launch_app(app_settings(tmp_path_factory.mktemp("console-full"), tiny_model_dir,
                                              admin_password=PASSWORD))
    ids = populate(ctx.store, ctx.registry, str(tiny_model_dir))
    run = ctx.registry.create_run("schedule")
    ctx.registry.update_run(run, status="running", started_at="2026-11-22T11:05:33.123+00:00", n_preferences=212)
    ctx.registry.update_run(run, status="rejected", finished_at="2026-11-22T11:17:40.000+00:00", reason=WHY_REJECTED,
                            decision={"passed": False, "reasons": [WHY_REJECTED]})
    (ctx.settings.runs_dir / run).mkdir(parents=True)
    (ctx.settings.runs_dir / run / "label_scores.json").write_text(json.dumps([
        {"record": f"comparison:{ids['comparison0']}", "item": ids["comparison0"], "source": "regenerate",
         "label": 1.0, "model": -2.5, "disagreement": 2.5}]))
    yield url, ctx
    close()


@contextmanager
def console_page(url: str, viewport: dict):
    """The console's login form in a fresh browser profile."""
    with chromium() as browser:
        page = browser.new_page(viewport=viewport)
        page.set_default_timeout(30_000)
        page.goto(url.rstrip("/") + "/console")
        expect(page.locator("#console-user")).to_be_visible()
        yield page


def fill_login(page, user: str, password: str) -> None:
    page.locator("#console-user input, #console-user textarea").first.fill(user)
    page.locator("#console-password input").first.fill(password)


def log_in(page) -> None:
    fill_login(page, "admin", PASSWORD)
    page.locator("#console-login").click()
    expect(page.locator("#console-todo")).to_contain_text("Look at first")


def open_tab(page, name: str) -> None:
    """Opens a console tab; a narrow screen keeps the tabs that do not fit behind "More tabs"."""
    tab = page.get_by_role("tab", name=name, exact=True)
    if tab.count():
        tab.click()
    else:
        page.get_by_role("button", name="More tabs").click()
        page.locator(".overflow-dropdown").get_by_role("button", name=name, exact=True).click()
    expect(page.get_by_role("tab", name=name, exact=True)).to_have_attribute("aria-selected", "true")


def kind_column(page, rows: int) -> list[str]:
    """The kind cells of the Feedback table as shown, once it shows ``rows`` rows."""
    table = page.locator("#console-table")
    expect(table.get_by_test_id(f"cell-{rows - 1}-1")).to_be_visible()
    expect(table.get_by_test_id(f"cell-{rows}-1")).to_have_count(0)
    return [table.get_by_test_id(f"cell-{i}-1").inner_text().strip() for i in range(rows)]


# ----------------------------------------------------------------------------- login
@WIDTHS
def test_a_wrong_password_shows_one_line_and_the_form_stays_usable(empty_app, viewport):
    url, _ = empty_app
    w = viewport["width"]
    with console_page(url, viewport) as page:
        box = page.locator("#console-login-box")
        fill_login(page, "admin", "not the password")
        page.locator("#console-login").click()
        line = page.locator("#console-login-msg")
        expect(line).to_have_text("Login refused: wrong user name or password.")
        expect(box).not_to_contain_text("Error")  # no error overlay over the fields or the button
        user = page.locator("#console-user input, #console-user textarea").first
        password = page.locator("#console-password input").first
        expect(user).to_be_editable()
        expect(user).to_have_value("admin")      # the name stays, the password is emptied for the next try
        expect(password).to_be_editable()
        expect(password).to_have_value("")
        expect(page.locator("#console-login")).to_be_enabled()
        expect(page.locator("#console-main")).to_be_hidden()
        screenshot(page, f"console-login-refused-{w}.png")

        password.fill(PASSWORD)  # the same page, no reload
        password.press("Enter")
        expect(page.locator("#console-todo")).to_contain_text("Look at first")
        expect(box).to_be_hidden()
        expect(page.get_by_text("Logged in as admin")).to_be_visible()


# ----------------------------------------------------------------------------- the first screen
@WIDTHS
def test_first_screen_and_empty_tabs_without_data(empty_app, viewport):
    url, _ = empty_app
    w = viewport["width"]
    with console_page(url, viewport) as page:
        log_in(page)
        expect(page.locator("#console-todo")).to_contain_text("No judgements yet")
        expect(page.locator("#console-card-judgements")).to_contain_text("None yet.")
        expect(page.locator("#console-card-thumbs")).to_contain_text("No thumbs in the last 7 days.")
        expect(page.locator("#console-card-run")).to_contain_text("No run yet.")
        expect(page.locator("#console-card-queue")).to_contain_text("No queue yet")
        screenshot(page, f"console-overview-empty-{w}.png")

        open_tab(page, "Feedback")
        expect(page.locator("#console-page-info")).to_contain_text("No judgements yet")
        expect(page.locator("#console-table")).to_be_hidden()

        open_tab(page, "Training")
        expect(page.locator("#console-runs-info")).to_contain_text("No training run yet")
        expect(page.locator("#console-runs")).to_be_hidden()        # no header-only table
        expect(page.locator("#console-run-page")).to_be_hidden()    # no empty plot, no "1 2 3" columns
        expect(page.locator("#console-checks")).to_be_hidden()
        screenshot(page, f"console-training-empty-{w}.png")

        open_tab(page, "Versions")
        expect(page.locator("#console-serve-info")).to_contain_text("Only one version exists")
        expect(page.locator("#console-served")).to_contain_text("Serving sft")
        expect(page.get_by_role("button", name="Serve this version…")).to_be_hidden()
        expect(page.locator("#console-serve")).to_be_hidden()
        screenshot(page, f"console-versions-one-{w}.png")


@WIDTHS
def test_first_screen_filters_and_verdicts_with_data(full_app, viewport):
    url, _ = full_app
    w = viewport["width"]
    with console_page(url, viewport) as page:
        log_in(page)
        todo = page.locator("#console-todo")
        expect(todo).to_contain_text("The last training run was rejected")
        expect(todo).to_contain_text("1 judgement the reward models doubt is still used for training")
        expect(todo).to_contain_text("67% of this week's thumbs are down")
        expect(page.locator("#console-card-judgements")).to_contain_text("7 today")
        expect(page.locator("#console-card-judgements")).to_contain_text("7 in the last 7 days")
        expect(page.locator("#console-card-thumbs")).to_contain_text("67%")
        expect(page.locator("#console-card-thumbs")).to_contain_text("of 3 ratings")
        expect(page.locator("#console-card-run")).to_contain_text("Rejected")
        expect(page.locator("#console-card-run")).to_contain_text("reward model accuracy 0.513")
        expect(page.locator("#console-card-queue")).to_contain_text("1 to review")
        screenshot(page, f"console-overview-{w}.png")

        # the Feedback list: filters in one closed bar, verdicts in words
        open_tab(page, "Feedback")
        bar = page.locator("#console-filters")
        expect(bar).to_contain_text("Filters · none")
        expect(page.locator("#console-search")).to_be_hidden()
        kinds = kind_column(page, 7)
        assert sorted(kinds) == ["A better", "B better", "Both bad", "Rewrite", "Thumbs down", "Thumbs down",
                                 "Thumbs up"]
        assert not CODES & set(kinds)
        screenshot(page, f"console-feedback-{w}.png")

        bar.get_by_text("Filters · none").click()
        expect(page.locator("#console-search")).to_be_visible()
        page.locator("#console-kinds").get_by_text("Thumbs down", exact=True).click()
        page.locator("#console-apply").click()
        expect(bar).to_contain_text("Filters · Thumbs down")
        expect(page.locator("#console-page-info")).to_contain_text("1–2 of 2 judgements")
        assert kind_column(page, 2) == ["Thumbs down", "Thumbs down"]
        screenshot(page, f"console-feedback-filtered-{w}.png")

        # with two versions the serve controls are offered, and not in red before the confirmation
        open_tab(page, "Versions")
        serve = page.get_by_role("button", name="Serve this version…")
        expect(serve).to_be_visible()
        assert "stop" not in (serve.get_attribute("class") or "")
        expect(page.locator("#console-serve-info")).to_be_empty()

        open_tab(page, "Training")
        expect(page.locator("#console-runs")).to_contain_text("reward model accuracy 0.513")
        expect(page.locator("#console-runs-info")).to_contain_text("1 run, newest first")
