"""The maintainers' console: a separate page of the app (``/console``), behind a login.

Security model (verified against Gradio 6.x):
- every console event is registered with ``api_visibility="private"``: it is absent from
  the API page, ``/gradio_api/info`` and ``gradio_client``.  That is *hiding*, not
  protection: Gradio still runs a private handler posted to ``/gradio_api/queue/join`` by
  ``fn_index`` (that is how the browser calls it);
- so every handler first checks the caller's session token (kept server-side in the
  per-browser-session ``gr.State``) with ``feedback.auth.ConsoleAuth.check`` and refuses
  with ``gr.Error`` otherwise.  ``guarded`` below does this for every handler; the handlers
  are also collected in ``ctx.extras["console_handlers"]`` so tests can call each one with
  a bad token.  Log out revokes the token server-side (``ConsoleAuth.logout``).
- user text (chats, comments, user names, session ids) is shown through ``_esc``, which
  makes it inert as HTML *and* as Markdown: a chat line ``![](https://evil.example/p.png)``
  is shown as those characters, and the maintainer's browser fetches nothing.
- exports are handed out by ``ExportShelf``: written in a temporary directory that is gone
  when the handler returns, served from Gradio's cache, and deleted ``EXPORT_TTL_S`` after
  they were made (Gradio serves a cached file to anyone who has its URL).  The database
  copy leaves out the console users and opted-out sessions (``export.shareable_db_copy``).
All queries live in ``feedback.review`` / ``feedback.leaderboard`` / ``feedback.export`` /
``feedback.auth``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import string
import tempfile
import threading
import time
import weakref
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import gradio as gr
import pandas as pd

from assistant.context import AppContext
from feedback import export, leaderboard, review
from feedback.auth import AuthError, ConsoleAuth, has_users
from feedback.registry import canary_tally
from feedback.store import REASON_TAGS, StoreError
from retrain import versions as serving

log = logging.getLogger(__name__)

PRIVATE = "private"
PAGE_SIZE = 50
LIST_COLUMNS = ["record", "created", "kind", "user / session", "model version", "reasons", "comment",
                "status", "prompt"]
CURVES = ("score", "kl", "entropy", "response_length")
EXPORT_TTL_S = 600.0  # an export's download link works this long


def get_auth(ctx: AppContext) -> ConsoleAuth:
    auth = ctx.extras.get("console_auth")
    if auth is None:
        auth = ConsoleAuth(ctx.store, ctx.settings.admin_user, ctx.settings.admin_password)
        ctx.extras["console_auth"] = auth
    return auth


# ----------------------------------------------------------------------------- rendering helpers
# ASCII punctuation (HTML's and Markdown's syntax) as character references: CommonMark never
# reads a reference as syntax (spec: "entity and numeric character references cannot be used in
# place of symbols indicating structure"), GFM's autolinks need a literal ":", "." or "@", and
# the browser shows the character itself.  The HTML five get html.escape's own spelling; "/",
# "(" and ")" stay readable: without "[", "]", "<" and ":" they start nothing.
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}
_INERT = str.maketrans({c: _HTML.get(c, f"&#{ord(c)};") for c in string.punctuation if c not in "/()"}
                       | {"\n": "<br>"})


def _esc(text: str | None) -> str:
    """Untrusted text for a ``gr.Markdown``: inert as HTML and as Markdown, so a chat
    message like ``![](https://evil.example/p.png)`` is shown, not fetched."""
    return str(text or "").replace("\r\n", "\n").replace("\r", "\n").translate(_INERT)


def _client_address(request) -> str:
    """The caller's address, for the login lockout (behind a proxy on this host, uvicorn
    takes it from X-Forwarded-For); empty when unknown (a direct call)."""
    client = getattr(request, "client", None) if request is not None else None
    return str(getattr(client, "host", "") or "")


def _delete_export(path: str) -> None:
    """Deletes one served export and its (per-file) cache directory."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    try:
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


def _delete_exports(paths: set[str]) -> None:
    for path in list(paths):
        _delete_export(path)
    paths.clear()


class ExportShelf:
    """The export files the console hands out, each deleted ``EXPORT_TTL_S`` after it was
    made (or touched by an identical export), and all of them when the process exits.

    Why: Gradio serves a file from its cache to anyone who has the URL, with no login, and
    keeps it forever; we cannot know when the browser has downloaded it, so links expire.
    The working copy is written in a temporary directory that is removed before the
    handler returns: only Gradio's cached copy exists, and it is the one deleted."""

    def __init__(self, component: gr.File):
        self.component = component
        self._files: set[str] = set()
        self._lock = threading.Lock()
        self._at_exit = weakref.finalize(self, _delete_exports, self._files)

    def publish(self, suffix: str, write: Callable[[Path], object]) -> tuple[str, object]:
        """Runs ``write(path)`` and returns (the served path, what ``write`` returned)."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
        with tempfile.TemporaryDirectory(prefix="console-export-") as tmp:
            path = Path(tmp) / f"feedback-{stamp}{suffix}"
            result = write(path)
            served = self.component.move_resource_to_block_cache(path)
        with self._lock:
            self._files.add(served)
        timer = threading.Timer(EXPORT_TTL_S + 1, self.sweep)
        timer.daemon = True
        timer.start()
        return served, result

    def sweep(self, now: float | None = None) -> int:
        """Deletes the exports older than ``EXPORT_TTL_S``; returns how many."""
        now = time.time() if now is None else now
        gone = 0
        with self._lock:
            for path in list(self._files):
                try:
                    expired = now - os.stat(path).st_ctime >= EXPORT_TTL_S
                except FileNotFoundError:
                    expired = True
                if expired:
                    _delete_export(path)
                    self._files.discard(path)
                    self.component.temp_files.discard(path)
                    gone += 1
        return gone


def _filters(since, until, kinds, reason, version, session, has_comment, status, search) -> review.Filters:
    return review.Filters(
        since=(since or "").strip(), until=(until or "").strip(), kinds=list(kinds or []), reason=reason or "",
        model_version=version or "", session=(session or "").strip(),
        has_comment={"with comment": True, "without comment": False}.get(has_comment or ""),
        status=status or "all", search=(search or "").strip()).validate()


def _table(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([[f"{r['record_type']}:{r['id']}", r["created_at"][:19].replace("T", " "), r["kind"],
                          r["user"] or r["session_id"][:12], r["model_version"], r["reasons"], r["comment"][:80],
                          f"excluded: {r['exclude_reason']}" if r["excluded"] else "included", r["snippet"]]
                         for r in rows], columns=LIST_COLUMNS)


def _parse_ref(ref: str) -> tuple[str, str]:
    ref = (ref or "").strip()
    if ":" in ref:
        kind, rid = ref.split(":", 1)
        if kind in ("comparison", "rating"):
            return kind, rid.strip()
    raise StoreError("give a record as comparison:ID or rating:ID (the first column of the table)")


def _record_markdown(rec: dict) -> str:
    verdict = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad",
               "edit": "Edited: the user's rewrite (B) is preferred over the model's answer (A)",
               "up": "Thumbs up", "down": "Thumbs down"}.get(rec["verdict"], rec["verdict"] or "undecided")
    lines = [f"### {rec['record_type']} `{rec['id']}`",
             f"**Verdict:** {_esc(verdict)} &nbsp; **at** {rec['created_at']} &nbsp; **turn** {rec['turn']}",
             f"**Session:** <code>{_esc(rec['session_id'])}</code> (user: {_esc(rec['user'] or '-')}"
             f"{', OPTED OUT' if rec['opt_out'] else ''}) &nbsp; **conversation** <code>{_esc(rec['conversation_id'])}</code>"]
    if rec["reasons"] or rec["comment"]:
        lines.append(f"**Reasons:** {_esc(', '.join(rec['reasons']) or '-')} &nbsp; "
                     f"**Comment:** {_esc(rec['comment'] or '-')}")
    status = (f"**EXCLUDED** by {_esc(rec['excluded_by'])} at {rec['excluded_at']}: {_esc(rec['exclude_reason'])}"
              if rec["excluded"] else "Included in training")
    if rec["used_in_run"]:
        status += f" (used in run `{rec['used_in_run']}`)"
    lines += [f"**Status:** {status}", "#### Conversation up to the judged turn"]
    for m in rec["context"]:
        lines.append(f"<b>{_esc(m.get('role'))}:</b><blockquote>{_esc(m.get('content'))}</blockquote>")
    for ans in rec["answers"]:
        g = ans["generation"]
        meta = "(no generation record)"
        if g:
            meta = (f"version <code>{_esc(g['model_version'])}</code>, sampling <code>"
                    f"{_esc(json.dumps(g['sampling'], ensure_ascii=False))}</code>, tokens "
                    f"{g['prompt_tokens']} in / {g['completion_tokens']} out, latency "
                    f"{g['latency_ms'] or 0:.0f} ms (first token {g['ttft_ms'] or 0:.0f} ms), finish {g['finish_reason']}")
        lines.append(f"#### Answer {_esc(ans['label'])}\n<small>{meta}</small><blockquote>{_esc(ans['text'])}</blockquote>")
    if rec["review_log"]:
        lines.append("#### Review history")
        lines += [f"- {e['at']} **{e['action']}** by {_esc(e['actor'])}: {_esc(e['reason'])}" for e in rec["review_log"]]
    return "\n\n".join(lines)


def _per_day_figure(rows: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    if rows:
        df = pd.DataFrame(rows).pivot_table(index="day", columns="kind", values="n", aggfunc="sum", fill_value=0)
        df.plot(kind="bar", stacked=True, ax=ax, width=0.8)
        ax.legend(fontsize=7, ncol=4)
        ax.tick_params(axis="x", labelsize=7)
    else:
        ax.text(0.5, 0.5, "no judgements yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title("Judgements per day by kind")
    ax.set_xlabel("")
    fig.tight_layout()
    plt.close(fig)
    return fig


def _per_version_figure(rows: list[dict]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 3.2))
    if rows:
        names = [r["version"] for r in rows]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [(r["both_bad_share"] or 0) * 100 for r in rows], 0.4, label='"both bad" share')
        ax.bar([i + 0.2 for i in x], [(r["down_share"] or 0) * 100 for r in rows], 0.4, label="thumbs-down share")
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_ylabel("%")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no judgements yet", ha="center", va="center", transform=ax.transAxes)
    ax.set_title('Share of "both bad" and thumbs-down per model version')
    fig.tight_layout()
    plt.close(fig)
    return fig


def _curves_figure(series: dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ppo = series.get("ppo", {})
    fig, axes = plt.subplots(1, 4, figsize=(12, 2.8))
    for ax, name in zip(axes, CURVES):
        points = ppo.get(name, [])
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points])
        else:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.set_xlabel("PPO step", fontsize=8)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    plt.close(fig)
    return fig


# ----------------------------------------------------------------------------- the page
def build(ctx: AppContext) -> None:
    """Lays out the console inside the current Blocks/route context and wires its events."""
    auth = get_auth(ctx)
    store, registry = ctx.store, ctx.registry
    handlers: dict[str, Callable] = ctx.extras.setdefault("console_handlers", {})

    def user_of(token) -> str:
        """The maintainer behind a session token; refuses (``gr.Error``) otherwise."""
        try:
            return auth.check(token)
        except AuthError as exc:
            raise gr.Error(str(exc), title="Refused", print_exception=False) from None

    def guarded(fn: Callable) -> Callable:
        """The first input of every handler is the session token: checked before anything,
        replaced by the maintainer's name for ``fn``."""
        @functools.wraps(fn)
        def wrapper(token, *args):
            user = user_of(token)
            try:
                return fn(user, *args)
            except StoreError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
        handlers[fn.__name__] = wrapper
        return wrapper

    token = gr.State("")
    cursors = gr.State([None])   # keyset cursors: the start of each page seen so far
    page_keys = gr.State([])     # "type:id" of the rows on screen
    current = gr.State("")       # the opened record, "type:id"
    pending = gr.State(None)     # a promote/rollback waiting for confirmation

    gr.Markdown("# Maintainers' console")
    with gr.Column(visible=True, elem_id="console-login-box") as login_box:
        if not (ctx.settings.admin_password or has_users(store)):
            gr.Markdown("No maintainer account is configured: set `--admin-password` "
                        "(`ASSISTANT_ADMIN_PASSWORD`) or run `python -m feedback add-user`.")
        user_in = gr.Textbox(label="User name", elem_id="console-user")
        password_in = gr.Textbox(label="Password", type="password", elem_id="console-password")
        login_btn = gr.Button("Log in", variant="primary", elem_id="console-login")

    with gr.Column(visible=False, elem_id="console-main") as main:
        with gr.Row():
            who = gr.Markdown("")
            logout_btn = gr.Button("Log out", size="sm", scale=0)
        with gr.Tabs():
            # -- feedback review ----------------------------------------------------------
            with gr.Tab("Feedback", id="feedback"):
                with gr.Row():
                    since = gr.Textbox(label="From (ISO date/time)", placeholder="2025-01-01", scale=1)
                    until = gr.Textbox(label="Until (exclusive)", placeholder="2025-02-01", scale=1)
                    kinds = gr.CheckboxGroup(list(review.KINDS), label="Verdict kind", scale=3)
                with gr.Row():
                    reason = gr.Dropdown(["", *REASON_TAGS], value="", label="Reason tag")
                    version = gr.Dropdown([""], value="", label="Model version", allow_custom_value=True)
                    session = gr.Textbox(label="Session id or user")
                    has_comment = gr.Radio(["any", "with comment", "without comment"], value="any", label="Comment")
                    status = gr.Radio(list(review.STATUSES), value="all", label="Training status")
                with gr.Row():
                    search = gr.Textbox(label="Search text", placeholder="words in the prompt, answers or comment",
                                        scale=4)
                    apply_btn = gr.Button("Apply filters", variant="primary", scale=1, elem_id="console-apply")
                filters = [since, until, kinds, reason, version, session, has_comment, status, search]
                with gr.Row():
                    prev_btn = gr.Button("← Previous", size="sm", scale=0)
                    page_info = gr.Markdown("")
                    next_btn = gr.Button("Next →", size="sm", scale=0)
                table = gr.Dataframe(headers=LIST_COLUMNS, interactive=False, wrap=True, elem_id="console-table",
                                     max_height=420)
                with gr.Row():
                    ref = gr.Textbox(label="Record (click a row, or paste comparison:ID / rating:ID)",
                                     elem_id="console-ref", scale=4)
                    open_btn = gr.Button("Open", scale=1, elem_id="console-open")
                detail = gr.Markdown("", elem_id="console-detail")
                with gr.Row():
                    excl_reason = gr.Textbox(label="Reason (required to exclude)", elem_id="console-reason", scale=3)
                    exclude_btn = gr.Button("Exclude from training", variant="stop", elem_id="console-exclude")
                    restore_btn = gr.Button("Restore", elem_id="console-restore")
                with gr.Accordion("Exclude or restore every record matching the filters", open=False):
                    bulk_confirm = gr.Checkbox(label="Yes, apply to all records the filters select")
                    with gr.Row():
                        bulk_exclude_btn = gr.Button("Exclude all matching", variant="stop")
                        bulk_restore_btn = gr.Button("Restore all matching")
                action_msg = gr.Markdown("", elem_id="console-action-msg")

            # -- charts ---------------------------------------------------------------------
            with gr.Tab("Charts", id="charts") as charts_tab:
                charts_btn = gr.Button("Refresh charts", size="sm")
                day_plot = gr.Plot(label="Per day")
                version_plot = gr.Plot(label="Per version")
                version_table = gr.Dataframe(interactive=False)

            # -- training ---------------------------------------------------------------------
            with gr.Tab("Training", id="training") as training_tab:
                with gr.Row():
                    schedule_md = gr.Markdown("")
                    retrain_btn = gr.Button("Retrain now", scale=0)
                runs_table = gr.Dataframe(interactive=False, wrap=True)
                with gr.Row():
                    run_id = gr.Dropdown([], label="Run", allow_custom_value=True, scale=3)
                    run_btn = gr.Button("Open run", scale=1)
                run_md = gr.Markdown("")
                run_plot = gr.Plot(label="PPO curves")
                run_config = gr.JSON(label="Config the run used")

            # -- versions ---------------------------------------------------------------------
            with gr.Tab("Versions", id="versions") as versions_tab:
                served_md = gr.Markdown("")
                versions_table = gr.Dataframe(interactive=False, wrap=True)
                with gr.Row():
                    serve_version = gr.Dropdown([], label="Version", allow_custom_value=True, scale=2)
                    serve_action = gr.Radio(["rollback", "promote"], value="rollback", label="Action")
                    serve_reason = gr.Textbox(label="Reason", scale=2)
                    serve_btn = gr.Button("Serve this version…", variant="stop")
                with gr.Row(visible=False) as confirm_row:
                    confirm_md = gr.Markdown("")
                    confirm_btn = gr.Button("Confirm", variant="stop", scale=0)
                    cancel_btn = gr.Button("Cancel", scale=0)
                serving_table = gr.Dataframe(interactive=False, wrap=True, label="Serving history")

            # -- leaderboard ------------------------------------------------------------------
            with gr.Tab("Leaderboard", id="leaderboard"):
                gr.Markdown("Bradley-Terry ratings (Elo scale, mean 1000) from users' A/B votes between "
                            "answers of *different* versions, with 95% bootstrap intervals. A tie counts as "
                            "half a win each; \"both bad\", edits and same-version pairs are left out.")
                lb_btn = gr.Button("Compute", size="sm")
                lb_table = gr.Dataframe(interactive=False)

            # -- export -----------------------------------------------------------------------
            with gr.Tab("Export", id="export"):
                gr.Markdown("Exports the judgements selected by the filters of the Feedback tab. Opted-out "
                            "sessions are never exported; excluded records only when asked below. The database "
                            "copy leaves out the console users and opted-out sessions. Download links expire "
                            f"after {EXPORT_TTL_S / 60:.0f} minutes.")
                include_excluded = gr.Checkbox(label="Include excluded records (the filters' status then decides)")
                with gr.Row():
                    trl_btn = gr.Button("TRL JSONL (preference pairs)")
                    csv_btn = gr.Button("CSV (all judgements)")
                    db_btn = gr.Button("Copy of the SQLite database")
                export_msg = gr.Markdown("")
                export_file = gr.File(label="Download", interactive=False, elem_id="console-export-file")
    shelf = ctx.extras["console_exports"] = ExportShelf(export_file)

    # ------------------------------------------------------------------------- handlers
    def login(username, password, request: gr.Request = None):
        try:
            tok = auth.login(username, password, client=_client_address(request))
        except AuthError as exc:
            raise gr.Error(str(exc), title="Login refused", print_exception=False) from None
        log.info("console: %s logged in", username)
        return tok, gr.update(visible=False), gr.update(visible=True), f"Logged in as **{_esc(username)}**", ""
    handlers["login"] = login

    def logout(tok, *_):
        """Revokes the token server-side; forgetting it in the page alone would leave it valid."""
        user = user_of(tok)
        auth.logout(tok)
        log.info("console: %s logged out", user)
        return "", gr.update(visible=True), gr.update(visible=False), ""
    handlers["logout"] = logout

    def _page(f: review.Filters, cursor_stack: list):
        after = tuple(cursor_stack[-1]) if cursor_stack[-1] else None
        rows = review.page(store, f, limit=PAGE_SIZE, after=after)
        total = review.count(store, f)
        first = (len(cursor_stack) - 1) * PAGE_SIZE
        info = (f"{first + 1}–{first + len(rows)} of {total} judgements" if rows else f"no judgements (of {total})")
        return _table(rows), [f"{r['record_type']}:{r['id']}" for r in rows], cursor_stack, info

    @guarded
    def list_first(user, *values):
        return _page(_filters(*values), [None])

    @guarded
    def list_next(user, stack, keys, *values):
        if len(keys) < PAGE_SIZE:
            return _page(_filters(*values), stack)
        rec = review.record(store, *_parse_ref(keys[-1]))
        return _page(_filters(*values), [*stack, (rec["created_at"], rec["id"])])

    @guarded
    def list_prev(user, stack, *values):
        return _page(_filters(*values), stack[:-1] if len(stack) > 1 else [None])

    @guarded
    def versions_choices(user):
        names = review.versions_seen(store)
        return gr.update(choices=["", *names]), gr.update(choices=names,
                                                           value=registry.served_version())

    @guarded
    def open_record(user, reference):
        kind, rid = _parse_ref(reference)
        rec = review.record(store, kind, rid)
        return _record_markdown(rec), f"{kind}:{rid}", f"{kind}:{rid}"

    @guarded
    def select_row(user, keys, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        if row is None or row >= len(keys):
            raise StoreError("no such row")
        kind, rid = _parse_ref(keys[row])
        return _record_markdown(review.record(store, kind, rid)), keys[row], keys[row]

    def _set_one(user, reference, why, excluded: bool):
        kind, rid = _parse_ref(reference)
        n = store.set_excluded(kind, [rid], excluded, why or "", user)
        if not n:
            raise StoreError(f"no {kind} {rid}")
        verb = "Excluded" if excluded else "Restored"
        return _record_markdown(review.record(store, kind, rid)), f"{verb} {kind} `{rid}`."

    @guarded
    def exclude_one(user, reference, why):
        return _set_one(user, reference, why, True)

    @guarded
    def restore_one(user, reference, why):
        return _set_one(user, reference, why, False)

    def _set_bulk(user, confirm, why, values, excluded: bool):
        if not confirm:
            raise StoreError("tick the confirmation box first")
        n = review.set_excluded_matching(store, _filters(*values), excluded, why or "", user)
        return f"{'Excluded' if excluded else 'Restored'} {n} records.", False

    @guarded
    def exclude_matching(user, confirm, why, *values):
        return _set_bulk(user, confirm, why, values, True)

    @guarded
    def restore_matching(user, confirm, why, *values):
        return _set_bulk(user, confirm, why, values, False)

    @guarded
    def charts(user):
        rows = review.per_version(store)
        table_rows = pd.DataFrame([{"version": r["version"], "comparisons": r["comparisons"],
                                    "both bad %": None if r["both_bad_share"] is None else round(100 * r["both_bad_share"], 1),
                                    "ratings": r["ratings"],
                                    "thumbs down %": None if r["down_share"] is None else round(100 * r["down_share"], 1)}
                                   for r in rows])
        return _per_day_figure(review.per_day(store)), _per_version_figure(rows), table_rows

    def _schedule_text() -> str:
        if ctx.scheduler is None:
            text = "Scheduled retraining: **scheduler not running**."
        else:
            nxt = ctx.scheduler.next_run_time()
            text = f"Next scheduled retrain: **{nxt.isoformat(timespec='minutes') if nxt else 'none scheduled'}**"
        return text + "\n\n" + _canary_text()

    def _canary_text() -> str:
        state = registry.canary()
        if not state:
            return "Live canary: **no candidate on trial**" + ("" if ctx.settings.canary_enabled else " (switched off)")
        votes = registry.canary_votes(state["version_id"], state["parent_id"], state["started_at"])
        wins, losses, ties = canary_tally(votes, state["version_id"])
        rate = f"{wins / (wins + losses):.0%}" if wins + losses else "–"
        return (f"Live canary: **{_esc(state['version_id'])}** on trial against {_esc(state['parent_id'])} since "
                f"{_esc(state['started_at'][:16])} (run {_esc(state['run_id'])}): **{wins} wins, {losses} losses, "
                f"{ties} ties** (decisive win rate {rate}; needs {ctx.settings.canary_min_votes}+ decisive votes and "
                f"a lower bound above 50%, at most {ctx.settings.canary_max_votes} votes / "
                f"{ctx.settings.canary_max_minutes:.0f} min)")

    @guarded
    def training(user):
        rows = review.runs(store)
        df = pd.DataFrame(rows, columns=["id", "status", "trigger", "started_at", "finished_at", "preferences",
                                         "data", "decision", "reason", "rm_accuracy", "kl", "candidate_version"])
        return _schedule_text(), df, gr.update(choices=[r["id"] for r in rows])

    @guarded
    def open_run(user, rid):
        d = review.run_detail(store, rid or "")
        run = d["run"]
        text = (f"### Run <code>{_esc(run['id'])}</code>: {run['status']}\n\nTrigger {run['trigger']}, started "
                f"{run['started_at'] or run['created_at']}, finished {run['finished_at'] or '-'}; "
                f"{run['n_preferences'] or 0} preferences; RM accuracy {run['rm_accuracy']}; final KL {run['kl']}\n\n"
                f"**Gate decision:** {_esc(str(run['decision'] or '-'))}: {_esc(run['reason'] or '')}\n\n"
                f"**Data:** <code>{_esc(json.dumps(d['data'], ensure_ascii=False))}</code>")
        others = {p: sorted(v) for p, v in d["series"].items()}
        if others:
            text += f"\n\nLogged metrics: {_esc(json.dumps(others))}"
        return text, _curves_figure(d["series"]), d["config"]

    @guarded
    def retrain_now(user):
        if ctx.scheduler is None:
            raise StoreError("scheduler not running: start the app with --retrain-enabled")
        rid = ctx.scheduler.run_now(trigger="manual")
        log.info("console: %s started retrain %s", user, rid)
        return f"Started run `{rid}`. " + _schedule_text()

    def _versions_view():
        rows = review.versions(store)
        served = registry.served()
        served_text = (f"Serving **{_esc(served['version_id'])}** since {served['at']} "
                       f"({served['action']} by {_esc(served['actor'])}{': ' + _esc(served['reason']) if served['reason'] else ''})"
                       if served else "Nothing served yet.")
        df = pd.DataFrame([{"version": r["id"], "served": "● serving" if r["served"] else "", "parent": r["parent_id"],
                            "kind": r["kind"], "created": r["created_at"], "run": r["run_id"], "note": r["note"]}
                           for r in rows])
        hist = pd.DataFrame(list(reversed(registry.serving_history())),
                            columns=["id", "version_id", "action", "actor", "reason", "at"])
        return served_text, df, gr.update(choices=[r["id"] for r in rows]), hist

    @guarded
    def versions_view(user):
        return _versions_view()

    @guarded
    def ask_serve(user, version_id, action, why):
        registry.version(version_id or "")
        if action not in ("rollback", "promote"):
            raise StoreError("choose rollback or promote")
        return ({"version": version_id, "action": action, "reason": why or ""}, gr.update(visible=True),
                f"**{action.title()} to <code>{_esc(version_id)}</code>?** New chats will be answered by it within seconds.")

    @guarded
    def confirm_serve(user, wanted):
        if not wanted:
            raise StoreError("nothing to confirm")
        serving.serve_version(registry, wanted["version"], wanted["action"], actor=user, reason=wanted["reason"])
        log.info("console: %s %s to %s", user, wanted["action"], wanted["version"])
        return (None, gr.update(visible=False), "", *_versions_view())

    @guarded
    def cancel_serve(user):
        return None, gr.update(visible=False), ""

    @guarded
    def compute_leaderboard(user):
        rows = leaderboard.leaderboard(store)
        return pd.DataFrame(rows, columns=["version", "rating", "ci_low", "ci_high", "games", "wins", "ties", "losses"])

    @guarded
    def export_trl(user, with_excluded, *values):
        f = _filters(*values)
        path, n = shelf.publish(".trl.jsonl", lambda p: export.export_trl(store, p, f,
                                                                          include_excluded=bool(with_excluded)))
        return path, f"{n} preference pairs exported."

    @guarded
    def export_csv(user, with_excluded, *values):
        f = _filters(*values)
        path, n = shelf.publish(".csv", lambda p: export.export_csv(store, p, f, include_excluded=bool(with_excluded)))
        return path, f"{n} judgements exported."

    @guarded
    def export_db(user):
        path, _ = shelf.publish(".sqlite", lambda p: export.shareable_db_copy(store.path, p))
        return path, (f"Consistent copy of the database without console users or opted-out sessions "
                      f"({os.path.getsize(path) // 1024} KiB).")

    # ------------------------------------------------------------------------- wiring
    def ev(trigger, fn, inputs, outputs, name):
        return trigger(fn, inputs, outputs, api_name=f"console_{name}", api_visibility=PRIVATE)

    list_out = [table, page_keys, cursors, page_info]
    ev(login_btn.click, login, [user_in, password_in], [token, login_box, main, who, password_in], "login") \
        .success(list_first, [token, *filters], list_out, api_name="console_list_on_login", api_visibility=PRIVATE) \
        .success(versions_choices, [token], [version, serve_version], api_name="console_versions_on_login",
                 api_visibility=PRIVATE)
    ev(logout_btn.click, logout, [token], [token, login_box, main, detail], "logout")
    ev(apply_btn.click, list_first, [token, *filters], list_out, "list")
    ev(search.submit, list_first, [token, *filters], list_out, "search")
    ev(next_btn.click, list_next, [token, cursors, page_keys, *filters], list_out, "next")
    ev(prev_btn.click, list_prev, [token, cursors, *filters], list_out, "prev")
    ev(open_btn.click, open_record, [token, ref], [detail, current, ref], "open")
    ev(ref.submit, open_record, [token, ref], [detail, current, ref], "open_submit")
    ev(table.select, select_row, [token, page_keys], [detail, current, ref], "select")
    ev(exclude_btn.click, exclude_one, [token, ref, excl_reason], [detail, action_msg], "exclude") \
        .success(list_first, [token, *filters], list_out, api_name="console_list_after_exclude",
                 api_visibility=PRIVATE)
    ev(restore_btn.click, restore_one, [token, ref, excl_reason], [detail, action_msg], "restore") \
        .success(list_first, [token, *filters], list_out, api_name="console_list_after_restore",
                 api_visibility=PRIVATE)
    ev(bulk_exclude_btn.click, exclude_matching, [token, bulk_confirm, excl_reason, *filters],
       [action_msg, bulk_confirm], "exclude_matching")
    ev(bulk_restore_btn.click, restore_matching, [token, bulk_confirm, excl_reason, *filters],
       [action_msg, bulk_confirm], "restore_matching")
    ev(charts_btn.click, charts, [token], [day_plot, version_plot, version_table], "charts")
    training_trigger = ev(retrain_btn.click, retrain_now, [token], [schedule_md], "retrain_now")
    training_trigger.success(training, [token], [schedule_md, runs_table, run_id],
                             api_name="console_training_after_retrain", api_visibility=PRIVATE)
    ev(run_btn.click, open_run, [token, run_id], [run_md, run_plot, run_config], "open_run")
    ev(serve_btn.click, ask_serve, [token, serve_version, serve_action, serve_reason],
       [pending, confirm_row, confirm_md], "ask_serve")
    ev(confirm_btn.click, confirm_serve, [token, pending],
       [pending, confirm_row, confirm_md, served_md, versions_table, serve_version, serving_table], "confirm_serve")
    ev(cancel_btn.click, cancel_serve, [token], [pending, confirm_row, confirm_md], "cancel_serve")
    ev(lb_btn.click, compute_leaderboard, [token], [lb_table], "leaderboard")
    ev(trl_btn.click, export_trl, [token, include_excluded, *filters], [export_file, export_msg], "export_trl")
    ev(csv_btn.click, export_csv, [token, include_excluded, *filters], [export_file, export_msg], "export_csv")
    ev(db_btn.click, export_db, [token], [export_file, export_msg], "export_db")
    # tabs load their data when opened
    ev(charts_tab.select, charts, [token], [day_plot, version_plot, version_table], "charts_tab")
    ev(training_tab.select, training, [token], [schedule_md, runs_table, run_id], "training_tab")
    ev(versions_tab.select, versions_view, [token], [served_md, versions_table, serve_version, serving_table],
       "versions_tab")
