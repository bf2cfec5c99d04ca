"""The chat thread in a real headless browser (Debian's chromium via Playwright), at 1280 and
390 px: Retry turns the latest answer into the A | B pair in place (scrolled into view and
focused), the answers a vote or a ranking did not choose behind a "1/2" pager, the one
Send/Stop button and the message icons only once an answer is complete, refusals that keep
the typed text, the ranking and the comparison, readiness lines, and the rating popover at
the message (a confirmation for every submission, a double submit refused).  The engine is
held between decoding steps (``DecodeGate``) so the "while writing" states are deterministic.
Screenshots go to ``artifacts/chat-thread-*.png``.

Skipped when the ``playwright`` package or ``/usr/bin/chromium`` is missing.
"""

from __future__ import annotations

import re

import pytest

from tests import browser as web
from tests.browser import DESKTOP, PHONE, DecodeGate, expect, idle, open_page, screenshot, send
from tests.factories import app_settings, launch_app

pytestmark = web.needs_chromium
VERDICTS = ("a", "b", "tie", "both_bad")


@pytest.fixture
def browser():
    with web.chromium() as b:
        yield b


@pytest.fixture
def app(tmp_path, tiny_model_dir):
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir, max_new_tokens=12))
    gate = DecodeGate(ctx.holder.current()[1])
    yield url, ctx, gate
    gate.remove()
    close()


def box(page, selector: str) -> dict:
    return page.locator(selector).bounding_box()


def a_word(text: str) -> str:
    """A run of letters from a (random) answer, which survives Markdown rendering."""
    return max(re.findall(r"[A-Za-z]{3,}", text) or [""], key=len)


def latest_answer(ctx, message: str) -> str:
    conv = ctx.store.query("SELECT conversation_id FROM messages WHERE role = 'user' AND content = ?",
                           (message,))[-1]["conversation_id"]
    return ctx.store.conversation_messages(conv)[-1]["content"]


def expect_no_icon(page, label: str) -> None:
    """No visible ``label`` icon in the thread, once the page has settled (Gradio re-renders the
    message buttons after each update, so an immediate count can see the frame before the CSS)."""
    expect(page.locator(f"#chatbot button[aria-label='{label}']:visible")).to_have_count(0)


def hold_and_send(page, gate: DecodeGate, message: str) -> None:
    """Sends ``message`` with the engine held, so its answer stays unfinished."""
    gate.close()
    page.locator("#message textarea").fill(message)
    page.locator("#message textarea").press("Enter")
    assert gate.reached.wait(60), "the answer never started"


def expect_writing(page) -> None:
    """While an answer is written: Stop instead of Send, no pencil and no retry anywhere."""
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#send")).to_have_count(0)
    expect_no_icon(page, "Edit")
    expect_no_icon(page, "Retry")


def expect_idle(page) -> None:
    expect(page.locator("#send")).to_be_visible(timeout=60_000)
    expect(page.locator("#stop")).to_have_count(0)
    expect(page.locator("#chatbot button[aria-label='Retry']").last).to_be_visible()


def opacity(page, selector: str) -> float:
    return float(page.locator(selector).evaluate("e => getComputedStyle(e).opacity"))


def expect_full_colour(page, selector: str) -> None:
    """An enabled button is drawn in full colour (once its transition has ended)."""
    page.wait_for_function("(s) => getComputedStyle(document.querySelector(s)).opacity === '1'", arg=selector)


def open_pair(page, gate: DecodeGate) -> None:
    """Retry with the engine held: the pair opens in the thread while B is written."""
    gate.close()
    page.locator("#chatbot button[aria-label='Retry']").last.click()
    expect(page.locator("#compare")).to_be_visible()
    assert gate.reached.wait(60), "answer B never started"


def check_pair_in_thread(page, first: str, viewport: dict) -> None:
    """The pair sits under the conversation, above the composer, in view and focused; A is not
    also in the Chatbot; B is still writing, so the verdicts are greyed and say why."""
    expect(page.locator("#chatbot [data-testid='bot']")).to_have_count(0)  # A is shown once: in the pair
    expect(page.locator("#answer-a")).to_contain_text(a_word(first))
    chat, pair, composer = box(page, "#chatbot"), box(page, "#compare"), box(page, "#composer")
    assert chat["y"] + chat["height"] <= pair["y"] + 12 and pair["y"] + pair["height"] <= composer["y"] + 1
    assert page.evaluate("document.activeElement && document.activeElement.id") == "compare"
    assert pair["y"] < viewport["height"] and pair["y"] + min(pair["height"], viewport["height"]) > 0
    expect(page.locator("#compare-ready")).to_contain_text("B is still writing…")
    for verdict in VERDICTS:
        expect(page.locator(f"#vote-{verdict}")).to_be_disabled()
    assert opacity(page, "#vote-a") < 0.6
    expect_writing(page)


