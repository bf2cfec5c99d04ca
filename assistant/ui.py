"""The end users' Gradio app: chat, regenerate-and-compare, thumbs, rewrite, opt-out, past
chats and "delete my data".

All logic lives in ``assistant.chat``; this module only lays out components and wires
events.  Public API (what ``gradio_client`` sees; per-session state is kept by the server
for each client session, so one ``Client`` drives one conversation):

    /chat(message, system_prompt, temperature, top_p, max_new_tokens, seed)
        -> (chat_history, model_version, status)              streams
    /regenerate(temperature, top_p, max_new_tokens, seed)
        -> (answer_a, answer_b, model_version, status)        streams answer B
    /vote(verdict)  verdict in a | b | tie | both_bad        -> (chat_history, status)
    /rate(answer, thumb, reasons, comment)  answer: 1-based, 0 = latest -> status
    /edit(rewrite)  rewrite of the latest answer             -> (chat_history, status)
    /opt_out(opt_out)                                         -> status
    /new_chat()                                               -> (chat_history, status)
    /stop()                                                   -> status
    /conversations()   this browser's chats, newest first      -> [{id, title, updated_at, messages}]
    /open_conversation(conversation_id)  reopens one to continue it -> (chat_history, status)
    /delete_my_data(confirm)  confirm must be true            -> status (what was deleted, what
                                                                 training had already used)

Past chats belong to a secret key the server makes (``secrets.token_urlsafe``) and the
browser keeps (``gr.BrowserState``, whose storage key and secret are kept in the database so
a restart keeps them).  The key reaches the server only through the page's (private) load
event, which binds it to the server-side session (a malformed one is replaced by a new key);
every later call lists, opens or deletes with that session's key, never with one it is
sent (see ``assistant.chat``).  An API client's session gets its own key, so the three calls
above see that session's chats only.

The comparison opens from **Regenerate and compare** or the Chatbot's own retry icon; both
answers are rendered as Markdown side by side (stacked below 600 px), and the verdict
buttons (keys 1-4 or a/b/t/x) are enabled once answer B is complete.

``/rate`` stores each reason tag once; ``/opt_out`` is rate-limited per client address and
writes only a change.  Gradio's upload route takes files up to ``UPLOADS.max_file_bytes``
and its cache is cleaned hourly (``UploadPolicy``).

Every other event is ``api_visibility="private"``.  Refusals raise ``gr.Error`` (an error
for API clients, a toast in the browser).  Confirmations ("Recorded: B is better") are
returned only after the store has committed.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass

import gradio as gr

from assistant import console
from assistant.chat import ChatError, ChatService, ChatSession, sampling
from assistant.context import AppContext
from feedback.store import REASON_TAGS, FeedbackStore

log = logging.getLogger(__name__)

PRIVATE = "private"
VERDICT_BUTTONS = (("a", "A is better"), ("b", "B is better"), ("tie", "Tie"), ("both_bad", "Both are bad"))
NO_CHATS = "No chats yet. Your conversations will be listed here, so you can pick one up later."
CHAT_PLACEHOLDER = ("### How can I help?\nAsk anything. Rate an answer with the thumbs under it, or press "
                    "its retry icon to see a second answer and pick the better one.")

# The page's look on top of Gradio's theme: the comparison side by side, stacked on a narrow
# screen; the chat list as a list; nothing wider than a phone (390 px) needs.
CSS = """
#compare { padding: 10px; }
#compare-row { gap: 12px; flex-wrap: nowrap; }
#compare-row > .column { min-width: 0 !important; flex: 1 1 0; }
#answer-a, #answer-b { border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg);
    padding: 8px 12px; min-height: 4em; max-height: 28em; overflow: auto; }
