"""The end users' Gradio app: chat, regenerate-and-compare, ranking four answers, thumbs,
edit in place (rewrites and branches), opt-out, past chats and "delete my data".

All logic lives in ``assistant.chat``; this module only lays out components and wires
events.  Public API (what ``gradio_client`` sees; per-session state is kept by the server
for each client session, so one ``Client`` drives one conversation):

    /chat(message, system_prompt, temperature, top_p, max_new_tokens, seed)
        -> (chat_history, model_version, status)              streams
    /regenerate(temperature, top_p, max_new_tokens, seed)
        -> (answer_a, answer_b, model_version, status)        streams answer B; model_version
                                                                 is "" while a candidate is on
                                                                 trial (blind until the vote)
    /vote(verdict)  verdict in a | b | tie | both_bad        -> (chat_history, status)
    /compare_more(temperature, top_p, max_new_tokens, seed)
        -> (answer_c, answer_d, model_version, status)        streams C, then D
    /rank(order)  all four answers, best first: "C>A>D>B"; "=" between answers ranked
                  equal: "C>A=D>B" (labels case-insensitive)  -> (chat_history, status)
    /rate(answer, thumb, reasons, comment)  answer: 1-based, 0 = latest -> status
                  (the same rating of the same answer twice: refused as a duplicate)
    /edit(rewrite)  rewrite of the latest answer             -> (chat_history, status)
    /edit_message(index, text, temperature, top_p, max_new_tokens, seed)
        index: the message's position in chat_history (0 = the first user message)
        -> (chat_history, model_version, status)              streams a branch's new answer
    /opt_out(opt_out)                                         -> status
    /new_chat()                                               -> (chat_history, status)
    /stop()                                                   -> status
    /conversations()   this browser's chats, newest first
                       -> [{id, title, updated_at, messages, branch_of, renamed, name}]
    /open_conversation(conversation_id)  reopens one to continue it -> (chat_history, status)
    /rename_conversation(conversation_id, title)  "" = its first message again -> status
    /delete_conversation(conversation_id, confirm)  one chat, for good -> (chat_history, status)
    /delete_my_data(confirm)  confirm must be true            -> status (what was deleted, what
                                                                 training had already used)

Past chats belong to a secret key the server makes (``secrets.token_urlsafe``) and the
browser keeps (``gr.BrowserState``, whose storage key and secret are kept in the database so
a restart keeps them).  The key reaches the server only through the page's (private) load
event, which binds it to the server-side session (a malformed one is replaced by a new key);
every later call lists, opens or deletes with that session's key, never with one it is
sent (see ``assistant.chat``).  An API client's session gets its own key, so the calls
above see that session's chats only.

The sidebar lists the chats in date groups by the browser's clock (``assistant.chat_list``),
one line each, cut with an ellipsis, a branch marked "(edited) ·" first; the open chat has
Rename and Delete (a confirmation first).  The browser also keeps the id of its open chat,
so a reload reopens it (a new chat when it was a new chat, or is gone).  The header says in
plain words which model answers ("the original assistant", or "an update trained on users'
votes", its version id after it); a counter under the message box counts characters up
to ``--max-message-chars``; the page follows the system's light or dark mode (Gradio's theme).

The comparison opens from **Regenerate and compare** or the Chatbot's own retry icon, in the
thread (``assistant.thread_ui``): the latest answer becomes answer A of the pair, so the Chatbot
leaves it out while the pair is open, and the pair sits under the Chatbot, above the message
box, scrolled into view and focused; both answers are rendered as Markdown side by side
(stacked below 600 px), and the verdict buttons (keys 1-4 or a/b/t/x) are coloured and enabled
once answer B is complete (greyed, with "B is still writing…", until then).  After the vote
the chosen answer continues, tagged "chosen over 1 other", with a pager (‹ 1/2 ›) that shows
the others read-only.  Retry is not offered on the user's own rewrite (it would be refused).

The message box has one button: Send, or Stop while an answer is written; the message icons
(copy, thumbs, pencil, retry) of an answer appear once it is complete, and no pencil or retry
is offered while anything is written.  A message sent meanwhile is refused and stays in the
box; a refusal redraws the page from the session, so it never closes a comparison or clears
ranks already given.  👍/👎 open a rating popover at the message for that answer; every Send
says on its own line whether it was saved ("Thanks — rating saved") or refused (a duplicate).

**Compare more** (enabled with the verdicts) writes answers C and D to the same context, one
after the other, shown under A and B (a 2×2 grid, one column below 600 px); the user gives
each answer a rank from 1 (best) to 4 and presses **Submit ranking**, enabled once all four
answers are complete and every answer has a rank, one of them 1 (the line under the ranks
says what is missing: "Give D a rank.", "C and D are still writing…"; C and D take a rank once
they are complete).  Equal ranks are allowed
(answers the user finds equally good; the retrain reads them as ties).  The ranking is one
judgement; the best answer continues the chat (A when A shares the first place).  While four
answers are open the verdict buttons are gone and their keys do nothing, and ``/vote`` is
refused.  ``/compare_more`` needs an open comparison whose B is complete; ``/rank`` needs its
four answers, every label once; anything else is refused and stores nothing.

**Edit in place**: every message has the Chatbot's own edit (pencil) button; it calls
``/edit_message``.  Editing the latest answer is a rewrite (stored as preferred over the
model's answer; it continues the chat, as ``/edit`` does).  Editing an earlier answer or a
user message branches the chat: a new chat (listed under "Your chats" with "(edited)", and
its API title with " (edited)" after it, and made the current one) holds the messages before the edited one, then the
edited one: a rewritten answer (stored as preferred over the model's) or an edited question,
whose new answer is streamed.  The original chat and its votes stay as they were.  A refusal
(no such message, unchanged or empty text, an answer still being written) changes nothing.

``/rate`` stores each reason tag once; ``/opt_out`` is rate-limited per client address and
writes only a change.  A browser keeps at most ``--max-chats-per-browser`` chats (a new one
past it is refused with a message; all of them are listed).

What the page shows of a message (the Chatbot, the comparison's answers, and what the API
returns) has no images from other sites (``assistant.markup``; the store keeps the text as
written), and every page carries a Content-Security-Policy that loads images only from this
origin.  Every request goes through ``assistant.http_guard.HttpGuard``: a body over
``--max-request-bytes`` gets 413 before it is read, Gradio's upload route answers 403 (no
component takes files; ``UploadPolicy``), and so does its fetch-any-URL route.

Every other event is ``api_visibility="private"``.  Refusals raise ``gr.Error`` for API
clients.  In the page, sending a message, a verdict button and the Chatbot's edit run as
private events of their own that turn a refusal into a warning toast and leave the chat in
view (a ``gr.Error`` would cover the Chatbot until dismissed); a refused message goes back
into the box.  Confirmations ("Recorded: B is better") are returned only after the store has
committed.
"""

from __future__ import annotations

import functools
import inspect
import logging
import os
import secrets
from collections.abc import Callable

import gradio as gr
from starlette.middleware import Middleware

from assistant import chat_list, console, thread_ui
from assistant.chat import MAX_TITLE_CHARS, ChatError, ChatService, ChatSession, sampling
from assistant.context import AppContext
from assistant.http_guard import LINKS_HEAD, UPLOADS, HttpGuard, UploadPolicy, takes_uploads
from assistant.safe_components import SafeChatbot, SafeMarkdown
from assistant.serve import BASE_VERSION
from feedback import ranking
from feedback.store import REASON_TAGS, FeedbackStore, StoreError

