"""The chat page in a real headless browser (Debian's chromium via Playwright): the retry
icon's side-by-side comparison, past chats in the sidebar across a reload and an app
restart, and "delete my data".  Each test leaves screenshots in ``artifacts/`` for CI
(``chat-compare.png``, ``chat-compare-390.png``, ``chat-sidebar.png``, ``chat-delete-confirm-390.png``,
``chat-delete-390.png``).

Skipped when the ``playwright`` package or ``/usr/bin/chromium`` is missing
(``pip install playwright`` and ``apt-get install chromium``; never ``playwright install``).
"""

from __future__ import annotations

import json
import re

import pytest

from assistant.client import free_port
from feedback import export
from tests.browser import DESKTOP, PHONE, DecodeGate, chromium, expect, needs_chromium, open_page, screenshot, send
from tests.factories import app_settings, launch_app

pytestmark = needs_chromium
OPEN = re.compile(r"\bopen\b")


@pytest.fixture
def browser():
    with chromium() as b:
        yield b


def owner_of(store, message: str) -> str:
    rows = store.query("SELECT s.owner FROM sessions s JOIN conversations c ON c.session_id = s.id "
                       "JOIN messages m ON m.conversation_id = c.id WHERE m.role = 'user' AND m.content = ?",
                       (message,))
    assert len(rows) == 1 and rows[0]["owner"], rows
    return rows[0]["owner"]


def box(page, selector: str) -> dict:
    return page.locator(selector).bounding_box()


def a_word(text: str) -> str:
    """A run of letters from a (random) answer, which survives Markdown rendering."""
    return max(re.findall(r"[A-Za-z]{3,}", text) or [""], key=len)


def page_text_around_the_chat(page) -> str:
    """The page's visible text without what the model or the user wrote."""
    return page.evaluate("""() => {
        const body = document.body.cloneNode(true);
        body.querySelectorAll('#chatbot, #answer-a, #answer-b, #chat-list').forEach((e) => e.remove());
        return body.innerText;
    }""")