def check_pager(page, chosen: str, other: str, others: int) -> None:
    """After the decision the chosen answer continues; the pager shows the others read-only."""
    bar = page.locator("#alt-bar")
    expect(bar).to_contain_text(f"chosen over {others} other")
    expect(page.locator("#alt-pos")).to_contain_text(f"1/{others + 1}")
    expect(page.locator("#alt-answer")).to_have_count(0)
    expect(page.locator("#chatbot [data-testid='bot']").last).to_contain_text(a_word(chosen))
    expect(page.locator("#alt-prev")).to_be_disabled()
    page.locator("#alt-next").click()
    expect(page.locator("#alt-pos")).to_contain_text(f"2/{others + 1}")
    shown = page.locator("#alt-answer")
    expect(shown).to_contain_text("not chosen (read-only)")
    expect(shown).to_contain_text(a_word(other))
    assert shown.locator("textarea").count() == 0
    page.locator("#alt-prev").click()
    expect(page.locator("#alt-pos")).to_contain_text(f"1/{others + 1}")
    expect(page.locator("#alt-answer")).to_have_count(0)


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])
def test_retry_turns_the_latest_answer_into_the_pair_in_place_and_the_pager_keeps_both(app, browser, viewport):
    url, ctx, gate = app
    page = open_page(browser, url, viewport)
    send(page, ctx, "Compare in the thread")
    first = latest_answer(ctx, "Compare in the thread")
    open_pair(page, gate)
    check_pair_in_thread(page, first, viewport)
    screenshot(page, f"chat-thread-pair-writing-{viewport['width']}.png")
    gate.release()
    for verdict in VERDICTS:
        expect(page.locator(f"#vote-{verdict}")).to_be_enabled(timeout=60_000)
    expect(page.locator("#compare-ready")).not_to_contain_text("writing")
    expect_full_colour(page, "#vote-a")
    a, b = box(page, "#answer-a"), box(page, "#answer-b")
    if viewport is PHONE:  # the two answers stack, nothing wider than the phone
        assert b["y"] >= a["y"] + a["height"] - 1 and abs(a["x"] - b["x"]) < 2, (a, b)
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    else:
        assert b["x"] >= a["x"] + a["width"] - 1 and abs(a["y"] - b["y"]) < 2, (a, b)
    screenshot(page, f"chat-thread-pair-{viewport['width']}.png")
    comp = ctx.store.query("SELECT * FROM comparisons WHERE verdict IS NULL")[0]

    page.keyboard.press("2")  # the pair has the focus: 2 is "B is better" at once
    expect(page.locator("#status")).to_contain_text("Recorded: B is better.")
    expect(page.locator("#compare")).to_have_count(0)
    assert ctx.store.comparison(comp["id"])["verdict"] == "b"
    check_pager(page, comp["b_text"], comp["a_text"], 1)
    screenshot(page, f"chat-thread-pager-{viewport['width']}.png")


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])
def test_one_send_stop_button_and_a_message_sent_while_writing_is_kept(app, browser, viewport):
    url, ctx, gate = app
    page = open_page(browser, url, viewport)
    expect(page.locator("#send")).to_be_visible()
    expect(page.locator("#stop")).to_have_count(0)
    send(page, ctx, "The first question")
    hold_and_send(page, gate, "The second question")
    expect(page.locator("#chatbot")).to_contain_text("The second question")
    expect_writing(page)
    expect(page.locator("#chatbot button[aria-label='Like']:visible")).to_have_count(1)  # the first answer only

    box_ = page.locator("#message textarea")
    box_.fill("A third question typed meanwhile")
    box_.press("Enter")  # the bug: the box was cleared and the message dropped
    expect(page.get_by_text("an answer is still being written").first).to_be_visible()
    expect(box_).to_have_value("A third question typed meanwhile")
    expect(page.locator("#chatbot")).to_contain_text("The second question")  # the stream stays in view
    expect_writing(page)
    screenshot(page, f"chat-thread-writing-{viewport['width']}.png", full_page=False)
    gate.release()
    expect_idle(page)
    assert idle(ctx)
    assert not ctx.store.query("SELECT id FROM messages WHERE content = ?", ("A third question typed meanwhile",))
    box_.press("Enter")  # now it is taken
    expect(page.locator("#chatbot [data-testid='user']").last).to_contain_text("A third question typed meanwhile",
                                                                              timeout=60_000)
    expect_idle(page)
    assert idle(ctx)

    hold_and_send(page, gate, "Stop this one")
    page.locator("#stop").click()
    gate.release()
    expect(page.locator("#status")).to_contain_text("Stop")
    expect_idle(page)


