"""Ranking four answers and edit in place, in a real headless browser (Debian's chromium via
Playwright): the retry icon's comparison, **Compare more**, a rank per answer and **Submit
ranking** (by mouse on a desktop, by keyboard on a phone); the Chatbot's own edit button on
an answer (a rewrite) and on a user message (a branch listed in the sidebar).  Screenshots go
to ``artifacts/`` (``chat-rank4.png``, ``chat-rank4-390.png``, ``chat-edit.png``,
``chat-edit-390.png``).

Skipped when the ``playwright`` package or ``/usr/bin/chromium`` is missing
(``pip install playwright`` and ``apt-get install chromium``; never ``playwright install``).
"""

from __future__ import annotations

import json
import re

import pytest

from tests.browser import (
    DESKTOP,
    PHONE,
    DecodeGate,
    chromium,
    expect,
    idle,
    needs_chromium,
    open_page,
    screenshot,
    send,
)
from tests.factories import app_settings, launch_app

pytestmark = needs_chromium


@pytest.fixture
def browser():
    with chromium() as b:
        yield b


def box(page, selector: str) -> dict:
    return page.locator(selector).bounding_box()


def a_word(text: str) -> str:
    """A run of letters from a (random) answer, which survives Markdown rendering."""
    return max(re.findall(r"[A-Za-z]{3,}", text) or [""], key=len)


def conversation_of(store, message: str) -> str:
    rows = store.query("SELECT conversation_id FROM messages WHERE role = 'user' AND content = ?", (message,))
    assert rows, message
    return rows[0]["conversation_id"]


def pick(page, label: str, rank: int) -> None:
    """Clicks rank ``rank`` of answer ``label`` (a, b, c, d) with the mouse."""
    page.locator(f"#rank-{label} label:has(input[value='{rank}'])").click()


def open_four(page, ctx, gate: DecodeGate | None = None) -> None:
    """The retry icon, B complete, then Compare more (held at its first token when ``gate``)."""
    page.locator("#chatbot button[aria-label='Retry']").last.click()
    expect(page.locator("#compare-more")).to_be_enabled(timeout=60_000)
    if gate:
        gate.close()
    page.locator("#compare-more").click()
    expect(page.locator("#rank-row")).to_be_visible()