log = logging.getLogger(__name__)

PRIVATE = "private"
VERDICT_BUTTONS = (("a", "A is better"), ("b", "B is better"), ("tie", "Tie"), ("both_bad", "Both are bad"))
NO_CHATS = "No chats yet. Your conversations will be listed here, so you can pick one up later."
CHAT_PLACEHOLDER = ("### How can I help?\nAsk anything. Rate an answer with the thumbs under it, press "
                    "its retry icon to see a second answer and pick the better one, or edit any message "
                    "with its pencil.")
COMPARE_TITLE = "**Compare the two answers** and pick the better one"
RANK_TITLE = "**Rank the four answers**: 1 = best"
RANK_HINT = "Give each answer a rank: **1** = best; the same number for answers that are equally good."
RANK_LABELS = ("A", "B", "C", "D")
RANK_CHOICES = ["1", "2", "3", "4"]

# The page's look on top of Gradio's theme: the comparison side by side, stacked on a narrow
# screen; the chat list as a list; nothing wider than a phone (390 px) needs.
CSS = """
#compare { padding: 10px; }
#compare-row, #rank-row { gap: 12px; flex-wrap: nowrap; }
#compare-row > .column, #rank-row > .column { min-width: 0 !important; flex: 1 1 0; }
#answer-a, #answer-b, #answer-c, #answer-d { border: 1px solid var(--border-color-primary);
    border-radius: var(--radius-lg); padding: 8px 12px; min-height: 4em; max-height: 28em; overflow: auto; }
#verdicts { flex-wrap: wrap; gap: 8px; }
#verdicts button { flex: 1 1 8em; }
.rank-pick { padding: 0 !important; }
.rank-pick .wrap { gap: 6px; flex-wrap: nowrap; }
.rank-pick label { min-width: 2.6em; justify-content: center; }
#more-row, #rank-actions { align-items: center; gap: 8px; flex-wrap: wrap; }
#more-hint { flex: 1 1 16em; opacity: 0.8; }
#compare-more { flex: 0 0 auto; min-width: 10em; }
#rank-order { flex: 1 1 16em; }
#rank-submit { flex: 0 0 auto; min-width: 10em; }
#update-notice { padding: 6px 12px; border-radius: var(--radius-lg); background: var(--color-accent-soft); }
#header { flex-wrap: wrap; align-items: baseline; }
#compare-head { align-items: baseline; flex-wrap: wrap; }
#compare-keys { text-align: right; opacity: 0.75; }
#model-version { text-align: right; }
@media (max-width: 600px) {
  #compare-row, #rank-row { flex-direction: column; flex-wrap: wrap; }
  #compare-row > .column, #rank-row > .column { flex: 1 1 auto; width: 100%; }
  #rank-submit, #compare-more { flex: 1 1 100%; }
  #composer { flex-wrap: wrap; }
  #composer > .form { flex: 1 1 100% !important; }
  #compare-keys { display: none; }
  #actions { flex-wrap: wrap; }
  #model-version { text-align: left; }
}
"""

# Keyboard shortcuts for the verdicts while a comparison is open and the focus is not in a
# text field: 1 or a (A is better), 2 or b, 3 or t (tie), 4 or x (both bad).  A disabled
# button (answer B still being written) ignores its key, and while four answers are being
# ranked (``#rank-row`` shown) the keys do nothing.  On a narrow screen the chats
# sidebar (which covers the page there) starts closed and closes after picking a chat.
HEAD = """<script>
(() => {
  const narrow = () => window.matchMedia("(max-width: 700px)").matches;
  const closeSidebar = () => {
    const sidebar = document.getElementById("sidebar");
    if (sidebar && sidebar.classList.contains("open")) sidebar.querySelector(".toggle-button")?.click();
  };
  let touched = false;  // a sidebar the user opened is theirs: never closed for them
  document.addEventListener("pointerdown", (event) => {
    if (event.target.closest && event.target.closest("#sidebar .toggle-button")) { touched = true; watch.disconnect(); }
  }, true);
  const watch = new MutationObserver(() => {
    const sidebar = document.getElementById("sidebar");
    if (touched || !sidebar || !sidebar.classList.contains("open")) return;
    watch.disconnect();
    // once Svelte has wired the toggle (a click at once is lost)
    if (narrow()) [200, 800].forEach((ms) => setTimeout(() => touched || closeSidebar(), ms));
  });
  watch.observe(document.documentElement, {childList: true, subtree: true, attributes: true,
                                           attributeFilter: ["class"]});
  setTimeout(() => watch.disconnect(), 15000);
  document.addEventListener("change", (event) => {
    if (narrow() && event.target.closest && event.target.closest("#chat-list")) closeSidebar();
  });
  document.addEventListener("click", (event) => {
    if (narrow() && event.target.closest && event.target.closest("#sidebar-new")) closeSidebar();
  });

  const KEYS = {"1": "a", "a": "a", "2": "b", "b": "b", "3": "tie", "t": "tie", "4": "both_bad", "x": "both_bad"};
  document.addEventListener("keydown", (event) => {
    if (event.defaultPrevented || event.ctrlKey || event.metaKey || event.altKey || event.repeat) return;
    const verdict = KEYS[(event.key || "").toLowerCase()];
    if (!verdict) return;
    const target = event.target;
    if (target && (target.isContentEditable || /^(INPUT|TEXTAREA|SELECT)$/.test(target.tagName))) return;
    const box = document.getElementById("compare");
    if (!box || box.offsetParent === null) return;
    const ranking = document.getElementById("rank-row");
    if (ranking && ranking.offsetParent !== null) return;  // ranking four: the A/B keys are off
    const button = document.getElementById("vote-" + verdict);
    if (!button || button.disabled) return;
    event.preventDefault();
    button.click();
  });
})();
</script>"""


def _client(request: gr.Request | None) -> str | None:
    if request is None:
        return None
    try:
        return (request.headers.get("user-agent") or "")[:200] or None
    except AttributeError:
        return None


def _client_address(request: gr.Request | None) -> str | None:
    """The caller's network address, for limits and fair scheduling that must not reset with
    a new session.  Behind a reverse proxy listed in ``--trusted-proxies``, uvicorn takes it
    from the proxy's X-Forwarded-For (the right-most address not itself a trusted proxy)."""
    try:
        return request.client.host or None
    except AttributeError:
        return None


def _version_md(version: str) -> str:
    """The header's line on the model answering, in plain words (its version id after it)."""
    if not version:
        return ""
    if version == BASE_VERSION:
        return f"Answering: **the original assistant** (`{version}`)"
    return f"Answering: **an update trained on users' votes** (`{version}`)"


def browser_storage(store: FeedbackStore) -> dict:
    """Where and how the browser keeps its key (``gr.BrowserState``): the same storage key
    and encryption secret after a restart, or every browser's key would be lost with it."""
    keep = store.get_state("browser_storage")
    if not (isinstance(keep, dict) and keep.get("storage_key") and keep.get("secret")):
        keep = {"storage_key": "assistant-" + secrets.token_urlsafe(9), "secret": secrets.token_urlsafe(24)}
        store.set_state("browser_storage", keep)
    return keep


def _finish_note(sess: ChatSession) -> str:
    return {"cancelled": "Stopped.",
            "length": "The answer reached the max-new-tokens limit (see Settings)."}.get(sess.finish_reason or "", "")