def pick(page, label: str, rank: int) -> None:
    page.locator(f"#rank-{label} label:has(input[value='{rank}'])").click()


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])
def test_ranking_readiness_and_a_refusal_meanwhile_keeps_the_ranks(app, browser, viewport):
    url, ctx, gate = app
    page = open_page(browser, url, viewport)
    send(page, ctx, "Rank in the thread")
    page.locator("#chatbot button[aria-label='Retry']").last.click()
    expect(page.locator("#compare-more")).to_be_enabled(timeout=60_000)
    gate.close()
    page.locator("#compare-more").click()
    assert gate.reached.wait(60), "answer C never started"
    expect(page.locator("#rank-row")).to_be_visible()
    for label in "cd":  # an answer still "…" cannot be ranked
        expect(page.locator(f"#rank-{label} input[value='1']")).to_be_disabled()
    expect(page.locator("#rank-a input[value='1']")).to_be_enabled()
    pick(page, "a", 2)
    pick(page, "b", 3)
    expect(page.locator("#rank-order")).to_contain_text("C and D are still writing")
    expect(page.locator("#rank-submit")).to_be_disabled()
    assert opacity(page, "#rank-submit") < 0.6

    # a refused action meanwhile (a message) keeps the four answers and the ranks given
    page.locator("#message textarea").fill("Sent while C is written")
    page.locator("#message textarea").press("Enter")
    expect(page.get_by_text("an answer is still being written").first).to_be_visible()
    expect(page.locator("#message textarea")).to_have_value("Sent while C is written")
    page.wait_for_timeout(500)  # the page's redraw after the refusal
    expect(page.locator("#rank-row")).to_be_visible()
    expect(page.locator("#rank-a input[value='2']")).to_be_checked()
    expect(page.locator("#rank-b input[value='3']")).to_be_checked()
    expect(page.locator("#rank-c input[value='1']")).to_be_disabled()
    expect(page.locator("#vote-a")).to_have_count(0)
    screenshot(page, f"chat-thread-rank-writing-{viewport['width']}.png")

    gate.release()
    expect(page.locator("#rank-c input[value='1']")).to_be_enabled(timeout=60_000)
    assert idle(ctx)
    expect(page.locator("#rank-order")).to_contain_text("Give C and D a rank.")
    expect(page.locator("#rank-a input[value='2']")).to_be_checked()
    pick(page, "c", 1)
    expect(page.locator("#rank-order")).to_contain_text("Give D a rank.")
    expect(page.locator("#rank-submit")).to_be_disabled()
    pick(page, "d", 4)
    expect(page.locator("#rank-submit")).to_be_enabled()
    expect_full_colour(page, "#rank-submit")
    expect(page.locator("#rank-order")).to_contain_text("Your order: C > A > B > D")
    if viewport is PHONE:
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    screenshot(page, f"chat-thread-rank-{viewport['width']}.png")
    comp = ctx.store.query("SELECT * FROM comparisons WHERE verdict IS NULL")[0]
    page.locator("#rank-submit").click()
    expect(page.locator("#status")).to_contain_text("answer C continues the chat")
    extras = ctx.store.comparison(comp["id"])
    assert extras["verdict"] == "rank"
    check_pager(page, latest_answer(ctx, "Rank in the thread"), comp["a_text"], 3)


