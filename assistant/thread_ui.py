"""The chat thread's look and state, for ``assistant.ui``: the comparison in the thread (the
latest answer becomes answer A of the pair, so the Chatbot leaves it out while the pair is
open), the pager over the answers a vote or a ranking did not choose, the one Send/Stop
button, the message icons only once an answer is complete, readiness lines (who is still
writing, why *Submit ranking* is disabled) and the rating popover at the message.

Plain functions of a ``ChatSession`` (what the page shows is derived from the session the
server keeps, so a refused action, which changes nothing, redraws the same thing), plus the
CSS and the page script that ``assistant.ui`` adds to its own.
"""

from __future__ import annotations

import gradio as gr

from assistant.chat import ChatSession, plural

WRITING_NOTE = "{} is still writing…"
RANKS_WRITING = "C and D are still writing…: rank them once they are complete."
BUSY_CLASS, REWRITE_CLASS = "busy", "rewrite-latest"

CSS = """
#compare { margin-top: -8px; border-top: 3px solid var(--color-accent); }
#compare:focus { outline: 2px solid var(--color-accent); outline-offset: 2px; }
#verdicts button:not(:disabled) { background: var(--button-primary-background-fill);
    color: var(--button-primary-text-color); border-color: var(--button-primary-border-color); }
#verdicts button:disabled, #rank-submit:disabled, #compare-more:disabled { opacity: 0.45; filter: grayscale(1);
    cursor: not-allowed; }
#compare-ready, #rank-why { font-style: italic; opacity: 0.85; }
#chatbot.busy button[aria-label='Edit'], #chatbot.busy button[aria-label='Retry'],
#chatbot.busy .message-wrap > .message-buttons:last-child,
#chatbot.rewrite-latest .message-wrap > .message-buttons:last-child button[aria-label='Retry'] {
    display: none !important; }
#branch-bar { align-items: center; gap: 6px; flex-wrap: nowrap; margin-top: -8px; }
#branch-bar > button { flex: 0 0 auto; min-width: 2.4em !important; }
#branch-pos { flex: 1 1 auto; opacity: 0.85; }
#alt-bar { align-items: center; gap: 6px; flex-wrap: nowrap; margin-top: -8px; }
#alt-bar > button { flex: 0 0 auto; min-width: 2.4em !important; }
#alt-tag { flex: 1 1 auto; opacity: 0.8; }
#alt-pos { flex: 0 0 auto; width: auto; min-width: 3em; text-align: center; }
#alt-answer { border: 1px dashed var(--border-color-primary); border-radius: var(--radius-lg);
    padding: 8px 12px; max-height: 20em; overflow: auto; }
#rate-pop { position: fixed; z-index: 1000; top: 20vh; left: calc(50vw - 13em); width: min(26em, calc(100vw - 24px));
    box-shadow: var(--shadow-drop-lg); background: var(--background-fill-primary); }
#rate-done { font-weight: 600; }
/* the Chatbot's edit box: as wide as the message column, whatever the message's length */
#chatbot .message-row:has(textarea), #chatbot .message-row:has(textarea) .message,
#chatbot .message-row:has(textarea) .bubble-wrap, #chatbot .message:has(textarea) {
    width: 100% !important; max-width: 100% !important; }
#chatbot .message-row textarea { width: 100% !important; min-height: 6em; box-sizing: border-box; }
#char-count { font-size: var(--text-sm); opacity: 0.7; text-align: right; min-height: 1.2em; margin-top: -6px; }
#char-count.over { color: var(--error-text-color, #dc2626); opacity: 1; font-weight: 600; }
@media (max-width: 600px) {
  #rate-pop { left: 12px !important; right: 12px; top: auto !important; bottom: 12px; width: auto; }
}
"""