def order_of_ranks(values) -> list[list[str]] | None:
    """The rank selectors' values (A, B, C, D; "1"-"4" or empty) -> the order's tiers, or
    None unless every answer has a rank and one of them is 1 (equal ranks: equally good)."""
    try:
        ranks = {label: int(v) for label, v in zip(RANK_LABELS, values) if v not in (None, "")}
    except (TypeError, ValueError):
        return None
    if len(ranks) != len(RANK_LABELS) or 1 not in ranks.values():
        return None
    return ranking.from_ranks(ranks)


def rank_note(values, writing: str = "") -> str:
    """What the ranking panel says under the answers: the order so far, or what is missing
    (so why *Submit ranking* is disabled), and whether C and D are still being written."""
    order = order_of_ranks(values)
    if order:
        shown = " > ".join(" = ".join(tier) for tier in order)
        note = f"Your order: **{shown}** · answer {ranking.best(order)} continues the chat."
    elif all(v not in (None, "") for v in values):
        note = "Give the best answer rank **1**."
    elif all(v in (None, "") for v in values):
        note = RANK_HINT
    else:
        note = thread_ui.missing_note(values, RANK_LABELS)
    return " ".join(filter(None, [thread_ui.RANKS_WRITING if writing in ("C", "D") else "", note]))