def rating_rows(ctx) -> list[dict]:
    return ctx.store.query("SELECT thumb, reasons, generation_id FROM ratings ORDER BY created_at")


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])
def test_the_rating_popover_rates_the_clicked_answer_once(app, browser, viewport):
    url, ctx, gate = app
    page = open_page(browser, url, viewport)
    send(page, ctx, "Rate me")
    expect(page.get_by_label("Answer number (0 = the latest)")).to_have_count(0)
    expect(page.locator("#rate-pop")).to_have_count(0)
    dislike = page.locator("#chatbot button[aria-label='Dislike']").last
    at = dislike.bounding_box()
    dislike.click()
    pop = page.locator("#rate-pop")
    expect(pop).to_be_visible()
    expect(pop).to_contain_text("Rate answer 1")
    placed = box(page, "#rate-pop")
    assert placed["y"] >= 0 and placed["y"] + placed["height"] <= viewport["height"] + 1, placed
    assert placed["x"] >= 0 and placed["x"] + placed["width"] <= viewport["width"] + 1, placed
    if viewport is DESKTOP:  # beside the clicked 👎
        assert abs(placed["y"] - (at["y"] + at["height"])) < 40 or placed["y"] + placed["height"] <= at["y"] + 1, (
            placed, at)
    assert page.evaluate("""() => {  // on top: nothing (the sidebar) covers its corners
        const r = document.getElementById("rate-pop").getBoundingClientRect();
        return [[r.left + 6, r.top + 6], [r.right - 6, r.bottom - 6]].every(
            ([x, y]) => document.elementFromPoint(x, y)?.closest("#rate-pop"));
    }""")
    pop.get_by_label("too long").check()
    page.locator("#rate-send").click()
    done = page.locator("#rate-done")
    expect(done).to_contain_text("Thanks — rating saved: 👎 for answer 1 (too long).")
    screenshot(page, f"chat-thread-rating-{viewport['width']}.png", full_page=False)
    page.locator("#rate-send").click()  # a double submit
    expect(done).to_contain_text("Not saved: this rating was already saved")
    assert [(r["thumb"], r["reasons"]) for r in rating_rows(ctx)] == [("down", '["too long"]')]
    page.locator("#rate-close").click()
    expect(pop).to_have_count(0)

    # while the next answer is written: 👍 on the first one, confirmed at once, stored once
    hold_and_send(page, gate, "Rate while writing")
    expect_writing(page)
    page.locator("#chatbot button[aria-label='Like']:visible").first.click()
    expect(pop).to_be_visible()
    page.locator("#rate-send").click()
    expect(done).to_contain_text("Thanks — rating saved: 👍 for answer 1.")
    page.locator("#rate-send").click()
    expect(done).to_contain_text("Not saved: this rating was already saved")
    gate.release()
    expect_idle(page)
    assert idle(ctx)
    rows = rating_rows(ctx)
    assert [r["thumb"] for r in rows] == ["down", "up"] and rows[0]["generation_id"] == rows[1]["generation_id"]


def test_retry_is_not_offered_on_the_users_own_rewrite(app, browser):
    url, ctx, gate = app
    page = open_page(browser, url, DESKTOP)
    send(page, ctx, "Rewrite me")
    page.locator("#chatbot button[aria-label='Edit']").last.click()
    page.locator("#chatbot textarea").fill("My own better answer.")
    page.locator("#chatbot button[aria-label='Submit']").click()
    expect(page.locator("#status")).to_contain_text("Recorded: your rewrite")
    expect(page.locator("#chatbot")).to_have_class(re.compile(r"\brewrite-latest\b"))
    expect_no_icon(page, "Retry")
    expect(page.locator("#regenerate")).to_have_attribute("title", re.compile("your own rewrite"))
    page.locator("#regenerate").click()  # refused as a toast, nothing opens, no red error
    expect(page.get_by_text("the latest answer is your own rewrite").first).to_be_visible()
    expect(page.locator("#compare")).to_have_count(0)
    expect(page.locator("#chatbot")).to_contain_text("My own better answer.")
    assert not ctx.store.query("SELECT id FROM comparisons WHERE verdict IS NULL")


@pytest.mark.parametrize("viewport", [DESKTOP, PHONE], ids=["1280", "390"])
def test_an_edited_message_pages_between_its_versions(app, browser, viewport):
    url, ctx, gate = app
    page = open_page(browser, url, viewport)
    send(page, ctx, "The original question")
    expect(page.locator("#branch-bar")).to_have_count(0)  # nothing edited yet
    page.locator("#chatbot button[aria-label='Edit']").first.click()
    page.locator("#chatbot textarea").fill("The edited question")
    page.locator("#chatbot button[aria-label='Submit']").click()
    expect(page.locator("#status")).to_contain_text("Your edit starts a new chat", timeout=60_000)
    assert idle(ctx)
    chat, pos = page.locator("#chatbot"), page.locator("#branch-pos")
    expect(pos).to_contain_text("Message 1 has 2 versions · 2/2 (your edit)")
    expect(chat).to_contain_text("The edited question")
    expect(page.locator("#branch-next")).to_be_disabled()
    screenshot(page, f"chat-thread-branch-{viewport['width']}.png")
    page.locator("#branch-prev").click()
    expect(pos).to_contain_text("1/2 (the original)")
    expect(chat).to_contain_text("The original question")
    expect(chat).not_to_contain_text("The edited question")
    page.locator("#branch-next").click()
    expect(pos).to_contain_text("2/2 (your edit)")
    expect(chat).to_contain_text("The edited question")
    if viewport is PHONE:
        assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