#verdicts { flex-wrap: wrap; gap: 8px; }
#verdicts button { flex: 1 1 8em; }
#chat-list .wrap { flex-direction: column; align-items: stretch; gap: 4px; }
#chat-list label { width: 100%; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
#update-notice { padding: 6px 12px; border-radius: var(--radius-lg); background: var(--color-accent-soft); }
#header { flex-wrap: wrap; align-items: baseline; }
#compare-head { align-items: baseline; flex-wrap: wrap; }
#compare-keys { text-align: right; opacity: 0.75; }
#model-version { text-align: right; }
@media (max-width: 600px) {
  #compare-row { flex-direction: column; flex-wrap: wrap; }
  #compare-row > .column { flex: 1 1 auto; width: 100%; }
  #composer { flex-wrap: wrap; }
  #composer > .form { flex: 1 1 100% !important; }
  #compare-keys { display: none; }
  #actions { flex-wrap: wrap; }
  #model-version { text-align: left; }
}
"""

# Keyboard shortcuts for the verdicts while a comparison is open and the focus is not in a
# text field: 1 or a (A is better), 2 or b, 3 or t (tie), 4 or x (both bad).  A disabled
# button (answer B still being written) ignores its key.  On a narrow screen the chats
# sidebar (which covers the page there) starts closed and closes after picking a chat.
HEAD = """<script>
(() => {
  const narrow = () => window.matchMedia("(max-width: 700px)").matches;
  const closeSidebar = () => {
    const sidebar = document.getElementById("sidebar");
    if (sidebar && sidebar.classList.contains("open")) sidebar.querySelector(".toggle-button")?.click();
  };
  const watch = new MutationObserver(() => {
    const sidebar = document.getElementById("sidebar");
    if (!sidebar || !sidebar.classList.contains("open")) return;
    watch.disconnect();
    // once Svelte has wired the toggle (a click at once is lost)
    if (narrow()) [200, 800].forEach((ms) => setTimeout(closeSidebar, ms));
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
    const button = document.getElementById("vote-" + verdict);
    if (!button || button.disabled) return;
    event.preventDefault();
    button.click();
  });
})();
</script>"""


@dataclass(frozen=True)
class UploadPolicy:
    """Gradio's upload route (``/gradio_api/upload``) is open to anyone who can reach the
    page, although no component of this app takes a file; without a size limit and cache
    cleaning it lets anyone fill the server's disk.  Gradio also keeps files it serves (the
    console's exports) in that cache, so they too are deleted once ``max_age_s`` old."""
    max_file_bytes: int = 1024 * 1024
    clean_every_s: int = 3600
    max_age_s: int = 3600

    @property
    def delete_cache(self) -> tuple[int, int]:
        return (self.clean_every_s, self.max_age_s)


UPLOADS = UploadPolicy()


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
    return f"Model version: **{version}**" if version else ""


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


def _errors_to_gradio(fn: Callable) -> Callable:
    """ChatError -> gr.Error (the message reaches the browser and API clients)."""
    @functools.wraps(fn)  # keeps the signature: Gradio injects gr.Request by it
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ChatError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
    return wrapper


