"""The sidebar's chat list and the page's smaller things in a real headless browser (Debian's
chromium via Playwright), at 1280 and 390 px: date groups, long titles cut with an ellipsis and
a branch's "(edited)" badge in view, rename and delete of the open chat, a reload that reopens
the chat that was open, the live character counter, the model line in plain words, dark mode
following the system, and an edit box as wide as the message column.
Screenshots go to ``artifacts/chat-list-*.png``.

Skipped when the ``playwright`` package or ``/usr/bin/chromium`` is missing.
"""

from __future__ import annotations

import re

import pytest

from tests import browser as web
from tests.browser import DESKTOP, PHONE, expect, idle, open_page, screenshot, send
from tests.factories import app_settings, launch_app

pytestmark = web.needs_chromium
LONG = "Plan a two week trip through Portugal with stops in Lisbon, Porto, Coimbra and the Algarve coast"


@pytest.fixture
def browser():
    with web.chromium() as b:
        yield b


@pytest.fixture
def app(tmp_path, tiny_model_dir):
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir, max_new_tokens=8))
    yield url, ctx
    close()


def conversation_of(store, message: str) -> str:
    return store.query("SELECT conversation_id FROM messages WHERE role = 'user' AND content = ?",
                       (message,))[-1]["conversation_id"]


def open_sidebar(page, viewport: dict) -> None:
    """On a phone the sidebar starts closed (it covers the page): once the page has closed it,
    the toggle opens it."""
    if viewport is PHONE:
        page.wait_for_timeout(1000)  # the page closes it 200 and 800 ms after it first shows
        expect(page.locator("#sidebar")).not_to_have_class(re.compile(r"\bopen\b"))
        page.locator("#sidebar .toggle-button").click()
        expect(page.locator("#sidebar")).to_have_class(re.compile(r"\bopen\b"))
        page.wait_for_function("document.getElementById('sidebar').getBoundingClientRect().left >= 0")
    expect(page.locator("#sidebar-new")).to_be_in_viewport()


def edit(page, nth: int, text: str) -> None:
    page.locator("#chatbot button[aria-label='Edit']").nth(nth).click()
    area = page.locator("#chatbot textarea")
    expect(area).to_have_count(1)
    area.fill(text)
    page.locator("#chatbot button[aria-label='Submit']").click()