# When the pair opens it is scrolled into view and focused (so 1-4 work at once); the rating
# popover opens beside the 👍/👎 that was clicked; Regenerate says why it is disabled.
HEAD = """<script>
(() => {
  let thumbAt = null, compareShown = false, rateShown = false;
  document.addEventListener("click", (event) => {
    const thumb = event.target.closest && event.target.closest(
      "#chatbot button[aria-label='Like'], #chatbot button[aria-label='Dislike']");
    if (thumb) thumbAt = thumb.getBoundingClientRect();
  }, true);
  const placeRating = (pop) => {
    if (!thumbAt || window.matchMedia("(max-width: 600px)").matches) return;
    const width = pop.offsetWidth, height = pop.offsetHeight;
    const top = Math.min(thumbAt.bottom + 6, window.innerHeight - height - 8);
    const left = Math.max(8, Math.min(thumbAt.left - 24, window.innerWidth - width - 8));
    pop.style.top = Math.max(8, top) + "px";
    pop.style.left = left + "px";
  };
  const why = () => {
    const regen = document.querySelector("#regenerate");
    const chat = document.getElementById("chatbot");
    if (!regen || !chat) return;
    regen.title = chat.classList.contains("busy") ? "An answer is still being written"
      : chat.classList.contains("rewrite-latest") ? "The latest answer is your own rewrite: send a new message to compare answers"
      : "";
  };
  new MutationObserver(() => {
    const box = document.getElementById("compare");
    const shown = !!box && box.offsetParent !== null;
    if (shown && !compareShown) {
      box.tabIndex = -1;
      box.scrollIntoView({block: "nearest"});
      box.focus({preventScroll: true});
    }
    compareShown = shown;
    const pop = document.getElementById("rate-pop");
    const open = !!pop && pop.getClientRects().length > 0;  // fixed: no offsetParent
    if (open && !rateShown) placeRating(pop);
    rateShown = open;
    why();
  }).observe(document.documentElement, {childList: true, subtree: true, attributes: true,
                                       attributeFilter: ["class", "style"]});
  // the live character counter under the composer (the box is also set by the page: polled)
  const count = () => {
    const box = document.querySelector("#message textarea"), out = document.getElementById("char-count");
    if (!box || !out) return;
    const limit = Number(out.dataset.limit), n = box.value.length;
    const text = n ? `${n.toLocaleString("en")} / ${limit.toLocaleString("en")} characters`
      + (n > limit ? `: ${(n - limit).toLocaleString("en")} too many` : "") : "";
    if (out.textContent !== text) out.textContent = text;
    out.classList.toggle("over", n > limit);
  };
  document.addEventListener("input", count, true);
  setInterval(count, 400);
})();
</script>"""


def char_count(limit: int) -> str:
    """The counter's element (the page script fills it in as the user types)."""
    return f'<div id="char-count" data-limit="{int(limit)}" aria-live="polite"></div>'


def open_pair(sess: ChatSession | None, busy: bool) -> bool:
    """Whether the A | B pair is in the thread: an undecided comparison, or B being written."""
    if sess is None:
        return False
    comp = sess.comparison
    return (busy and sess.writing == "B") or (comp is not None and comp.verdict is None)


def shown_history(sess: ChatSession | None, busy: bool) -> list[dict]:
    """The Chatbot's messages: the session's, without the latest answer while it is answer A
    of an open pair (it is shown there)."""
    if sess is None:
        return []
    history = sess.history()
    if open_pair(sess, busy) and history and history[-1]["role"] == "assistant":
        return history[:-1]
    return history


def chat_classes(sess: ChatSession | None, busy: bool) -> list[str]:
    """``busy``: an answer is being written (no icons on it, no pencils, no retry);
    ``rewrite-latest``: the latest answer is the user's own rewrite (nothing to retry)."""
    latest = sess.messages[-1] if sess and sess.messages else None
    rewrite = latest is not None and latest["role"] == "assistant" and (latest.get("edited")
                                                                       or not latest.get("generation_id"))
    return [BUSY_CLASS] if busy else [REWRITE_CLASS] if rewrite else []