def build_app(ctx: AppContext, uploads: UploadPolicy = UPLOADS) -> gr.Blocks:
    """The whole web app: the chat page and, when available, the maintainers' console."""
    s = ctx.settings
    service = ChatService(s, ctx.store, ctx.holder)
    ctx.extras["chat_service"] = service
    ctx.extras["uploads"] = uploads  # ``launch`` sets the size limit, Blocks the cleaning

    # -- handlers -----------------------------------------------------------------------
    def caller(state: ChatSession | None, request: gr.Request | None) -> ChatSession:
        """The calling page's session, with its user agent and network address."""
        return service.session(state, _client(request), _client_address(request))

    def chat(message: str, system_prompt: str, temperature: float, top_p: float, max_new_tokens: int,
             seed: int, state: ChatSession | None, request: gr.Request):
        """Sends a user message; streams the conversation with the growing answer."""
        sess = caller(state, request)
        try:
            params = sampling(temperature, top_p, max_new_tokens, seed, s)
            shown = sess.history() + [{"role": "user", "content": message}]
            for text in service.chat(sess, message, params, system_prompt):
                yield shown + [{"role": "assistant", "content": text}], gr.skip(), "", sess
        except ChatError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        yield sess.history(), _version_md(sess.model_version), _finish_note(sess), sess

    def regenerate(temperature: float, top_p: float, max_new_tokens: int, seed: int,
                   state: ChatSession | None, request: gr.Request):
        """Writes a second answer (B) to the latest answer's context and shows A and B."""
        sess = caller(state, request)
        try:
            params = sampling(temperature, top_p, max_new_tokens, seed, s)
            a_text = sess.messages[-1]["content"] if sess.messages else ""
            for text in service.regenerate(sess, params):
                yield a_text, text, gr.skip(), "", sess
        except ChatError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        comp = sess.comparison
        yield (comp.a_text, comp.b_text, _version_md(sess.model_version),
               " ".join(filter(None, ["Which answer is better?", _finish_note(sess)])), sess)

    @_errors_to_gradio
    def vote(verdict: str, state: ChatSession | None, request: gr.Request):
        """Says which of the compared answers is better: a, b, tie or both_bad."""
        sess = caller(state, request)
        note = service.vote(sess, verdict)
        return sess.history(), note, sess

    def vote_button(verdict: str):
        def fn(state: ChatSession | None, request: gr.Request):
            return vote(verdict, state, request)
        return fn

    @_errors_to_gradio
    def rate(answer: int, thumb: str, reasons: list[str], comment: str, state: ChatSession | None,
             request: gr.Request):
        """Thumbs up or down on an answer (1-based number, 0 = latest), optional reasons and comment."""
        sess = caller(state, request)
        return service.rate(sess, answer, thumb, reasons, comment), sess

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

    def on_load(key: str | None, state: ChatSession | None, request: gr.Request):
        """Private: binds the page's session to the browser's key (a new one the first time)."""
        try:
            sess = service.attach(state, key, _client(request), _client_address(request))
        except ChatError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        return (sess.key, sess, _version_md(ctx.holder.version), *chat_list(sess),
                *notice(sess), gr.Checkbox(value=sess.opt_out))

    def chat_list(sess: ChatSession | None):
        chats = service.conversations(sess) if sess else []
        current = sess.conversation_id if sess and any(c["id"] == sess.conversation_id for c in chats) else None
        return (gr.Radio(choices=[(c["title"], c["id"]) for c in chats], value=current, visible=bool(chats)),
                gr.Markdown(visible=not chats))

    def notice(sess: ChatSession | None):
        text = service.take_notice(sess)
        return (gr.Markdown(value=text, visible=True),) if text else (gr.skip(),)

    def sync(state: ChatSession | None):
        """Private: brings the panels in line with the session after a change."""
        sess = state if isinstance(state, ChatSession) else None
        comp = sess.comparison if sess else None
        open_comp = comp is not None and comp.verdict is None
        latest = sess.messages[-1]["content"] if sess and sess.messages and sess.messages[-1]["role"] == "assistant" else ""
        history = sess.history() if sess else []
        ready = open_comp and not service.generating(sess)
        return (gr.update(visible=open_comp), history, latest,
                comp.a_text if open_comp else gr.skip(), comp.b_text if open_comp else gr.skip(),
                *[gr.Button(interactive=ready) for _ in VERDICT_BUTTONS], *chat_list(sess), *notice(sess))

    def sync_opt_out(state: ChatSession | None):
        """Private: the opt-out box shows the session's (after reopening a chat or a deletion)."""
        return gr.Checkbox(value=state.opt_out) if isinstance(state, ChatSession) else gr.skip()

    def show_compare():
        """Private: opens the comparison while answer B is written (verdicts disabled until it is done)."""
        return (gr.update(visible=True), "…", *[gr.Button(interactive=False) for _ in VERDICT_BUTTONS])

    def on_like(state: ChatSession | None, evt: gr.LikeData):
        sess = state if isinstance(state, ChatSession) else None
        if sess is None or not isinstance(evt.index, int) or evt.liked not in (True, False):
            return gr.skip(), gr.skip(), gr.skip(), gr.skip()
        number = sess.answer_number(evt.index)
        thumb = "up" if evt.liked else "down"
        icon = "👍" if evt.liked else "👎"
        return (number, thumb, gr.Accordion(open=True),
                f"{icon} for answer {number}: add reasons if you like, then press **Send rating**.")

    # -- layout -------------------------------------------------------------------------
    storage = browser_storage(ctx.store)
    with gr.Blocks(title="Assistant", analytics_enabled=False, delete_cache=uploads.delete_cache) as demo:
        state = gr.State(None)
        browser_key = gr.BrowserState(None, storage_key=storage["storage_key"], secret=storage["secret"])
        with gr.Sidebar(label="Your chats", elem_id="sidebar", width=290):
            gr.Markdown("### Your chats")
            side_new_btn = gr.Button("+ New chat", size="sm", elem_id="sidebar-new")
            no_chats_md = gr.Markdown(NO_CHATS, elem_id="no-chats")
            chats = gr.Radio(choices=[], label="Your chats", show_label=False, container=False, visible=False,
                             elem_id="chat-list")
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
        chatbot = gr.Chatbot(label="Conversation", height=440, sanitize_html=True, render_markdown=True,
                             allow_tags=False, feedback_options=("Like", "Dislike"), buttons=["copy"],
                             placeholder=CHAT_PLACEHOLDER, elem_id="chatbot")
        with gr.Row(elem_id="composer"):
            msg = gr.Textbox(show_label=False, placeholder="Message the assistant…",
                             scale=8, max_lines=8, autofocus=True, elem_id="message")
            send_btn = gr.Button("Send", variant="primary", scale=1, min_width=80)
            stop_btn = gr.Button("Stop", variant="stop", scale=1, min_width=80)
        with gr.Row(elem_id="actions"):
            regen_btn = gr.Button("Regenerate and compare", size="sm", elem_id="regenerate")
            new_btn = gr.Button("New chat", size="sm")
            opt_out_cb = gr.Checkbox(label="Don't use my conversations for training", value=False,
                                     elem_id="opt-out")
        status = gr.Markdown("", label="status", show_label=False, elem_id="status")
        with gr.Column(visible=False, variant="panel", elem_id="compare") as compare_box:
            with gr.Row(elem_id="compare-head"):
                gr.Markdown("**Compare the two answers** and pick the better one", elem_id="compare-title")
                gr.Markdown("Keys: **1** A · **2** B · **3** tie · **4** both bad", elem_id="compare-keys")
            with gr.Row(elem_id="compare-row"):
                with gr.Column(min_width=0):
                    gr.Markdown("**Answer A** · the current one")
                    a_md = gr.Markdown("", label="answer_a", elem_id="answer-a")
                with gr.Column(min_width=0):
                    gr.Markdown("**Answer B** · new")
                    b_md = gr.Markdown("", label="answer_b", elem_id="answer-b")
            with gr.Row(elem_id="verdicts"):
                vote_btns = {v: gr.Button(label, size="sm", interactive=False, elem_id=f"vote-{v}")
                             for v, label in VERDICT_BUTTONS}
        with gr.Accordion("Rate an answer", open=False) as rate_acc:
            with gr.Row():
                rate_num = gr.Number(value=0, precision=0, minimum=0, label="Answer number (0 = the latest)")
                thumb = gr.Radio(["up", "down"], value="up", label="Thumb")
            reasons = gr.CheckboxGroup(list(REASON_TAGS), label="Reasons (optional)")
            comment = gr.Textbox(label="Comment (optional)", max_lines=4, placeholder="What was wrong or right?")
            rate_btn = gr.Button("Send rating", size="sm")
        with gr.Accordion("Rewrite the latest answer", open=False):
            rewrite = gr.Textbox(label="Your better answer", lines=4, max_lines=12, elem_id="rewrite",
                                 placeholder="The answer you would have liked; it continues the chat.")
            edit_btn = gr.Button("Save rewrite", size="sm")
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
        verdict_tb = gr.Textbox(visible=False, value="a")
        vote_api_btn = gr.Button(visible=False)
        conv_id_tb = gr.Textbox(visible=False, label="conversation_id")
        open_api_btn = gr.Button(visible=False)
        chats_json = gr.JSON(visible=False, label="conversations")
        list_api_btn = gr.Button(visible=False)
        confirm_cb = gr.Checkbox(visible=False, value=False, label="confirm")
        delete_api_btn = gr.Button(visible=False)

        sampling_inputs = [temp, top_p, max_new, seed]
        after = dict(fn=sync, inputs=[state], api_visibility=PRIVATE,
                     outputs=[compare_box, chatbot, rewrite, a_md, b_md, *vote_btns.values(), chats, no_chats_md,
                              notice_md])
        after_switch = dict(fn=sync_opt_out, inputs=[state], outputs=[opt_out_cb], api_visibility=PRIVATE,
                            queue=False)

        # chat: stash and clear the textbox, stream, restore the text if refused
        sent = gr.on([msg.submit, send_btn.click], lambda m: ("", m), [msg], [msg, pending],
                     api_visibility=PRIVATE, queue=False)
        chat_ev = sent.then(chat, [pending, system_tb, *sampling_inputs, state],
                            [chatbot, version_md, status, state], api_name="chat", concurrency_id="generate")
        chat_ev.failure(lambda m: m, [pending], [msg], api_visibility=PRIVATE, queue=False)
        chat_ev.then(**after)

        # regenerate: the button or the Chatbot's own retry icon under the latest answer
        shown = gr.on([regen_btn.click, chatbot.retry], show_compare, None, [compare_box, b_md, *vote_btns.values()],
                      api_visibility=PRIVATE, queue=False)
        regen_ev = shown.then(regenerate, [*sampling_inputs, state], [a_md, b_md, version_md, status, state],
                              api_name="regenerate", concurrency_id="generate")
        regen_ev.then(**after)

        vote_api_btn.click(vote, [verdict_tb, state], [chatbot, status, state], api_name="vote").then(**after)
        for verdict, btn in vote_btns.items():
            btn.click(_errors_to_gradio(vote_button(verdict)), [state], [chatbot, status, state],
                      api_visibility=PRIVATE).then(**after)

        rate_ev = rate_btn.click(rate, [rate_num, thumb, reasons, comment, state], [status, state], api_name="rate")
        rate_ev.success(lambda: ([], "", 0), None, [reasons, comment, rate_num], api_visibility=PRIVATE, queue=False)
        chatbot.like(on_like, [state], [rate_num, thumb, rate_acc, status], api_visibility=PRIVATE, queue=False)

        edit_btn.click(edit, [rewrite, state], [chatbot, status, state], api_name="edit").then(**after)
        opt_out_cb.input(opt_out, [opt_out_cb, state], [status, state], api_name="opt_out")
        new_btn.click(new_chat, [state], [chatbot, status, state], api_name="new_chat").then(**after)
        side_new_btn.click(new_chat, [state], [chatbot, status, state], api_visibility=PRIVATE).then(**after)
        chatbot.clear(new_chat, [state], [chatbot, status, state], api_visibility=PRIVATE).then(**after)
        stop_btn.click(stop, [state], [status], api_name="stop", queue=False)

        # past chats and "delete my data"
        list_api_btn.click(conversations, [state], [chats_json, state], api_name="conversations")
        open_api_btn.click(open_conversation, [conv_id_tb, state], [chatbot, status, state],
                           api_name="open_conversation").then(**after).then(**after_switch)
        chats.input(open_conversation, [chats, state], [chatbot, status, state],
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

        demo.load(on_load, [browser_key, state],
                  [browser_key, state, version_md, chats, no_chats_md, notice_md, opt_out_cb],
                  api_visibility=PRIVATE, queue=False)

    # -- the maintainers' console: its own page, not linked from the chat ---------------------
    with demo.route("Console", "/console", show_in_navbar=False):
        console.build(ctx)
    return demo


def launch(demo: gr.Blocks, ctx: AppContext, *, prevent_thread_lock: bool = False,
           port: int | None = None, quiet: bool = False):
    """Queues and starts the server; returns (app, local_url, share_url) like Blocks.launch."""
    s = ctx.settings
    demo.queue(default_concurrency_limit=None, max_size=512)
    blocking = not prevent_thread_lock
    uploads: UploadPolicy = ctx.extras.get("uploads", UPLOADS)
    os.environ["FORWARDED_ALLOW_IPS"] = s.trusted_proxies  # read by uvicorn's proxy-headers middleware
    # a stream holds a worker thread while it waits for tokens; the engine's limits bound how
    # many can (decoding + waiting), and the rest of the pool is kept for votes and the console
    threads = s.max_batch + s.max_waiting + 40
    result = demo.launch(server_name=s.host, server_port=s.port if port is None else port,
                         prevent_thread_lock=True, quiet=quiet, show_error=True, max_threads=threads,
                         run_history=False, footer_links=["api"], max_file_size=uploads.max_file_bytes,
                         css=CSS, head=HEAD)
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