def _edited_text(value) -> str:
    """The Chatbot's edited text (``gr.EditData.value``): a string, or a list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return "".join(v if isinstance(v, str) else str(v.get("text") or "") if isinstance(v, dict) else ""
                       for v in value)
    return ""


def _errors_to_gradio(fn: Callable) -> Callable:
    """ChatError, and a StoreError the service lets through (too many chats), -> gr.Error (the
    message reaches the browser and API clients), for plain handlers and streaming (generator)
    ones alike."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)  # keeps the signature: Gradio injects gr.Request by it
        def streaming(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (ChatError, StoreError) as exc:
                raise gr.Error(str(exc), print_exception=False) from None
        return streaming

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (ChatError, StoreError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
    return wrapper


def build_app(ctx: AppContext, uploads: UploadPolicy = UPLOADS) -> gr.Blocks:
    """The whole web app: the chat page and, when available, the maintainers' console."""
    s = ctx.settings
    service = ChatService(s, ctx.store, ctx.holder)
    ctx.extras["chat_service"] = service
    ctx.extras["uploads"] = uploads  # ``launch`` sets the size limit, Blocks the cleaning
    ctx.store.max_chats_per_owner = s.max_chats_per_browser

    # -- handlers -----------------------------------------------------------------------
    def caller(state: ChatSession | None, request: gr.Request | None) -> ChatSession:
        """The calling page's session, with its user agent and network address."""
        return service.session(state, _client(request), _client_address(request))

    @_errors_to_gradio
    def chat(message: str, system_prompt: str, temperature: float, top_p: float, max_new_tokens: int,
             seed: int, state: ChatSession | None, request: gr.Request):
        """Sends a user message; streams the conversation with the growing answer."""
        sess = caller(state, request)
        params = sampling(temperature, top_p, max_new_tokens, seed, s)
        shown = sess.history() + [{"role": "user", "content": message}]
        for text in service.chat(sess, message, params, system_prompt):
            yield shown + [{"role": "assistant", "content": text}], gr.skip(), "", sess
        yield sess.history(), _version_md(sess.shown_version), _finish_note(sess), sess

    def chat_in_page(message: str, system_prompt: str, temperature: float, top_p: float, max_new_tokens: int,
                     seed: int, state: ChatSession | None, request: gr.Request):
        """Private: the page's chat (the same as /chat).  A refusal is a warning toast, the chat
        is shown as it was and the message goes back into the box (an error would cover the
        Chatbot until dismissed)."""
        try:
            for out in chat(message, system_prompt, temperature, top_p, max_new_tokens, seed, state, request):
                yield *out, gr.skip()
        except gr.Error as exc:
            gr.Warning(exc.message)
            sess = state if isinstance(state, ChatSession) else None
            busy = sess is not None and service.generating(sess)  # another answer streams on: left alone
            yield thread_ui.chatbot_view(sess, busy), gr.skip(), gr.skip(), state, message

    @_errors_to_gradio
    def regenerate(temperature: float, top_p: float, max_new_tokens: int, seed: int,
                   state: ChatSession | None, request: gr.Request):
        """Writes a second answer (B) to the latest answer's context and shows A and B."""
        sess = caller(state, request)
        params = sampling(temperature, top_p, max_new_tokens, seed, s)
        a_text = sess.messages[-1]["content"] if sess.messages else ""
        for text in service.regenerate(sess, params):
            yield a_text, text, gr.skip(), "", sess
        comp = sess.comparison
        yield (comp.a_text, comp.b_text, _version_md(sess.shown_version),
               " ".join(filter(None, ["Which answer is better?", _finish_note(sess)])), sess)

    def regenerate_in_page(temperature: float, top_p: float, max_new_tokens: int, seed: int,
                           state: ChatSession | None, request: gr.Request):
        """Private: the page's regenerate (the same as /regenerate); a refusal is a warning toast
        and the pair is redrawn from the session (an error would cover the answers)."""
        try:
            yield from regenerate(temperature, top_p, max_new_tokens, seed, state, request)
        except gr.Error as exc:
            gr.Warning(exc.message)
            yield gr.skip(), gr.skip(), gr.skip(), gr.skip(), state

    @_errors_to_gradio
    def vote(verdict: str, state: ChatSession | None, request: gr.Request):
        """Says which of the compared answers is better: a, b, tie or both_bad."""
        sess = caller(state, request)
        note = service.vote(sess, verdict)
        return sess.history(), note, sess

    def vote_button(verdict: str):
        """Private: a verdict button; a refusal is a warning toast (an error would cover the Chatbot)."""
        def fn(state: ChatSession | None, request: gr.Request):
            try:
                return vote(verdict, state, request)
            except gr.Error as exc:
                gr.Warning(exc.message)
                return gr.skip(), gr.skip(), state
        return fn

    @_errors_to_gradio
    def compare_more(temperature: float, top_p: float, max_new_tokens: int, seed: int,
                     state: ChatSession | None, request: gr.Request):
        """Writes answers C and D to the open comparison's context (one after the other), to rank all four."""
        sess = caller(state, request)
        params = sampling(temperature, top_p, max_new_tokens, seed, s)
        for c_text, d_text in service.compare_more(sess, params):
            yield c_text, d_text or gr.skip(), gr.skip(), "", sess
        texts = sess.comparison.texts()
        yield (texts["C"], texts["D"], _version_md(sess.shown_version),
               " ".join(filter(None, ["Rank the four answers: 1 = best.", _finish_note(sess)])), sess)

    @_errors_to_gradio
    def rank(order: str, state: ChatSession | None, request: gr.Request):
        """Ranks the four answers, best first: "C>A>D>B", with "=" between answers ranked equal."""
        sess = caller(state, request)
        note = service.rank(sess, order)
        return sess.history(), note, sess

    @_errors_to_gradio
    def submit_ranking(rank_a: str, rank_b: str, rank_c: str, rank_d: str, state: ChatSession | None,
                       request: gr.Request):
        """Private: the rank selectors' ranking."""
        order = order_of_ranks([rank_a, rank_b, rank_c, rank_d])
        if order is None:
            raise ChatError("give every answer a rank, the best one 1")
        return rank(ranking.format_order(order), state, request)

    @_errors_to_gradio
    def edit_message(index: int, text: str, temperature: float, top_p: float, max_new_tokens: int, seed: int,
                     state: ChatSession | None, request: gr.Request):
        """Edits message ``index`` of the chat (0 = the first): the latest answer is rewritten; an earlier
        answer or a user message branches the chat into a new one (a user message gets a new, streamed answer)."""
        sess = caller(state, request)
        edits = None
        try:
            params = sampling(temperature, top_p, max_new_tokens, seed, s)
            edits = service.edit_message(sess, index, text, params)
            shown = None
            while True:
                try:
                    growing = next(edits)
                except StopIteration as done:
                    note = done.value
                    break
                if shown is None:  # the index is valid once the first words come
                    shown = sess.history()[:int(index)] + [{"role": "user", "content": text}]
                yield shown + [{"role": "assistant", "content": growing}], gr.skip(), "", sess
        finally:
            if edits is not None:
                edits.close()
        yield sess.history(), _version_md(sess.shown_version), " ".join(filter(None, [note, _finish_note(sess)])), sess

    def on_edit(temperature: float, top_p: float, max_new_tokens: int, seed: int, state: ChatSession | None,
                request: gr.Request, evt: gr.EditData):
        """Private: the Chatbot's own edit button (the same as /edit_message).  A refusal is a
        warning toast and the chat is shown as it was (an error would cover the Chatbot)."""
        try:
            yield from edit_message(evt.index, _edited_text(evt.value), temperature, top_p, max_new_tokens, seed,
                                    state, request)
        except gr.Error as exc:
            gr.Warning(exc.message)
            sess = state if isinstance(state, ChatSession) else None
            yield (sess.history() if sess else []), gr.skip(), gr.skip(), state

    @_errors_to_gradio
    def rate(answer: int, thumb: str, reasons: list[str], comment: str, state: ChatSession | None,
             request: gr.Request):
        """Thumbs up or down on an answer (1-based number, 0 = latest), optional reasons and comment."""
        sess = caller(state, request)
        return service.rate(sess, answer, thumb, reasons, comment), sess

    def rate_in_page(answer: int, thumb: str, reasons: list[str], comment: str, state: ChatSession | None,
                     request: gr.Request):
        """Private: the rating popover's Send: every submission says what happened on its own
        line (a duplicate is refused, a refusal is also a warning toast); the form stays as it was."""
        try:
            note, sess = rate(answer, thumb, reasons, comment, state, request)
        except gr.Error as exc:
            gr.Warning(exc.message)
            return f"Not saved: {exc.message}", state
        return note.replace("Recorded: ", "Thanks — rating saved: ", 1), sess

    @_errors_to_gradio
    def edit(rewrite: str, state: ChatSession | None, request: gr.Request):
        """Replaces the latest answer with the user's rewrite (stored as preferred)."""
        sess = caller(state, request)
        note = service.edit(sess, rewrite)
        return sess.history(), note, sess

    @_errors_to_gradio
    def opt_out(value: bool, state: ChatSession | None, request: gr.Request):
        """Opts this session out of (or back into) training."""
        sess = caller(state, request)
        return service.set_opt_out(sess, value), sess

    @_errors_to_gradio
    def new_chat(state: ChatSession | None, request: gr.Request):
        """Starts a new conversation (same session, same opt-out)."""
        sess = caller(state, request)
        return [], service.new_chat(sess), sess

    def stop(state: ChatSession | None):
        """Stops the answer being written for this session."""
        return "Stopping…" if service.stop(state) else "Nothing to stop."

    @_errors_to_gradio
    def conversations(state: ChatSession | None, request: gr.Request):
        """This browser's chats, most recently active first."""
        sess = caller(state, request)
        return service.conversations(sess), sess

    @_errors_to_gradio
    def open_conversation(conversation_id: str, state: ChatSession | None, request: gr.Request):
        """Reopens one of this browser's chats (by its id from /conversations) to continue it."""
        sess = caller(state, request)
        note = service.open_conversation(sess, conversation_id)
        return sess.history(), note, sess

    @_errors_to_gradio
    def delete_my_data(confirm: bool, state: ChatSession | None, request: gr.Request):
        """Deletes this browser's chats, votes and ratings for good (confirm must be true)."""
        sess = caller(state, request)
        return service.delete_my_data(sess, confirm), sess

    def delete_confirmed(state: ChatSession | None, request: gr.Request):
        """Private: the sidebar's confirmed deletion."""
        note, sess = delete_my_data(True, state, request)
        return note, "", sess

    def on_load(utc_offset: float | None, key: str | None, last_chat: str | None, state: ChatSession | None,
                request: gr.Request):
        """Private: binds the page's session to the browser's key (a new one the first time) and
        reopens the chat the browser had open (``last_chat``), if it can be continued."""
        try:
            sess = service.attach(state, key, _client(request), _client_address(request))
        except ChatError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        sess.utc_offset = chat_list.offset_of(utc_offset)
        if last_chat and not sess.messages and not service.generating(sess):
            try:
                service.open_conversation(sess, last_chat)
            except ChatError:  # deleted, another key's, or cut short: a new chat, as without one
                pass
        return (sess.key, sess, sess.history(), _version_md(ctx.holder.version), *notice(sess),
                gr.Checkbox(value=sess.opt_out))

    def chat_list_view(sess: ChatSession | None):
        """The sidebar's list (``chat_list.view``) and what the browser keeps as its last chat."""
        chats = service.conversations(sess) if sess else []
        return (*chat_list.view(chats, sess and sess.conversation_id, sess.utc_offset if sess else 0),
                sess.conversation_id if sess else gr.skip())

    @_errors_to_gradio
    def rename_conversation(conversation_id: str, title: str, state: ChatSession | None, request: gr.Request):
        """Names one of this browser's chats ("" names it by its first message again)."""
        sess = caller(state, request)
        return service.rename_conversation(sess, conversation_id, title), sess

    @_errors_to_gradio
    def delete_conversation(conversation_id: str, confirm: bool, state: ChatSession | None, request: gr.Request):
        """Deletes one of this browser's chats for good, with its votes and ratings (confirm must be true)."""
        sess = caller(state, request)
        note = service.delete_conversation(sess, conversation_id, confirm)
        return sess.history(), note, sess

    def open_rename(state: ChatSession | None):
        """Private: the rename box of the open chat, with its title."""
        sess = state if isinstance(state, ChatSession) else None
        title = chat_list.title_of(service.conversations(sess), sess.conversation_id) if sess else ""
        return gr.Column(visible=True), gr.Textbox(value=title), gr.Column(visible=False)

    def rename_open_chat(title: str, state: ChatSession | None, request: gr.Request):
        """Private: Save in the rename box (a refusal is a toast and keeps the box and its text)."""
        sess = state if isinstance(state, ChatSession) else None
        try:
            note, sess = rename_conversation(sess.conversation_id if sess else "", title, state, request)
        except gr.Error as exc:
            gr.Warning(exc.message)
            return gr.skip(), gr.skip(), state
        return note, gr.Column(visible=False), sess

    def delete_open_chat(state: ChatSession | None, request: gr.Request):
        """Private: the sidebar's confirmed deletion of the open chat."""
        sess = state if isinstance(state, ChatSession) else None
        try:
            return delete_conversation(sess.conversation_id if sess else "", True, state, request)
        except gr.Error as exc:
            gr.Warning(exc.message)
            return gr.skip(), gr.skip(), state

    def notice(sess: ChatSession | None):
        text = service.take_notice(sess)
        return (gr.Markdown(value=text, visible=True),) if text else (gr.skip(),)

    def sync(state: ChatSession | None, *ranks: str | None):
        """Private: brings the panels in line with the session after a change (``ranks``: the
        rank selectors' values, kept while four answers are open)."""
        sess = state if isinstance(state, ChatSession) else None
        busy = sess is not None and service.generating(sess)
        writing = sess.writing if busy else ""
        comp = sess.comparison if sess else None
        open_comp = thread_ui.open_pair(sess, busy)
        drawn = open_comp and writing != "B"  # the pair is the session's comparison (B is not being written)
        ranking_open = drawn and (bool(comp.extras) or writing in ("C", "D"))
        ready = open_comp and not busy
        texts = comp.texts() if ranking_open else {}
        return (gr.update(visible=open_comp), thread_ui.chatbot_view(sess, busy),
                comp.a_text if drawn else gr.skip(), comp.b_text if drawn else gr.skip(),
                *[gr.Button(interactive=ready) for _ in VERDICT_BUTTONS],
                *rank_panel(ranking_open, texts.get("C", gr.skip()), texts.get("D", gr.skip()),
                            ranks if ranking_open else None, ready, writing),
                *thread_ui.send_stop(busy), thread_ui.pair_note(sess, busy), *thread_ui.pager(sess, 0),
                *thread_ui.branch_pager(service.branches(sess) if sess else None, sess and sess.conversation_id),
                *chat_list_view(sess), *notice(sess))

    def rank_panel(ranking_open: bool, c_text, d_text, ranks, ready: bool, writing: str = ""):
        """The comparison's two modes: A/B verdicts, or four answers to rank.  ``ranks``: the
        selectors' values to keep (None: cleared); ``writing``: C or D while they are written
        (their ranks are locked until they are complete)."""
        values = list(ranks) if ranks is not None else [None] * len(RANK_LABELS)
        valid = ranking_open and ready and order_of_ranks(values) is not None
        locked = writing in ("C", "D")
        picks = [gr.update(visible=ranking_open, interactive=not (locked and label in "CD"),
                           **({} if ranks is not None else {"value": None}))
                 for label in RANK_LABELS]
        two = gr.update(visible=not ranking_open)  # the verdicts, Compare more, the keys
        return (gr.Button(interactive=ready and not ranking_open), two, two, two,
                RANK_TITLE if ranking_open else COMPARE_TITLE, gr.update(visible=ranking_open), c_text, d_text,
                *picks, gr.update(visible=ranking_open), gr.Button(interactive=valid), rank_note(values, writing))

    def show_more():
        """Private: opens the ranking of four while C and D are written (Submit disabled and
        their ranks locked until they are)."""
        return (*rank_panel(True, "…", "…", None, False, "C"),
                *thread_ui.writing_view(note=thread_ui.WRITING_NOTE.format("C")))

    def check_ranks(state: ChatSession | None, *ranks: str | None):
        """Private: Submit ranking is enabled once all four answers are complete and ranked, one of them 1."""
        sess = state if isinstance(state, ChatSession) else None
        comp = sess.comparison if sess else None
        busy = sess is not None and service.generating(sess)
        ready = comp is not None and comp.verdict is None and bool(comp.extras) and not busy
        return (gr.Button(interactive=ready and order_of_ranks(ranks) is not None),
                rank_note(ranks, sess.writing if busy else ""))

    def page_alternatives(step: int, state: ChatSession | None, page: int):
        """Private: the pager's ‹ and › over the latest answer's others (read-only)."""
        return thread_ui.pager(state if isinstance(state, ChatSession) else None, int(page or 0) + step)

    def open_branch(step: int, state: ChatSession | None, request: gr.Request):
        """Private: the edited message's ‹ and ›: opens the chat with its previous or next version
        (a refusal, an answer being written, is a warning toast)."""
        sess = state if isinstance(state, ChatSession) else None
        target = thread_ui.branch_target(service.branches(sess), sess.conversation_id, step) if sess else None
        try:
            return open_conversation(target or "", state, request)
        except gr.Error as exc:
            gr.Warning(exc.message)
            return gr.skip(), gr.skip(), state

    def branch_step(step: int):
        """The handler of one branch-pager arrow (a closure: Gradio reads the request from its signature)."""
        def handler(state: ChatSession | None, request: gr.Request):
            return open_branch(step, state, request)
        return handler

    def sync_opt_out(state: ChatSession | None):
        """Private: the opt-out box shows the session's (after reopening a chat or a deletion)."""
        return gr.Checkbox(value=state.opt_out) if isinstance(state, ChatSession) else gr.skip()

    def can_regenerate(sess: ChatSession | None) -> bool:
        """Whether a regenerate would be taken (else it is refused and the page stays as it is)."""
        latest = sess.messages[-1] if sess and sess.messages else None
        return (latest is not None and latest["role"] == "assistant" and not latest["edited"]
                and bool(latest.get("generation_id")) and not service.generating(sess)
                and not thread_ui.open_pair(sess, False))

    def show_compare(state: ChatSession | None):
        """Private: turns the latest answer into the pair, A | B, in the thread while answer B is
        written (verdicts disabled until it is done); anything the regenerate would refuse (an
        open pair or ranking, a rewrite, an answer being written) stays as it is."""
        sess = state if isinstance(state, ChatSession) else None
        if not can_regenerate(sess):
            return tuple(gr.skip() for _ in range(2 + len(VERDICT_BUTTONS) + len(rank_outputs) + 6))
        return (gr.update(visible=True), "…", *[gr.Button(interactive=False) for _ in VERDICT_BUTTONS],
                *rank_panel(False, gr.skip(), gr.skip(), None, False),
                *thread_ui.writing_view(sess.history()[:-1], thread_ui.WRITING_NOTE.format("B")),
                gr.update(visible=False), gr.update(visible=False))

    def on_like(state: ChatSession | None, evt: gr.LikeData):
        """Private: 👍/👎 on a message opens the rating popover for that very answer."""
        sess = state if isinstance(state, ChatSession) else None
        if sess is None or not isinstance(evt.index, int) or evt.liked not in (True, False):
            return tuple(gr.skip() for _ in range(7))
        number = sess.answer_number(evt.index)
        thumb = "up" if evt.liked else "down"
        icon = "👍" if evt.liked else "👎"
        return (number, thumb, gr.update(visible=True),
                f"**{icon} Rate answer {number}** · add reasons if you like, then press **Send rating**.",
                "", [], "")

    # -- layout -------------------------------------------------------------------------
    storage = browser_storage(ctx.store)
    with gr.Blocks(title="Assistant", analytics_enabled=False, delete_cache=uploads.delete_cache) as demo:
        state = gr.State(None)
        browser_key = gr.BrowserState(None, storage_key=storage["storage_key"], secret=storage["secret"])
        last_chat = gr.BrowserState(None, storage_key=storage["storage_key"] + "-chat", secret=storage["secret"])
        utc_offset = gr.Number(visible=False, value=0, label="utc_offset")  # set by the page on load
        with gr.Sidebar(label="Your chats", elem_id="sidebar", width=290):
            gr.Markdown("### Your chats")
            side_new_btn = gr.Button("+ New chat", size="sm", elem_id="sidebar-new")
            no_chats_md = gr.Markdown(NO_CHATS, elem_id="no-chats")
            with gr.Column(visible=False, elem_id="chat-list") as chat_list_col:
                chat_groups = []  # per date group: its header and its chats
                for name in chat_list.GROUPS:
                    chat_groups.append(gr.Markdown(f"**{name}**", visible=False, elem_classes=["chat-group-title"]))
                    chat_groups.append(gr.Radio(choices=[], label=name, show_label=False, container=False,
                                                visible=False, elem_classes=["chat-group"]))
            with gr.Row(visible=False, elem_id="chat-actions") as chat_actions:
                rename_btn = gr.Button("Rename", size="sm", elem_id="chat-rename")
                delete_chat_btn = gr.Button("Delete chat", size="sm", elem_id="chat-delete")
            with gr.Column(visible=False, elem_id="rename-box") as rename_box:
                rename_tb = gr.Textbox(label="Name of this chat", max_lines=1, max_length=MAX_TITLE_CHARS,
                                       elem_id="rename-text")
                with gr.Row():
                    rename_save = gr.Button("Save", variant="primary", size="sm", elem_id="rename-save")
                    rename_cancel = gr.Button("Cancel", size="sm", elem_id="rename-cancel")
            with gr.Column(visible=False, variant="panel", elem_id="chat-delete-confirm") as chat_delete_box:
                gr.Markdown("Delete this chat for good, with its votes and ratings? It cannot be undone.")
                with gr.Row():
                    chat_delete_yes = gr.Button("Delete for good", variant="stop", size="sm", elem_id="chat-delete-yes")
                    chat_delete_no = gr.Button("Cancel", size="sm", elem_id="chat-delete-no")
            gr.Markdown("---")
            delete_btn = gr.Button("Delete my data…", size="sm", elem_id="delete-data")
            with gr.Column(visible=False, variant="panel", elem_id="delete-confirm") as confirm_box:
                gr.Markdown("This deletes **all** your chats, votes and ratings from this server for good; "
                            "later training will never see them.  It cannot be undone.")
                with gr.Row():
                    confirm_btn = gr.Button("Delete for good", variant="stop", size="sm", elem_id="delete-confirm-btn")
                    cancel_btn = gr.Button("Cancel", size="sm", elem_id="delete-cancel")
            deleted_md = gr.Markdown("", elem_id="delete-result")
        with gr.Row(equal_height=True, elem_id="header"):
            gr.Markdown("## Assistant")
            version_md = gr.Markdown(_version_md(ctx.holder.version), label="model_version", show_label=False,
                                     elem_id="model-version")
        notice_md = gr.Markdown("", visible=False, elem_id="update-notice")
        chatbot = SafeChatbot(
            label="Conversation", height=440, sanitize_html=True, render_markdown=True, allow_tags=False,
            feedback_options=("Like", "Dislike"), buttons=["copy"], editable="all", placeholder=CHAT_PLACEHOLDER,
            elem_id="chatbot")
        # the thread: the answers a vote did not choose, the pair (or four) in place of the latest
        # answer, and the rating popover of the message whose 👍/👎 was clicked
        with gr.Row(visible=False, elem_id="branch-bar") as branch_bar:
            branch_md = gr.Markdown("", elem_id="branch-pos")
            branch_prev = gr.Button("‹", size="sm", scale=0, min_width=40, interactive=False, elem_id="branch-prev")
            branch_next = gr.Button("›", size="sm", scale=0, min_width=40, interactive=False, elem_id="branch-next")
        with gr.Row(visible=False, elem_id="alt-bar") as alt_bar:
            alt_tag = gr.Markdown("", elem_id="alt-tag")
            alt_prev = gr.Button("‹", size="sm", scale=0, min_width=40, interactive=False, elem_id="alt-prev")
            alt_pos = gr.Markdown("", elem_id="alt-pos")
            alt_next = gr.Button("›", size="sm", scale=0, min_width=40, interactive=False, elem_id="alt-next")
        alt_md = SafeMarkdown("", visible=False, elem_id="alt-answer")
        alt_page = gr.State(0)
        with gr.Column(visible=False, variant="panel", elem_id="compare") as compare_box:
            with gr.Row(elem_id="compare-head"):
                compare_title = gr.Markdown(COMPARE_TITLE, elem_id="compare-title")
                compare_keys = gr.Markdown("Keys: **1** A · **2** B · **3** tie · **4** both bad",
                                           elem_id="compare-keys")

            def answer_column(label: str, note: str):
                """One answer of the comparison, with its rank selector (shown while ranking four)."""
                with gr.Column(min_width=0):
                    gr.Markdown(f"**Answer {label}** · {note}")
                    text = SafeMarkdown("", label=f"answer_{label.lower()}", elem_id=f"answer-{label.lower()}")
                    pick = gr.Radio(RANK_CHOICES, value=None, label=f"Rank of answer {label} (1 = best)",
                                    visible=False, container=False, elem_id=f"rank-{label.lower()}",
                                    elem_classes=["rank-pick"])
                return text, pick

            with gr.Row(elem_id="compare-row"):
                a_md, rank_a = answer_column("A", "the current one")
                b_md, rank_b = answer_column("B", "new")
            with gr.Row(visible=False, elem_id="rank-row") as rank_row:
                c_md, rank_c = answer_column("C", "new")
                d_md, rank_d = answer_column("D", "new")
            rank_picks = [rank_a, rank_b, rank_c, rank_d]
            compare_ready_md = gr.Markdown("", elem_id="compare-ready")
            with gr.Row(elem_id="verdicts") as verdict_row:
                vote_btns = {v: gr.Button(label, size="sm", interactive=False, elem_id=f"vote-{v}")
                             for v, label in VERDICT_BUTTONS}
            with gr.Row(elem_id="more-row") as more_row:
                gr.Markdown("Hard to choose? See two more answers and rank all four.", elem_id="more-hint")
                more_btn = gr.Button("Compare more", size="sm", interactive=False, elem_id="compare-more")
            with gr.Row(visible=False, elem_id="rank-actions") as rank_actions:
                rank_note_md = gr.Markdown(RANK_HINT, elem_id="rank-order")
                rank_submit = gr.Button("Submit ranking", variant="primary", size="sm", interactive=False,
                                        elem_id="rank-submit")
        with gr.Column(visible=False, variant="panel", elem_id="rate-pop") as rate_pop:
            rate_title = gr.Markdown("", elem_id="rate-title")
            thumb = gr.Radio(["up", "down"], value="up", label="Thumb", elem_id="rate-thumb")
            reasons = gr.CheckboxGroup(list(REASON_TAGS), label="Reasons (optional)", elem_id="rate-reasons")
            comment = gr.Textbox(label="Comment (optional)", max_lines=4, placeholder="What was wrong or right?",
                                 elem_id="rate-comment")
            with gr.Row():
                rate_btn = gr.Button("Send rating", variant="primary", size="sm", elem_id="rate-send")
                rate_close = gr.Button("Close", size="sm", elem_id="rate-close")
            rate_done = gr.Markdown("", elem_id="rate-done")
        with gr.Row(elem_id="composer"):
            msg = gr.Textbox(show_label=False, placeholder="Message the assistant…",
                             scale=8, max_lines=8, autofocus=True, elem_id="message")
            send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80, elem_id="send")
            stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80, visible=False, elem_id="stop")
        gr.HTML(thread_ui.char_count(s.max_message_chars), padding=False, elem_id="char-count-box")
        with gr.Row(elem_id="actions"):
            regen_btn = gr.Button("Regenerate and compare", size="sm", elem_id="regenerate")
            new_btn = gr.Button("New chat", size="sm", elem_id="new-chat")
            opt_out_cb = gr.Checkbox(label="Don't use my conversations for training", value=False,
                                     elem_id="opt-out")
        status = gr.Markdown("", label="status", show_label=False, elem_id="status")
        with gr.Accordion("Settings", open=False):
            system_tb = gr.Textbox(value=s.system_prompt, label="System prompt", lines=2)
            with gr.Row():
                temp = gr.Slider(0, 2, value=s.temperature, step=0.05, label="Temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1, value=s.top_p, step=0.05, label="Top-p")
            with gr.Row():
                max_new = gr.Slider(1, 1024, value=min(s.max_new_tokens, 1024), step=1, label="Max new tokens")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)")
        # API-only inputs and outputs: the message being sent, the verdict of an API vote, ...
        pending = gr.Textbox(visible=False)
        chat_api_btn = gr.Button(visible=False)
        verdict_tb = gr.Textbox(visible=False, value="a")
        regen_api_btn = gr.Button(visible=False)
        rate_num = gr.Number(value=0, precision=0, minimum=0, visible=False, label="Answer number (0 = the latest)")
        rate_api_btn = gr.Button(visible=False)
        vote_api_btn = gr.Button(visible=False)
        order_tb = gr.Textbox(visible=False, label="order")
        rank_api_btn = gr.Button(visible=False)
        rewrite = gr.Textbox(visible=False, label="rewrite")  # /edit: the Chatbot's pencil does it in the page
        edit_btn = gr.Button(visible=False)
        edit_index = gr.Number(visible=False, precision=0, label="index")
        edit_text = gr.Textbox(visible=False, label="text")
        edit_api_btn = gr.Button(visible=False)
        conv_id_tb = gr.Textbox(visible=False, label="conversation_id")
        open_api_btn = gr.Button(visible=False)
        chats_json = gr.JSON(visible=False, label="conversations")
        list_api_btn = gr.Button(visible=False)
        confirm_cb = gr.Checkbox(visible=False, value=False, label="confirm")
        delete_api_btn = gr.Button(visible=False)
        title_tb = gr.Textbox(visible=False, label="title")
        rename_api_btn = gr.Button(visible=False)
        delete_chat_api_btn = gr.Button(visible=False)

        sampling_inputs = [temp, top_p, max_new, seed]
        rank_outputs = [more_btn, verdict_row, more_row, compare_keys, compare_title, rank_row, c_md, d_md,
                        *rank_picks, rank_actions, rank_submit, rank_note_md]  # what ``rank_panel`` returns
        busy_outputs = [send_btn, stop_btn, chatbot, compare_ready_md]  # what ``thread_ui.writing_view`` returns
        pager_outputs = [alt_bar, alt_tag, alt_pos, alt_md, alt_page, alt_prev, alt_next]  # ``thread_ui.pager``
        branch_outputs = [branch_bar, branch_md, branch_prev, branch_next]  # ``thread_ui.branch_pager``
        list_outputs = [*chat_groups, chat_list_col, no_chats_md, chat_actions, last_chat]  # ``chat_list_view``
        # always_last: a sync asked for while another runs (a refusal during an answer) is run after it
        after = dict(fn=sync, inputs=[state, *rank_picks], api_visibility=PRIVATE, trigger_mode="always_last",
                     outputs=[compare_box, chatbot, a_md, b_md, *vote_btns.values(), *rank_outputs, send_btn,
                              stop_btn, compare_ready_md, *pager_outputs, *branch_outputs, *list_outputs,
                              notice_md])
        after_switch = dict(fn=sync_opt_out, inputs=[state], outputs=[opt_out_cb], api_visibility=PRIVATE,
                            queue=False)

        # chat: stash and clear the textbox, stream, restore the text if refused.  "multiple": a
        # message sent while an answer streams reaches the server (which refuses it and puts it
        # back in the box) instead of being dropped by the page after the box was cleared
        sent = gr.on([msg.submit, send_btn.click], lambda m: ("", m, *thread_ui.writing_view()), [msg],
                     [msg, pending, *busy_outputs], api_visibility=PRIVATE, queue=False)
        chat_ev = sent.then(chat_in_page, [pending, system_tb, *sampling_inputs, state],
                            [chatbot, version_md, status, state, msg], api_visibility=PRIVATE,
                            concurrency_id="generate", trigger_mode="multiple")
        chat_ev.then(**after)
        chat_api_btn.click(chat, [pending, system_tb, *sampling_inputs, state], [chatbot, version_md, status, state],
                           api_name="chat", concurrency_id="generate").then(**after)

        # regenerate: the button or the Chatbot's own retry icon under the latest answer
        shown = gr.on([regen_btn.click, chatbot.retry], show_compare, [state],
                      [compare_box, b_md, *vote_btns.values(), *rank_outputs, *busy_outputs, alt_bar, alt_md],
                      api_visibility=PRIVATE, queue=False)
        shown.then(regenerate_in_page, [*sampling_inputs, state], [a_md, b_md, version_md, status, state],
                   api_visibility=PRIVATE, concurrency_id="generate").then(**after)
        regen_api_btn.click(regenerate, [*sampling_inputs, state], [a_md, b_md, version_md, status, state],
                            api_name="regenerate", concurrency_id="generate").then(**after)

        vote_api_btn.click(vote, [verdict_tb, state], [chatbot, status, state], api_name="vote").then(**after)
        for verdict, btn in vote_btns.items():
            btn.click(vote_button(verdict), [state], [chatbot, status, state],
                      api_visibility=PRIVATE).then(**after)

        # compare more: C and D under A and B, then a rank per answer and Submit ranking
        more_shown = more_btn.click(show_more, None, [*rank_outputs, *busy_outputs], api_visibility=PRIVATE,
                                    queue=False)
        more_shown.then(compare_more, [*sampling_inputs, state], [c_md, d_md, version_md, status, state],
                        api_name="compare_more", concurrency_id="generate").then(**after)
        for pick in rank_picks:
            pick.input(check_ranks, [state, *rank_picks], [rank_submit, rank_note_md], api_visibility=PRIVATE,
                       queue=False)
        rank_submit.click(submit_ranking, [*rank_picks, state], [chatbot, status, state],
                          api_visibility=PRIVATE).then(**after)
        rank_api_btn.click(rank, [order_tb, state], [chatbot, status, state], api_name="rank").then(**after)

        # ratings: the popover of the clicked 👍/👎 (its answer), /rate over the API
        rate_inputs = [rate_num, thumb, reasons, comment, state]
        rate_api_btn.click(rate, rate_inputs, [status, state], api_name="rate")
        rate_btn.click(rate_in_page, rate_inputs, [rate_done, state], api_visibility=PRIVATE)
        rate_close.click(lambda: gr.update(visible=False), None, [rate_pop], api_visibility=PRIVATE, queue=False)
        chatbot.like(on_like, [state], [rate_num, thumb, rate_pop, rate_title, rate_done, reasons, comment],
                     api_visibility=PRIVATE, queue=False)
        for step, btn in ((-1, alt_prev), (1, alt_next)):
            btn.click(functools.partial(page_alternatives, step), [state, alt_page], pager_outputs,
                      api_visibility=PRIVATE, queue=False)
        for step, btn in ((-1, branch_prev), (1, branch_next)):
            btn.click(branch_step(step), [state], [chatbot, status, state],
                      api_visibility=PRIVATE).then(**after).then(**after_switch)

        edit_btn.click(edit, [rewrite, state], [chatbot, status, state], api_name="edit").then(**after)
        # edit in place: the Chatbot's pencil on any message, and the same over the API
        edit_api_btn.click(edit_message, [edit_index, edit_text, *sampling_inputs, state],
                           [chatbot, version_md, status, state], api_name="edit_message",
                           concurrency_id="generate").then(**after)
        chatbot.edit(on_edit, [*sampling_inputs, state], [chatbot, version_md, status, state],
                     api_visibility=PRIVATE, concurrency_id="generate").then(**after)
        opt_out_cb.input(opt_out, [opt_out_cb, state], [status, state], api_name="opt_out")
        new_btn.click(new_chat, [state], [chatbot, status, state], api_name="new_chat").then(**after)
        side_new_btn.click(new_chat, [state], [chatbot, status, state], api_visibility=PRIVATE).then(**after)
        chatbot.clear(new_chat, [state], [chatbot, status, state], api_visibility=PRIVATE).then(**after)
        stop_btn.click(stop, [state], [status], api_name="stop", queue=False)

        # past chats and "delete my data"
        list_api_btn.click(conversations, [state], [chats_json, state], api_name="conversations")
        open_api_btn.click(open_conversation, [conv_id_tb, state], [chatbot, status, state],
                           api_name="open_conversation").then(**after).then(**after_switch)
        for group in chat_groups[1::2]:
            group.input(open_conversation, [group, state], [chatbot, status, state],
                        api_visibility=PRIVATE).then(**after).then(**after_switch)
        rename_api_btn.click(rename_conversation, [conv_id_tb, title_tb, state], [status, state],
                             api_name="rename_conversation").then(**after)
        delete_chat_api_btn.click(delete_conversation, [conv_id_tb, confirm_cb, state], [chatbot, status, state],
                                  api_name="delete_conversation").then(**after)
        hide_boxes = (gr.Column(visible=False), gr.Column(visible=False))
        rename_btn.click(open_rename, [state], [rename_box, rename_tb, chat_delete_box],
                         api_visibility=PRIVATE, queue=False)
        rename_cancel.click(lambda: hide_boxes[0], None, [rename_box], api_visibility=PRIVATE, queue=False)
        rename_tb.submit(rename_open_chat, [rename_tb, state], [status, rename_box, state],
                         api_visibility=PRIVATE).then(**after)
        rename_save.click(rename_open_chat, [rename_tb, state], [status, rename_box, state],
                          api_visibility=PRIVATE).then(**after)
        delete_chat_btn.click(lambda: hide_boxes, None, [rename_box, chat_delete_box], api_visibility=PRIVATE,
                              queue=False).then(lambda: gr.Column(visible=True), None, [chat_delete_box],
                                                api_visibility=PRIVATE, queue=False)
        chat_delete_no.click(lambda: hide_boxes[0], None, [chat_delete_box], api_visibility=PRIVATE, queue=False)
        chat_deleting = chat_delete_yes.click(lambda: hide_boxes[0], None, [chat_delete_box],
                                              api_visibility=PRIVATE, queue=False)
        chat_deleting.then(delete_open_chat, [state], [chatbot, status, state],
                           api_visibility=PRIVATE).then(**after).then(**after_switch)
        delete_api_btn.click(delete_my_data, [confirm_cb, state], [status, state],
                             api_name="delete_my_data").then(**after).then(**after_switch)
        delete_btn.click(lambda: (gr.Column(visible=True), ""), None, [confirm_box, deleted_md],
                         api_visibility=PRIVATE, queue=False)
        cancel_btn.click(lambda: gr.Column(visible=False), None, [confirm_box], api_visibility=PRIVATE, queue=False)
        deleting = confirm_btn.click(lambda: gr.Column(visible=False), None, [confirm_box],
                                     api_visibility=PRIVATE, queue=False)
        deleted = deleting.then(delete_confirmed, [state], [deleted_md, status, state], api_visibility=PRIVATE)
        deleted.then(**after).then(**after_switch)

        # the browser's UTC offset goes in first (its clock groups the chat list by day)
        demo.load(on_load, [utc_offset, browser_key, last_chat, state],
                  [browser_key, state, chatbot, version_md, notice_md, opt_out_cb], api_visibility=PRIVATE,
                  queue=False, js="(...args) => { args[0] = -new Date().getTimezoneOffset(); return args; }",
                  ).then(**after)

    # -- the maintainers' console: its own page, not linked from the chat ---------------------
    with demo.route("Console", "/console", show_in_navbar=False):
        console.build(ctx)
    return demo