def brightness(page, selector: str) -> float:
    """The mean of an element's opaque background colour's channels (0 black, 255 white)."""
    rgb = page.locator(selector).first.evaluate("e => getComputedStyle(e).backgroundColor")
    values = [float(v) for v in rgb[rgb.index("(") + 1:rgb.index(")")].split(",")]
    assert len(values) == 3 or values[3] > 0.5, f"{selector} has no background of its own: {rgb}"
    return sum(values[:3]) / 3


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])
def test_chat_list_groups_badge_rename_delete_and_reload(app, browser, viewport):
    url, ctx = app
    store = ctx.store
    page = open_page(browser, url, viewport)
    send(page, ctx, "An old question about tea")
    old = conversation_of(store, "An old question about tea")
    with store.transaction() as db:  # last active twelve days ago
        db.execute("UPDATE messages SET created_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-12 days') "
                   "WHERE conversation_id = ?", [old])
    page.locator("#new-chat").click()
    send(page, ctx, LONG)
    # the edit box is as wide as the message column, not a narrow strip
    page.locator("#chatbot button[aria-label='Edit']").first.click()
    area = page.locator("#chatbot textarea")
    chat_width = page.locator("#chatbot").bounding_box()["width"]
    assert area.bounding_box()["width"] >= 0.6 * chat_width, (area.bounding_box(), chat_width)
    assert page.evaluate("document.documentElement.scrollWidth") <= viewport["width"]
    area.fill(LONG + " in May")  # a user message: the chat branches there
    page.locator("#chatbot button[aria-label='Submit']").click()
    expect(page.locator("#status")).to_contain_text("Your edit starts a new chat")
    assert idle(ctx)
    expect(page.locator("#branch-bar")).to_be_visible()  # the page has caught up with the branch

    page.reload()  # reopens the branch, the chat that was open
    expect(page.locator("#chatbot")).to_contain_text(LONG + " in May")
    open_sidebar(page, viewport)
    listing = page.locator("#chat-list")
    expect(listing.locator(".chat-group-title:not(.chat-group-title .chat-group-title)")).to_have_text(
        ["Today", "Previous 30 days"])
    badge = listing.get_by_text("(edited) · Plan a two week trip", exact=False)
    expect(badge).to_be_visible()
    title = badge.evaluate("e => ({cut: e.scrollWidth > e.clientWidth, style: getComputedStyle(e).textOverflow,"
                           " left: e.getBoundingClientRect().left, right: e.getBoundingClientRect().right})")
    assert title["cut"] and title["style"] == "ellipsis", title
    side = page.locator("#sidebar").bounding_box()
    assert title["right"] <= side["x"] + side["width"] + 1  # cut inside the sidebar, badge first
    expect(listing.locator("input:checked")).to_have_count(1)
    screenshot(page, f"chat-list-{viewport['width']}.png", full_page=viewport is DESKTOP)

    # rename the open chat; the name stays after a reload
    page.locator("#chat-rename").click()
    box = page.locator("#rename-text input, #rename-text textarea").first
    expect(box).to_have_value(LONG + " in May")  # the whole first message, not the list's cut
    box.fill("Portugal in May")
    page.locator("#rename-save").click()
    expect(page.locator("#status")).to_contain_text("Renamed the chat to “Portugal in May”.")
    expect(listing).to_contain_text("(edited) · Portugal in May")
    expect(page.locator("#rename-box")).to_have_count(0)
    branch = conversation_of(store, LONG + " in May")
    assert store.query("SELECT title FROM conversations WHERE id = ?", (branch,))[0]["title"] == "Portugal in May"
    page.reload()
    open_sidebar(page, viewport)
    expect(page.locator("#chat-list")).to_contain_text("(edited) · Portugal in May")

    # delete it (after a confirmation): gone from the list and the store; a new chat is open
    page.locator("#chat-delete").click()
    expect(page.locator("#chat-delete-confirm")).to_be_visible()
    page.locator("#chat-delete-no").click()
    expect(page.locator("#chat-delete-confirm")).to_have_count(0)
    assert store.conversation_messages(branch)
    page.locator("#chat-delete").click()
    page.locator("#chat-delete-yes").click()
    expect(page.locator("#status")).to_contain_text("Deleted the chat for good (2 messages).")
    expect(page.locator("#chat-list")).not_to_contain_text("Portugal in May")
    expect(page.locator("#chat-list")).to_contain_text(LONG[:30])  # the original and the old chat stay
    expect(page.locator("#chatbot")).not_to_contain_text("in May")
    expect(page.locator("#chat-actions")).to_have_count(0)  # nothing open to rename
    assert store.conversation_messages(branch) == [] and store.conversation_messages(old)

    page.reload()  # the open chat was a new one: a reload opens a new one
    expect(page.locator("#chatbot")).not_to_contain_text("in May")
    expect(page.locator("#chatbot")).not_to_contain_text("tea")


def test_counter_plain_model_words_and_dark_mode(app, browser):
    url, ctx = app
    limit = ctx.settings.max_message_chars
    context = browser.new_context(viewport=DESKTOP, color_scheme="dark")
    page = open_page(browser, url, DESKTOP, context)
    expect(page.locator("#model-version")).to_contain_text("Answering: the original assistant")
    counter = page.locator("#char-count")
    expect(counter).to_have_text("")
    box = page.locator("#message textarea")
    box.press_sequentially("Hello")
    expect(counter).to_have_text(f"5 / {limit:,} characters")
    box.fill("x" * (limit + 12))
    expect(counter).to_have_text(f"{limit + 12:,} / {limit:,} characters: 12 too many")
    expect(counter).to_have_class("over")
    box.press("Enter")  # refused: the text stays in the box, the counter with it
    expect(page.get_by_text("too long", exact=False).first).to_be_visible()
    expect(box).to_have_value("x" * (limit + 12))
    box.fill("Hi")
    expect(counter).to_have_text(f"2 / {limit:,} characters")
    box.press("Enter")
    expect(counter).to_have_text("", timeout=10_000)  # the box was cleared when it was sent

    # dark mode follows the system: Gradio's dark theme, the page's own parts drawn with its colours
    assert page.evaluate("document.body.classList.contains('dark') || "
                         "document.querySelector('.gradio-container').closest('.dark') !== null")
    assert brightness(page, "body") < 80 and brightness(page, "#message textarea") < 80
    screenshot(page, "chat-list-dark-1280.png")
    light = open_page(browser, url, DESKTOP, browser.new_context(viewport=DESKTOP, color_scheme="light"))
    assert not light.evaluate("document.body.classList.contains('dark')")
    assert brightness(light, "body") > 170 and brightness(light, "#message textarea") > 170