def test_retry_icon_compares_side_by_side_and_votes_once_b_is_complete(tmp_path, tiny_model_dir, browser):
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir, max_new_tokens=24))
    gate = DecodeGate(ctx.holder.current()[1])
    try:
        page = open_page(browser, url, DESKTOP)
        send(page, ctx, "Compare two answers please")
        first = ctx.store.conversation_messages(
            ctx.store.query("SELECT conversation_id FROM messages WHERE content = ?",
                            ("Compare two answers please",))[0]["conversation_id"])[1]["content"]
        expect(page.locator("#compare")).to_have_count(0)  # no comparison before one is asked for

        gate.close()  # answer B stays unfinished until the gate opens
        page.locator("#chatbot button[aria-label='Retry']").last.click()
        compare = page.locator("#compare")
        expect(compare).to_be_visible()
        assert gate.reached.wait(60), "answer B never started"
        for verdict in ("a", "b", "tie", "both_bad"):
            expect(page.locator(f"#vote-{verdict}")).to_be_disabled()  # B is still being written
        gate.release()
        for verdict in ("a", "b", "tie", "both_bad"):
            expect(page.locator(f"#vote-{verdict}")).to_be_enabled(timeout=60_000)

        # both answers rendered as Markdown, side by side
        comp = ctx.store.query("SELECT * FROM comparisons WHERE verdict IS NULL")
        assert len(comp) == 1 and comp[0]["a_text"] == first
        for side in ("a", "b"):
            expect(page.locator(f"#answer-{side} [data-testid='markdown']")).to_have_count(1)
            assert page.locator(f"#answer-{side} textarea").count() == 0
        expect(page.locator("#answer-a")).to_contain_text(a_word(first))
        expect(page.locator("#answer-b")).to_contain_text(a_word(comp[0]["b_text"]))
        a, b = box(page, "#answer-a"), box(page, "#answer-b")
        assert b["x"] >= a["x"] + a["width"] - 1 and abs(a["y"] - b["y"]) < 2, (a, b)
        assert "status" not in page_text_around_the_chat(page).lower()
        screenshot(page, "chat-compare.png")

        # the keyboard: 2 is "B is better" (the focus is not in a text field)
        page.locator("#compare-title").click()
        page.keyboard.press("2")
        expect(page.locator("#status")).to_contain_text("Recorded: B is better.")
        expect(page.locator("#compare")).to_have_count(0)
        row = ctx.store.comparison(comp[0]["id"])
        assert row["verdict"] == "b"
        kept = ctx.store.conversation_messages(row["conversation_id"])[1]
        assert kept["generation_id"] == row["b_generation_id"]

        # typing a digit into the message box is text, not a vote (the tie below would then be refused)
        page.locator("#chatbot button[aria-label='Retry']").last.click()
        expect(page.locator("#vote-a")).to_be_enabled(timeout=60_000)
        page.locator("#message textarea").press("1")
        expect(page.locator("#message textarea")).to_have_value("1")
        page.locator("#vote-tie").click()
        expect(page.locator("#status")).to_contain_text("Recorded: tie")
        assert [r["verdict"] for r in ctx.store.query("SELECT verdict FROM comparisons ORDER BY created_at")] == [
            "b", "tie"]

        # on a phone: the two answers stack, nothing is wider than the screen
        phone = open_page(browser, url, PHONE)
        expect(phone.locator("#sidebar")).not_to_have_class(OPEN)  # it would cover the page
        send(phone, ctx, "Compare on a phone")
        phone.locator("#chatbot button[aria-label='Retry']").last.click()
        expect(phone.locator("#vote-a")).to_be_enabled(timeout=60_000)
        a, b = box(phone, "#answer-a"), box(phone, "#answer-b")
        assert b["y"] >= a["y"] + a["height"] - 1 and abs(a["x"] - b["x"]) < 2, (a, b)
        assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        screenshot(phone, "chat-compare-390.png")
        phone.locator("#vote-a").click()
        expect(phone.locator("#status")).to_contain_text("Recorded: A is better.")
    finally:
        gate.remove()
        close()


def test_reload_and_restart_find_the_chat_in_the_sidebar(tmp_path, tiny_model_dir, browser):
    settings = app_settings(tmp_path, tiny_model_dir, port=free_port())
    url, ctx, close = launch_app(settings)
    try:
        context = browser.new_context(viewport=DESKTOP)
        page = open_page(browser, url, DESKTOP, context)
        expect(page.locator("#no-chats")).to_contain_text("No chats yet")
        send(page, ctx, "Plan a trip to Lisbon")
        page.locator("#sidebar-new").click()
        send(page, ctx, "Another chat about cooking")
        stranger = open_page(browser, url, DESKTOP)  # another browser: its own key, its own list
        expect(stranger.locator("#no-chats")).to_be_visible()
        expect(stranger.locator("#chat-list")).to_have_count(0)

        page.reload()
        chats = page.locator("#chat-list")
        expect(chats).to_contain_text("Plan a trip to Lisbon")
        expect(chats).to_contain_text("Another chat about cooking")
        expect(page.locator("#chatbot")).to_contain_text("Another chat about cooking")  # a reload reopens it
        expect(page.locator("#chatbot")).not_to_contain_text("Lisbon")
        chats.get_by_text("Plan a trip to Lisbon").click()
        expect(page.locator("#chatbot")).to_contain_text("Plan a trip to Lisbon")
        expect(page.locator("#status")).to_contain_text("Reopened")
        send(page, ctx, "And what about Porto?")
        conv = ctx.store.query("SELECT conversation_id FROM messages WHERE content = ?",
                               ("Plan a trip to Lisbon",))[0]["conversation_id"]
        assert [m["content"] for m in ctx.store.conversation_messages(conv)][2] == "And what about Porto?"
        screenshot(page, "chat-sidebar.png")
    finally:
        close()

    url, ctx, close = launch_app(settings)  # an app restart: same data, same address
    try:
        page.reload()
        chats = page.locator("#chat-list")
        expect(chats).to_contain_text("Plan a trip to Lisbon")
        chats.get_by_text("Plan a trip to Lisbon").click()
        expect(page.locator("#chatbot")).to_contain_text("And what about Porto?")
        send(page, ctx, "One more thing after the restart")
        assert len(ctx.store.conversation_messages(conv)) == 6
    finally:
        close()