def launch(demo: gr.Blocks, ctx: AppContext, *, prevent_thread_lock: bool = False,
           port: int | None = None, quiet: bool = False):
    """Queues and starts the server; returns (app, local_url, share_url) like Blocks.launch.
    Every request goes through ``HttpGuard`` (installed before the server starts)."""
    s = ctx.settings
    demo.queue(default_concurrency_limit=None, max_size=512)
    blocking = not prevent_thread_lock
    uploads: UploadPolicy = ctx.extras.get("uploads", UPLOADS)
    uploads_open = takes_uploads(demo) if uploads.open is None else uploads.open
    ctx.extras["uploads_open"] = uploads_open
    # read by uvicorn's proxy-headers middleware: X-Forwarded-For counts only from these ('' = none)
    os.environ["FORWARDED_ALLOW_IPS"] = s.trusted_proxies
    # an open upload route keeps its own cap: one file of max_file_bytes (Gradio refuses a larger file)
    guard = Middleware(HttpGuard, max_body_bytes=s.max_request_bytes, uploads_open=uploads_open,
                       upload_bytes=uploads.request_bytes)
    # a stream holds a worker thread while it waits for tokens; the engine's limits bound how
    # many can (decoding + waiting), and the rest of the pool is kept for votes and the console
    threads = s.max_batch + s.max_waiting + 40
    result = demo.launch(server_name=s.host, server_port=s.port if port is None else port,
                         prevent_thread_lock=True, quiet=quiet, show_error=True, max_threads=threads,
                         run_history=False, footer_links=["api"], max_file_size=uploads.max_file_bytes,
                         css=CSS + thread_ui.CSS + chat_list.CSS, head=HEAD + thread_ui.HEAD + LINKS_HEAD, app_kwargs={"middleware": [guard]},
                         num_workers=0)  # no static-file worker processes: every route behind the guard
    _answer_unknown_endpoints(result[0])
    if blocking:
        demo.block_thread()
    return result


def _answer_unknown_endpoints(app) -> None:
    """Gradio 6 answers a call to an unknown ``api_name`` (``/gradio_api/call|run/NAME``) or
    ``fn_index`` (``/gradio_api/queue/join``) with a 500 from an unhandled exception; these
    are client errors, so they get a 404 with a clear message instead."""
    from fastapi.responses import JSONResponse
    from gradio.route_utils import FnIndexInferError

    async def unknown_name(request, exc):
        return JSONResponse({"error": f"no such endpoint: {exc}"}, status_code=404)

    async def key_error(request, exc):
        if request.url.path.endswith("/queue/join"):
            return JSONResponse({"error": f"no such endpoint (fn_index {exc})"}, status_code=404)
        log.error("unhandled error on %s", request.url.path, exc_info=exc)
        return JSONResponse({"error": "Internal Server Error"}, status_code=500)

    app.add_exception_handler(FnIndexInferError, unknown_name)
    app.add_exception_handler(KeyError, key_error)
    app.middleware_stack = None  # rebuilt with the handlers on the next request