def test_retry_compare_more_and_rank_four(tmp_path, tiny_model_dir, browser):
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir, max_new_tokens=24))
    gate = DecodeGate(ctx.holder.current()[1])
    try:
        page = open_page(browser, url, DESKTOP)
        send(page, ctx, "Rank four answers please")
        open_four(page, ctx, gate)
        assert gate.reached.wait(60), "answer C never started"
        # while C and D are written: the verdicts and their keys are gone, Submit is disabled
        for verdict in ("a", "b", "tie", "both_bad"):
            expect(page.locator(f"#vote-{verdict}")).to_have_count(0)
        expect(page.locator("#compare-keys")).to_have_count(0)
        expect(page.locator("#compare-title")).to_contain_text("Rank the four answers")
        pick(page, "a", 2)  # A and B can be ranked meanwhile; C and D once they are complete
        pick(page, "b", 4)
        expect(page.locator("#rank-c input[value='1']")).to_be_disabled()
        expect(page.locator("#rank-submit")).to_be_disabled()  # C and D are not complete yet
        gate.release()
        expect(page.locator("#rank-c input[value='1']")).to_be_enabled(timeout=60_000)
        pick(page, "c", 1)
        pick(page, "d", 2)
        expect(page.locator("#rank-order")).to_contain_text("Your order: C > A = D > B")
        expect(page.locator("#rank-submit")).to_be_enabled()  # the ranks picked meanwhile stay
        assert idle(ctx)
        comp = ctx.store.query("SELECT * FROM comparisons WHERE verdict IS NULL")
        assert len(comp) == 1 and comp[0]["extra_answers"]
        texts = {"A": comp[0]["a_text"], "B": comp[0]["b_text"],
                 **{e["label"]: e["text"] for e in json.loads(comp[0]["extra_answers"])}}
        for label in "abcd":  # every answer rendered as Markdown
            expect(page.locator(f"#answer-{label} [data-testid='markdown']")).to_have_count(1)
            expect(page.locator(f"#answer-{label}")).to_contain_text(a_word(texts[label.upper()]))

        # a 2x2 grid: A | B over C | D
        a, b, c, d = (box(page, f"#answer-{k}") for k in "abcd")
        assert abs(a["y"] - b["y"]) < 2 and b["x"] >= a["x"] + a["width"] - 1, (a, b)
        assert abs(c["y"] - d["y"]) < 2 and abs(c["x"] - a["x"]) < 2 and c["y"] >= a["y"] + a["height"], (a, c)

        # the A/B keys do nothing while four are ranked (the focus is not in a text field)
        page.locator("#compare-title").click()
        for key in ("1", "2", "a", "t", "x"):
            page.keyboard.press(key)
        page.wait_for_timeout(300)
        expect(page.locator("#status")).not_to_contain_text("Recorded")
        assert ctx.store.comparison(comp[0]["id"])["verdict"] is None

        # an order without a first place is not valid
        for label in "abcd":
            pick(page, label, 2)
        expect(page.locator("#rank-order")).to_contain_text("Give the best answer rank 1")
        expect(page.locator("#rank-submit")).to_be_disabled()
        for label, rank in zip("abcd", (2, 4, 1, 2)):
            pick(page, label, rank)
        expect(page.locator("#rank-submit")).to_be_enabled()
        screenshot(page, "chat-rank4.png")

        page.locator("#rank-submit").click()
        expect(page.locator("#status")).to_contain_text(
            "Recorded: your ranking C > A = D > B; answer C continues the chat.")
        expect(page.locator("#compare")).to_have_count(0)
        row = ctx.store.comparison(comp[0]["id"])
        assert row["verdict"] == "rank" and json.loads(row["ranking"]) == [["C"], ["A", "D"], ["B"]]
        kept = ctx.store.conversation_messages(row["conversation_id"])[1]
        assert kept["content"] == texts["C"]
        expect(page.locator("#chatbot")).to_contain_text(a_word(texts["C"]))

        # on a phone: the four answers stack, nothing is wider than the screen; ranked by keyboard
        phone = open_page(browser, url, PHONE)
        send(phone, ctx, "Rank on a phone")
        open_four(phone, ctx)
        expect(phone.locator("#answer-d")).not_to_contain_text("…", timeout=60_000)
        assert idle(ctx)
        boxes = [box(phone, f"#answer-{k}") for k in "abcd"]
        for upper, lower in zip(boxes, boxes[1:]):
            assert lower["y"] >= upper["y"] + upper["height"] - 1 and abs(lower["x"] - upper["x"]) < 2, boxes
        assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        for label, rank in zip("abcd", (3, 1, 4, 2)):
            phone.locator(f"#rank-{label} input[value='{rank}']").focus()
            phone.keyboard.press("Space")
        expect(phone.locator("#rank-order")).to_contain_text("Your order: B > D > A > C")
        screenshot(phone, "chat-rank4-390.png")
        phone.locator("#rank-submit").focus()
        phone.keyboard.press("Enter")
        expect(phone.locator("#status")).to_contain_text("answer B continues the chat.")
        conv = conversation_of(ctx.store, "Rank on a phone")
        ranked = ctx.store.query("SELECT ranking FROM comparisons WHERE conversation_id = ?", (conv,))
        assert [json.loads(r["ranking"]) for r in ranked] == [[["B"], ["D"], ["A"], ["C"]]]
    finally:
        gate.remove()
        close()


def edit(page, nth: int, text: str) -> None:
    """The Chatbot's own edit button on message ``nth`` (0 = the first), new text, its Submit."""
    page.locator("#chatbot button[aria-label='Edit']").nth(nth).click()
    area = page.locator("#chatbot textarea")
    expect(area).to_have_count(1)
    area.fill(text)
    page.locator("#chatbot button[aria-label='Submit']").click()