def test_delete_my_data_on_a_phone(tmp_path, tiny_model_dir, browser):
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir))
    try:
        other = open_page(browser, url, DESKTOP)
        send(other, ctx, "Someone else's question")
        page = open_page(browser, url, PHONE)
        send(page, ctx, "My private question")
        page.locator("#chatbot button[aria-label='Retry']").last.click()
        expect(page.locator("#vote-b")).to_be_enabled(timeout=60_000)
        page.locator("#vote-b").click()
        expect(page.locator("#status")).to_contain_text("Recorded: B is better.")
        owner = owner_of(ctx.store, "My private question")
        assert "My private question" in json.dumps(list(export.trl_records(ctx.store)))

        page.locator("#sidebar .toggle-button").click()
        expect(page.locator("#sidebar")).to_have_class(OPEN)
        page.locator("#delete-data").click()
        expect(page.locator("#delete-confirm")).to_be_visible()
        page.locator("#delete-cancel").click()  # nothing happens without the confirmation
        expect(page.locator("#delete-confirm")).to_have_count(0)
        assert ctx.store.query("SELECT count(*) AS n FROM sessions WHERE owner = ?", (owner,))[0]["n"] == 1

        page.locator("#delete-data").click()
        screenshot(page, "chat-delete-confirm-390.png", full_page=False)
        page.locator("#delete-confirm-btn").click()
        result = page.locator("#delete-result")
        expect(result).to_contain_text("Deleted for good: 1 chat (2 messages) and 1 vote.")
        expect(result).to_contain_text("None of it had been used for training yet.")
        expect(page.locator("#no-chats")).to_be_visible()
        expect(page.locator("#chatbot")).not_to_contain_text("My private question")
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        screenshot(page, "chat-delete-390.png", full_page=False)

        for table in ("conversations", "generations", "comparisons", "ratings"):
            assert ctx.store.query(f"SELECT count(*) AS n FROM {table} t JOIN sessions s ON s.id = t.session_id "
                                   "WHERE s.owner = ?", (owner,))[0]["n"] == 0, table
        assert ctx.store.query("SELECT count(*) AS n FROM messages WHERE content = ?",
                               ("My private question",))[0]["n"] == 0
        assert "My private question" not in json.dumps(list(export.trl_records(ctx.store)))
        page.reload()
        expect(page.locator("#no-chats")).to_be_attached()
        expect(page.locator("#chat-list")).to_have_count(0)
        # the other browser's chat is still there
        other.reload()
        expect(other.locator("#chat-list")).to_contain_text("Someone else's question")
    finally:
        close()


def test_a_refused_message_keeps_the_chat_in_view_and_the_text_in_the_box(tmp_path, tiny_model_dir, browser):
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir, max_message_chars=60, max_new_tokens=8))
    try:
        page = open_page(browser, url, DESKTOP)
        send(page, ctx, "hello there")
        too_long = "a message that is far too long for this server's limit of sixty characters"
        box = page.locator("#message textarea")
        box.fill(too_long)
        box.press("Enter")
        expect(page.get_by_text("the message is too long")).to_be_visible()  # a toast says why ...
        expect(box).to_have_value(too_long)  # ... the text is back in the box to shorten ...
        chatbot = page.locator("#chatbot")
        expect(chatbot).to_contain_text("hello there")  # ... and the conversation stays in view
        expect(chatbot.get_by_text("Error", exact=True)).to_have_count(0)
        screenshot(page, "chat-refused.png", full_page=False)
        assert len(ctx.store.query("SELECT id FROM messages WHERE role = 'user'")) == 1  # nothing stored
    finally:
        close()