def chatbot_view(sess: ChatSession | None, busy: bool):
    """The Chatbot's update: its classes, and its messages unless an answer is streaming into it."""
    if busy and sess is not None and sess.writing == "answer":
        return gr.update(elem_classes=chat_classes(sess, busy))
    return gr.update(value=shown_history(sess, busy), elem_classes=chat_classes(sess, busy))


def send_stop(busy: bool):
    """The composer's one button: Send when idle, Stop while an answer is written."""
    return gr.update(visible=not busy), gr.update(visible=busy)


def pair_note(sess: ChatSession | None, busy: bool) -> str:
    """Under the pair: who is still writing, or nothing once the verdicts are enabled."""
    if not busy or sess is None:
        return ""
    return WRITING_NOTE.format(sess.writing if sess.writing in ("B", "C", "D") else "An answer")


def missing_note(values, labels) -> str:
    """Why a ranking is not complete yet: "Give D a rank." """
    missing = [label for label, v in zip(labels, values) if v in (None, "")]
    return f"Give {' and '.join(missing)} a rank." if missing else ""


def writing_view(history: list[dict] | None = None, note=None):
    """What the page shows the moment an answer starts: Stop instead of Send, no icons on the
    chat (``history``: its messages too), ``note`` under the pair (None: left as it is)."""
    chat = gr.update(elem_classes=[BUSY_CLASS]) if history is None else gr.update(
        value=history, elem_classes=[BUSY_CLASS])
    return (*send_stop(True), chat, gr.skip() if note is None else note)


# -- the answers a vote or a ranking did not choose -------------------------------------------
def alternatives(sess: ChatSession | None) -> list[tuple[str, str]]:
    """(label, text) of the latest answer's decided comparison, the chosen one first; [] when
    the latest answer was not chosen among others."""
    comp = sess.comparison if sess else None
    if comp is None or comp.verdict is None or not comp.winner or comp.turn != len(sess.messages) - 1:
        return []
    texts = comp.texts()
    return [(comp.winner, texts[comp.winner])] + [(k, t) for k, t in texts.items() if k != comp.winner]


def pager(sess: ChatSession | None, page: int):
    """The pager's parts: bar, tag, position, the read-only answer, page, ‹ and ›."""
    alts = alternatives(sess)
    if not alts:
        hidden = gr.update(visible=False)
        return hidden, "", "", hidden, 0, gr.update(interactive=False), gr.update(interactive=False)
    page = max(0, min(int(page or 0), len(alts) - 1))
    label, text = alts[page]
    tag = f"Answer {alts[0][0]} · chosen over {plural(len(alts) - 1, 'other')}"
    shown = f"**Answer {label}** · not chosen (read-only)\n\n{text}" if page else ""
    return (gr.update(visible=True), tag, f"{page + 1}/{len(alts)}",
            gr.update(value=shown, visible=bool(page)), page,
            gr.update(interactive=page > 0), gr.update(interactive=page < len(alts) - 1))


# -- the versions of an edited message (branches) -------------------------------------------------
def branch_target(family: tuple[int, list[str]] | None, current: str | None, step: int) -> str | None:
    """The chat ``step`` versions away from ``current`` (None past either end)."""
    if not family or current not in family[1]:
        return None
    k = family[1].index(current) + step
    return family[1][k] if 0 <= k < len(family[1]) else None


def branch_pager(family: tuple[int, list[str]] | None, current: str | None):
    """The edited message's pager: bar, its line, ‹ and ›."""
    if not family or current not in family[1]:
        hidden = gr.update(visible=False)
        return hidden, "", gr.update(interactive=False), gr.update(interactive=False)
    turn, ids = family
    k = ids.index(current)
    what = "the original" if k == 0 else "your edit" if len(ids) == 2 else f"edit {k}"
    line = f"Message {turn + 1} has {len(ids)} versions · **{k + 1}/{len(ids)}** ({what})"
    return (gr.update(visible=True), line, gr.update(interactive=k > 0), gr.update(interactive=k < len(ids) - 1))