def test_edit_in_place_an_answer_and_a_user_message(tmp_path, tiny_model_dir, browser):
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir, max_new_tokens=16))
    try:
        page = open_page(browser, url, DESKTOP)
        send(page, ctx, "Plan a trip to Lisbon")
        send(page, ctx, "What should I eat there?")
        original = conversation_of(ctx.store, "Plan a trip to Lisbon")
        before = ctx.store.conversation_messages(original)

        # the latest answer: a rewrite, in place
        edit(page, 3, "Try pastel de nata in Belém.")
        expect(page.locator("#status")).to_contain_text("Recorded: your rewrite is stored as better")
        expect(page.locator("#chatbot")).to_contain_text("Try pastel de nata in Belém.")
        rewrite = ctx.store.query("SELECT * FROM comparisons WHERE conversation_id = ?", (original,))
        assert [(r["verdict"], r["a_text"], r["b_text"], r["turn"]) for r in rewrite] == [
            ("edit", before[3]["content"], "Try pastel de nata in Belém.", 3)]
        assert ctx.store.conversation_messages(original)[3]["content"] == "Try pastel de nata in Belém."

        # a refused edit (nothing changed) loses nothing
        edit(page, 0, "Plan a trip to Lisbon")
        expect(page.get_by_text("the edited message is the same as before; nothing was changed")).to_be_visible()
        expect(page.locator("#chatbot")).to_contain_text("What should I eat there?")  # shown, not covered
        expect(page.locator("#chatbot [data-testid='status-tracker'] .error")).to_have_count(0)
        assert len(ctx.store.owner_conversations(ctx.store.query("SELECT owner FROM sessions")[0]["owner"])) == 1

        # a user message: the chat branches there, and the branch is listed beside the original
        edit(page, 2, "What should I see there?")
        expect(page.locator("#status")).to_contain_text("Your edit starts a new chat")
        assert idle(ctx)
        branch = conversation_of(ctx.store, "What should I see there?")
        assert branch != original
        msgs = ctx.store.conversation_messages(branch)
        assert [m["content"] for m in msgs[:3]] == ["Plan a trip to Lisbon", before[1]["content"],
                                                    "What should I see there?"]
        gen = ctx.store.generation(msgs[3]["generation_id"])
        assert json.loads(gen["context"])[-1] == {"role": "user", "content": "What should I see there?"}
        chat = page.locator("#chatbot")
        expect(chat).to_contain_text("What should I see there?")
        expect(chat).not_to_contain_text("What should I eat there?")
        expect(chat).to_contain_text(a_word(msgs[3]["content"]))
        chats = page.locator("#chat-list")
        expect(chats).to_contain_text("(edited) · Plan a trip to Lisbon")
        expect(chats.locator("input:checked")).to_have_count(1)
        assert [m["content"] for m in ctx.store.conversation_messages(original)][2:] == [
            "What should I eat there?", "Try pastel de nata in Belém."]  # the original is intact
        screenshot(page, "chat-edit.png")

        # the original is still there to reopen
        chats.get_by_text("Plan a trip to Lisbon", exact=True).click()
        expect(chat).to_contain_text("What should I eat there?")

        # on a phone: the edit box fits the screen; editing the first message branches too
        phone = open_page(browser, url, PHONE)
        send(phone, ctx, "A question from a phone")
        phone.locator("#chatbot button[aria-label='Edit']").first.click()
        expect(phone.locator("#chatbot textarea")).to_have_count(1)
        phone.locator("#chatbot textarea").fill("An edited question from a phone")
        assert phone.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
        screenshot(phone, "chat-edit-390.png", full_page=False)
        phone.locator("#chatbot button[aria-label='Submit']").click()
        expect(phone.locator("#status")).to_contain_text("Your edit starts a new chat")
        assert idle(ctx)
        phone_branch = conversation_of(ctx.store, "An edited question from a phone")
        assert len(ctx.store.conversation_messages(phone_branch)) == 2
        assert len(ctx.store.conversation_messages(conversation_of(ctx.store, "A question from a phone"))) == 2
    finally:
        close()
