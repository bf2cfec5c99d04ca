"""The maintainers' console: a separate page of the app (``/console``), behind a login.

What each tab shows and does is ``ConsoleService`` (``assistant/console_service.py``, no
Gradio); this module lays the page out, one builder per tab (``build_*_tab``: the tab's
components, then its listeners), and ``build`` adds the login around them.

Security model (verified against Gradio 6.x):
- every console event is registered with ``api_visibility="private"``: it is absent from
  the API page, ``/gradio_api/info`` and ``gradio_client``.  That is *hiding*, not
  protection: Gradio still runs a private handler posted to ``/gradio_api/queue/join`` by
  ``fn_index`` (that is how the browser calls it);
- so every handler first checks the caller's session token (kept server-side in the
  per-browser-session ``gr.State``) with ``feedback.auth.ConsoleAuth.check`` and refuses
  with ``gr.Error`` otherwise.  ``Guard`` does this for every handler; the handlers are
  also collected in ``ctx.extras["console_handlers"]`` so tests can call each one with a
  bad token.  Log out revokes the token server-side (``ConsoleAuth.logout``).  The two
  endpoints that run before a login are the login itself (which refuses with ``gr.Error``)
  and ``console_login_refused``, which returns only the line under the form: the reason the
  *caller's own* browser session was last refused (``LoginRefusals``), no data.
- user text is shown through ``console_service.esc`` in Markdown, and as plain text in
  the tables (datatype "str").
- exports are handed out by ``ExportShelf``: written in a temporary directory that is gone
  when the handler returns, served from Gradio's cache, and deleted ``EXPORT_TTL_S`` after
  they were made (Gradio serves a cached file to anyone who has its URL).  The database
  copy leaves out the console users and opted-out sessions (``export.shareable_db_copy``).
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import gradio as gr

from assistant.console_service import (
    BURST_COLUMNS,
    CANARY_COLUMNS,
    CHECK_COLUMNS,
    COMMENT_CHOICES,
    CONSISTENCY_COLUMNS,
    DATA_COLUMNS,
    DISAGREEMENT_COLUMNS,
    FAST_COLUMNS,
    FEEDBACK_COLUMNS,
    HISTORY_COLUMNS,
    LEADERBOARD_COLUMNS,
    PER_VERSION_COLUMNS,
    PPO_CURVES,
    REASON_COLUMNS,
    RUN_COLUMNS,
    VERSION_COLUMNS,
    ConsoleService,
    Page,
    describe_filters,
    esc,
    kind_choices,
    make_filters,
    parse_ref,
)
from assistant.context import AppContext
from feedback import review
from feedback.auth import AuthError, ConsoleAuth, has_users
from feedback.store import REASON_TAGS, StoreError

log = logging.getLogger(__name__)

PRIVATE = "private"
EXPORT_TTL_S = 600.0  # an export's download link works this long
GRID = "console-grid"  # the class of the console's tables
CARD = "console-card"  # the class of the overview's cards
LOGIN_REFUSALS_KEPT = 1000  # browser sessions whose last refused login is remembered for its line
# The console's own look, added to the page's head by ``build``: table headers on one line
# (a narrow column otherwise breaks its header letter by letter); the overview's cards framed.
CSS = f"""
.{GRID} th, .{GRID} th * {{ white-space: nowrap !important; word-break: normal !important; }}
#console-cards {{ flex-wrap: wrap !important; }}
#console-cards > .{CARD} {{ flex: 1 1 200px !important; min-width: 200px !important; }}
.{CARD} {{ border: 1px solid var(--border-color-primary) !important; border-radius: var(--radius-lg); padding: 0.6em 0.9em; }}
.{CARD} h2 {{ margin: 0.2em 0 !important; }}
"""


def get_auth(ctx: AppContext) -> ConsoleAuth:
    auth = ctx.extras.get("console_auth")
    if auth is None:
        auth = ConsoleAuth(ctx.store, ctx.settings.admin_user, ctx.settings.admin_password)
        ctx.extras["console_auth"] = auth
    return auth


def _client_address(request) -> str:
    """The caller's address, for the login lockout (behind a proxy listed in
    ``--trusted-proxies``, uvicorn takes it from X-Forwarded-For; otherwise the connection's);
    empty when unknown (a direct call)."""
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


# ----------------------------------------------------------------------------- charts
def _subplots(ncols: int, figsize: tuple[float, float]):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=figsize)


def _close(fig):
    import matplotlib.pyplot as plt

    fig.tight_layout()
    plt.close(fig)
    return fig


def _nothing_yet(ax, text: str = "no judgements yet") -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def _per_day_figure(rows: list[dict], by: str = "kind", title: str = "Judgements per day by kind",
                    empty: str = "no judgements yet"):
    """A stacked bar per UTC day of ``rows`` (``{day, <by>, n}``)."""
    import pandas as pd

    fig, ax = _subplots(1, (9, 3.2))
    if rows:
        df = pd.DataFrame(rows).pivot_table(index="day", columns=by, values="n", aggfunc="sum", fill_value=0)
        df.plot(kind="bar", stacked=True, ax=ax, width=0.8)
        ax.legend(fontsize=7, ncol=4)
        ax.tick_params(axis="x", labelsize=7)
    else:
        _nothing_yet(ax, empty)
    ax.set_title(title)
    ax.set_xlabel("")
    return _close(fig)


def _per_version_figure(rows: list[dict]):
    fig, ax = _subplots(1, (9, 3.2))
    if rows:
        names = [r["version"] for r in rows]
        x = range(len(names))
        ax.bar([i - 0.2 for i in x], [(r["both_bad_share"] or 0) * 100 for r in rows], 0.4, label='"both bad" share')
        ax.bar([i + 0.2 for i in x], [(r["down_share"] or 0) * 100 for r in rows], 0.4, label="thumbs-down share")
        ax.set_xticks(list(x), names, fontsize=8)
        ax.set_ylabel("%")
        ax.legend(fontsize=8)
    else:
        _nothing_yet(ax)
    ax.set_title('Share of "both bad" and thumbs-down per model version')
    return _close(fig)


def _curves_figure(series: dict):
    ppo = series.get("ppo", {})
    fig, axes = _subplots(len(PPO_CURVES), (12, 2.8))
    for ax, name in zip(axes, PPO_CURVES):
        points = ppo.get(name, [])
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points])
        else:
            _nothing_yet(ax, "not logged")
        ax.set_title(name.replace("_", " "), fontsize=9)
        ax.tick_params(labelsize=7)
    return _close(fig)


def _leaderboard_figure(rows: list[dict]):
    """Each version's rating with its 95% interval, best at the top."""
    fig, ax = _subplots(1, (6, max(2.2, 0.45 * len(rows) + 1)))
    if rows:
        ordered = sorted(rows, key=lambda r: r["rating"])
        y = range(len(ordered))
        ratings = [r["rating"] for r in ordered]
        ax.errorbar(ratings, list(y), xerr=[[r["rating"] - r["ci_low"] for r in ordered],
                                             [r["ci_high"] - r["rating"] for r in ordered]],
                    fmt="o", capsize=4)
        ax.set_yticks(list(y), [r["version"] for r in ordered], fontsize=8)
        ax.axvline(1000, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("rating (Elo scale), 95% bootstrap interval")
    else:
        _nothing_yet(ax, "no A/B votes between different versions yet")
    ax.set_title("Versions by users' votes")
    return _close(fig)


def _canary_figure(table):
    """The candidate's running win rate over decisive votes with its 90% Wilson band (the
    canary decides one-sided at 95%)."""
    from retrain.reward import wilson

    fig, ax = _subplots(1, (9, 2.8))
    decisive = [w for w in table["winner"] if w != "tie"] if len(table) else []
    if decisive:
        wins, xs, rates, lows, highs = 0, [], [], [], []
        for n, w in enumerate(decisive, 1):
            wins += w == "candidate"
            lo, hi = wilson(wins, n, 1.645)
            xs.append(n)
            rates.append(wins / n)
            lows.append(lo)
            highs.append(hi)
        ax.plot(xs, rates, label="candidate's win rate")
        ax.fill_between(xs, lows, highs, alpha=0.25, label="Wilson bounds")
        ax.axhline(0.5, color="grey", lw=0.8, ls="--")
        ax.set_ylim(0, 1)
        ax.set_xlabel("decisive votes")
        ax.legend(fontsize=8)
    else:
        _nothing_yet(ax, "no decisive canary votes yet")
    ax.set_title("Live canary: users' votes, candidate vs served")
    return _close(fig)


# ----------------------------------------------------------------------------- login guard
class Guard:
    """The login check in front of every console handler.

    ``guard(fn)`` wraps a handler whose first parameter is the maintainer's name: the
    wrapper takes the session token instead, refuses (``gr.Error``) unless it belongs to a
    logged-in maintainer, and shows the service's refusals (``StoreError``) as errors.
    ``guard.on(...)`` registers a wrapped handler as a private event with the token as its
    first input."""

    def __init__(self, auth: ConsoleAuth, token: gr.State, handlers: dict[str, Callable]):
        self.auth = auth
        self.token = token
        self.handlers = handlers

    def user(self, token) -> str:
        """The maintainer behind a session token; refuses (``gr.Error``) otherwise."""
        try:
            return self.auth.check(token)
        except AuthError as exc:
            raise gr.Error(str(exc), title="Refused", print_exception=False) from None

    def __call__(self, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapper(token, *args):
            user = self.user(token)
            try:
                return fn(user, *args)
            except StoreError as exc:
                raise gr.Error(str(exc), print_exception=False) from None
        self.handlers[fn.__name__] = wrapper
        return wrapper

    def on(self, trigger: Callable, fn: Callable, inputs: list, outputs: list, name: str, **options):
        """``trigger`` (``button.click``, ``dependency.success`` ...) runs ``fn`` as the
        private endpoint ``console_<name>`` (``options``: the listener's, e.g. ``show_progress``)."""
        return trigger(fn, [self.token, *inputs], outputs, api_name=f"console_{name}", api_visibility=PRIVATE,
                       **options)


class LoginRefusals:
    """Why each browser session's last login was refused, for the line under the form.

    The login refuses with an error, as every console endpoint does (a raw caller gets the
    reason as the error); the page shows no error box for it but a ``.failure`` listener
    that reads the reason back, for that browser session only.  At most
    ``LOGIN_REFUSALS_KEPT`` sessions are remembered (the oldest are forgotten)."""

    def __init__(self):
        self._why: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, session: str, why: str) -> None:
        with self._lock:
            self._why[session] = why
            self._why.move_to_end(session)
            while len(self._why) > LOGIN_REFUSALS_KEPT:
                self._why.popitem(last=False)

    def forget(self, session: str) -> None:
        with self._lock:
            self._why.pop(session, None)

    def line(self, session: str) -> str:
        """The readable line for the session's last refusal (Markdown)."""
        with self._lock:
            why = self._why.get(session) or "wrong user name or password"
        return f"**Login refused:** {esc(why)}."


def _session_of(request) -> str:
    """The browser session behind a request (empty for a direct call)."""
    return str(getattr(request, "session_hash", "") or "") if request is not None else ""


def _visible(shown: bool) -> dict:
    """An update that shows or hides a component or a layout block."""
    return gr.update(visible=shown)


def _grid(**kwargs) -> gr.Dataframe:
    """A read-only console table (plain-text cells, headers on one line)."""
    return gr.Dataframe(interactive=False, wrap=True, elem_classes=[GRID], **kwargs)


# ----------------------------------------------------------------------------- tabs
@dataclass
class OverviewTab:
    """What the login uses from the Overview tab: it fills the first screen itself."""

    outputs: list            # the to-do list and the cards
    show: Callable[[], tuple]  # their values now


def _todo_markdown(lines: list[str]) -> str:
    return "#### Look at first\n\n" + "\n".join(f"- {line}" for line in lines)


def build_overview_tab(service: ConsoleService, guard: Guard) -> OverviewTab:
    """The first screen: what to look at first; judgements today and this week, the week's
    thumbs-down share, the last run and its outcome, the disagreement queue's size."""
    with gr.Tab("Overview", id="overview") as tab:
        todo = gr.Markdown("", elem_id="console-todo")
        with gr.Row(elem_id="console-cards"):
            cards = [gr.Markdown("", elem_classes=[CARD], elem_id=f"console-card-{name}")
                     for name in ("judgements", "thumbs", "run", "queue")]
        gr.Markdown("Times are UTC; \"today\" starts at 00:00 UTC.")
        refresh_btn = gr.Button("Refresh", size="sm", scale=0, elem_id="console-overview-refresh")

    def show() -> tuple:
        o = service.overview()
        return (_todo_markdown(o.todo), *o.cards)

    @guard
    def overview(user):
        return show()

    outputs = [todo, *cards]
    guard.on(tab.select, overview, [], outputs, "overview_tab")
    guard.on(refresh_btn.click, overview, [], outputs, "overview")
    return OverviewTab(outputs, show)


@dataclass
class FeedbackTab:
    """What other parts of the page use from the Feedback tab."""

    filters: list            # the filter fields, in ``make_filters``' order
    version: gr.Dropdown     # the model-version filter (its choices are set at login)
    detail: gr.Markdown      # the open record
    list_first: Callable     # handler: the first page for the filters
    list_outputs: list


def build_feedback_tab(service: ConsoleService, guard: Guard) -> FeedbackTab:
    """Judgements with filters and pages, one record in full, exclusion and restore."""
    with gr.Tab("Feedback", id="feedback"):
        # (a State is laid out where it is made: directly inside gr.Tabs it would shift the tabs' order)
        cursors = gr.State([None])   # keyset cursors: the start of each page seen so far
        page_keys = gr.State([])     # "type:id" of the rows on screen
        # every filter in one bar, closed; its label says what the list is narrowed to
        with gr.Accordion(describe_filters(make_filters()), open=False, elem_id="console-filters") as filter_bar:
            with gr.Row():
                search = gr.Textbox(label="Search text", placeholder="words in the prompt, answers or comment",
                                    scale=3, elem_id="console-search")
                kinds = gr.CheckboxGroup(kind_choices(), label="Verdict", scale=4, elem_id="console-kinds")
            with gr.Row():
                since = gr.Textbox(label="From (ISO date/time)", placeholder="2025-01-01", min_width=140)
                until = gr.Textbox(label="Until (exclusive)", placeholder="2025-02-01", min_width=140)
                reason = gr.Dropdown(["", *REASON_TAGS], value="", label="Reason tag", min_width=140)
                version = gr.Dropdown([""], value="", label="Model version", allow_custom_value=True, min_width=140)
                session = gr.Textbox(label="Session id or user", min_width=140)
            with gr.Row():
                has_comment = gr.Radio(list(COMMENT_CHOICES), value="any", label="Comment")
                status = gr.Radio(list(review.STATUSES), value="all", label="Training status")
                apply_btn = gr.Button("Apply filters", variant="primary", scale=0, min_width=140,
                                      elem_id="console-apply")
        filters = [since, until, kinds, reason, version, session, has_comment, status, search]
        with gr.Row():
            prev_btn = gr.Button("← Previous", size="sm", scale=0)
            page_info = gr.Markdown("", elem_id="console-page-info")
            next_btn = gr.Button("Next →", size="sm", scale=0)
        with gr.Column(visible=False) as table_box:  # shown once there is a row to show
            table = _grid(headers=FEEDBACK_COLUMNS, elem_id="console-table", max_height=420)
            gr.Markdown("Times are UTC. Click a row to open the record in full.")
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

    def shown(page: Page, f):
        return (page.table, page.keys, page.cursors, page.info, _visible(not page.table.empty),
                gr.update(label=describe_filters(f)))

    @guard
    def list_first(user, *values):
        f = make_filters(*values)
        return shown(service.page(f), f)

    @guard
    def list_next(user, stack, keys, *values):
        f = make_filters(*values)
        return shown(service.next_page(f, stack, keys), f)

    @guard
    def list_prev(user, stack, *values):
        f = make_filters(*values)
        return shown(service.previous_page(f, stack), f)

    @guard
    def open_record(user, reference):
        kind, rid = parse_ref(reference)
        return service.record_view(reference), f"{kind}:{rid}"

    @guard
    def select_row(user, keys, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        reference = service.row_ref(keys, row)
        return service.record_view(reference), reference

    @guard
    def exclude_one(user, reference, why):
        message = service.exclude(reference, why, user)
        return service.record_view(reference), message

    @guard
    def restore_one(user, reference, why):
        message = service.restore(reference, why, user)
        return service.record_view(reference), message

    def _bulk(confirm: bool, change: Callable[[], str]):
        if not confirm:
            raise StoreError("tick the confirmation box first")
        return change(), False

    @guard
    def exclude_matching(user, confirm, why, *values):
        return _bulk(confirm, lambda: service.exclude_matching(make_filters(*values), why, user))

    @guard
    def restore_matching(user, confirm, why, *values):
        return _bulk(confirm, lambda: service.restore_matching(make_filters(*values), why, user))

    listed = [table, page_keys, cursors, page_info, table_box, filter_bar]
    guard.on(apply_btn.click, list_first, filters, listed, "list")
    guard.on(search.submit, list_first, filters, listed, "search")
    guard.on(next_btn.click, list_next, [cursors, page_keys, *filters], listed, "next")
    guard.on(prev_btn.click, list_prev, [cursors, *filters], listed, "prev")
    guard.on(open_btn.click, open_record, [ref], [detail, ref], "open")
    guard.on(ref.submit, open_record, [ref], [detail, ref], "open_submit")
    guard.on(table.select, select_row, [page_keys], [detail, ref], "select")
    excluded = guard.on(exclude_btn.click, exclude_one, [ref, excl_reason], [detail, action_msg], "exclude")
    guard.on(excluded.success, list_first, filters, listed, "list_after_exclude")
    restored = guard.on(restore_btn.click, restore_one, [ref, excl_reason], [detail, action_msg], "restore")
    guard.on(restored.success, list_first, filters, listed, "list_after_restore")
    guard.on(bulk_exclude_btn.click, exclude_matching, [bulk_confirm, excl_reason, *filters],
             [action_msg, bulk_confirm], "exclude_matching")
    guard.on(bulk_restore_btn.click, restore_matching, [bulk_confirm, excl_reason, *filters],
             [action_msg, bulk_confirm], "restore_matching")
    return FeedbackTab(filters, version, detail, list_first, listed)


def build_charts_tab(service: ConsoleService, guard: Guard) -> None:
    """Judgements per day; "both bad" and thumbs-down shares per version."""
    with gr.Tab("Charts", id="charts") as tab:
        refresh_btn = gr.Button("Refresh charts", size="sm")
        charts_info = gr.Markdown("", elem_id="console-charts-info")
        with gr.Column(visible=False) as charts_box:  # shown once there is something to chart
            day_plot = gr.Plot(label="Per day")
            version_plot = gr.Plot(label="Per version")
            version_table = _grid(headers=PER_VERSION_COLUMNS)

    @guard
    def charts(user):
        c = service.charts()
        if not c.per_day:
            return None, None, c.table, c.info, _visible(False)
        return _per_day_figure(c.per_day), _per_version_figure(c.per_version), c.table, c.info, _visible(True)

    shown = [day_plot, version_plot, version_table, charts_info, charts_box]
    guard.on(refresh_btn.click, charts, [], shown, "charts")
    guard.on(tab.select, charts, [], shown, "charts_tab")


def build_training_tab(service: ConsoleService, guard: Guard) -> None:
    """Runs with their status and reason; a run's page (why, the gate's checks, the data by
    kind, the curves, the canary's votes, the config); retrain now."""
    with gr.Tab("Training", id="training") as tab:
        run_ids = gr.State([])   # the run behind each row of the runs table
        with gr.Row():
            schedule_md = gr.Markdown("")
            retrain_btn = gr.Button("Retrain now", scale=0, visible=service.scheduler is not None)  # else it refuses
        runs_info = gr.Markdown("", elem_id="console-runs-info")
        with gr.Column(visible=False) as runs_box:  # shown once there is a run
            runs_table = _grid(headers=RUN_COLUMNS, elem_id="console-runs")
            with gr.Row():
                run_id = gr.Dropdown([], label="Run", allow_custom_value=True, scale=3)
                run_btn = gr.Button("Open run", scale=1)
        with gr.Column(visible=False, elem_id="console-run-page") as run_box:  # shown once a run is opened
            run_md = gr.Markdown("", elem_id="console-run")
            with gr.Row():
                with gr.Column(visible=False) as checks_box:
                    checks = _grid(label="Gate checks", headers=CHECK_COLUMNS, elem_id="console-checks")
                with gr.Column(visible=False) as data_box:
                    data = _grid(label="Judgements used, by kind", headers=DATA_COLUMNS, elem_id="console-run-data")
            with gr.Column(visible=False) as curves_box:
                run_plot = gr.Plot(label="PPO curves")
            with gr.Column(visible=False) as canary_box:  # only for a run that went on trial
                canary_md = gr.Markdown("")
                with gr.Row():
                    canary_plot = gr.Plot(label="Live canary")
                    canary_votes = _grid(label="Canary votes", headers=CANARY_COLUMNS, max_height=300)
            with gr.Accordion("Config the run used", open=False):
                run_config = gr.JSON(show_label=False)

    @guard
    def training(user):
        t = service.training()
        return t.schedule, t.table, gr.update(choices=t.run_ids), t.run_ids, t.info, _visible(bool(t.run_ids))

    def page(rid):
        d = service.run_detail(rid)
        trial = bool(d.canary_text)
        return (d.text, d.checks, d.data, _curves_figure(d.series) if d.has_curves else None, _visible(trial),
                d.canary_text, _canary_figure(d.canary) if trial else None, d.canary, d.config, rid, _visible(True),
                _visible(not d.checks.empty), _visible(not d.data.empty), _visible(d.has_curves))

    @guard
    def open_run(user, rid):
        return page(rid)

    @guard
    def select_run(user, ids, evt: gr.SelectData):
        row = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        return page(service.row_ref(ids, row))

    @guard
    def retrain_now(user):
        return service.retrain_now(user)

    shown = [schedule_md, runs_table, run_id, run_ids, runs_info, runs_box]
    opened = [run_md, checks, data, run_plot, canary_box, canary_md, canary_plot, canary_votes, run_config, run_id,
              run_box, checks_box, data_box, curves_box]
    started = guard.on(retrain_btn.click, retrain_now, [], [schedule_md], "retrain_now")
    guard.on(started.success, training, [], shown, "training_after_retrain")
    guard.on(run_btn.click, open_run, [run_id], opened, "open_run")
    guard.on(runs_table.select, select_run, [run_ids], opened, "select_run")
    guard.on(tab.select, training, [], shown, "training_tab")


def build_quality_tab(service: ConsoleService, guard: Guard) -> None:
    """Label quality, reviewed before a retrain trusts the labels: the disagreement queue,
    self-contradicting and one-button sessions, inhumanly fast voters, reason tags over
    time; each list offers "exclude with a reason"."""
    with gr.Tab("Label quality", id="quality") as tab:
        queue_keys, consistency_keys, fast_keys, burst_keys = (gr.State([]) for _ in range(4))  # the rows' keys
        refresh_btn = gr.Button("Refresh", size="sm", scale=0)
        gr.Markdown("#### Disagreement queue\nJudgements the current reward models most strongly disagree "
                    "with. Click one to read it; exclude it if the label is wrong.")
        queue_info = gr.Markdown("", elem_id="console-queue-info")
        with gr.Column(visible=False) as queue_box:  # each list shows only once it has a row
            queue = _grid(headers=DISAGREEMENT_COLUMNS, elem_id="console-disagreements", max_height=360)
            record_md = gr.Markdown("", elem_id="console-quality-record")
            with gr.Row():
                ref = gr.Textbox(label="Record", elem_id="console-quality-ref", scale=2)
                ref_reason = gr.Textbox(label="Reason (required)", elem_id="console-quality-reason", scale=3)
                exclude_ref_btn = gr.Button("Exclude from training", variant="stop",
                                            elem_id="console-quality-exclude")
        gr.Markdown("#### Sessions\nSessions that contradict themselves (the same two answers judged both ways) or "
                    "press one button, sessions that vote faster than anyone can read, and clients that write "
                    "bursts of judgements of any kind. Click a row to pick its session.")
        consistency_info = gr.Markdown("")
        with gr.Column(visible=False) as consistency_box:
            consistency = _grid(label="Consistency", headers=CONSISTENCY_COLUMNS, elem_id="console-consistency",
                                max_height=300)
        fast_info = gr.Markdown("")
        with gr.Column(visible=False) as fast_box:
            fast = _grid(label="Inhuman speed", headers=FAST_COLUMNS, elem_id="console-fast", max_height=300)
        burst_info = gr.Markdown("")
        with gr.Column(visible=False) as burst_box:
            burst = _grid(label="Bursts", headers=BURST_COLUMNS, elem_id="console-bursts", max_height=300)
        with gr.Row(visible=False) as session_row:  # once some list names a session
            session = gr.Textbox(label="Session", elem_id="console-quality-session", scale=2)
            session_reason = gr.Textbox(label="Reason (required)", scale=3, elem_id="console-session-reason")
            exclude_session_btn = gr.Button("Exclude all its judgements", variant="stop",
                                            elem_id="console-session-exclude")
        quality_msg = gr.Markdown("", elem_id="console-quality-msg")
        gr.Markdown("#### Reason tags over time")
        reasons_info = gr.Markdown("")
        with gr.Column(visible=False) as reasons_box:
            reasons_plot = gr.Plot(show_label=False)
            reasons = _grid(headers=REASON_COLUMNS, max_height=240)

    @guard
    def refresh(user):
        q, c, f, b = service.disagreements(), service.consistency(), service.fast_voters(), service.bursts()
        rows, table = service.reason_counts()
        plot = _per_day_figure(rows, "reason", "Reason tags of ratings per day") if rows else None
        return (q.info, q.table, q.keys, c.info, c.table, c.keys, f.info, f.table, f.keys, b.info, b.table, b.keys,
                plot, table, service.reason_info(rows), *(_visible(bool(x.keys)) for x in (q, c, f, b)),
                _visible(bool(c.keys or f.keys or b.keys)), _visible(bool(rows)))

    def _row(evt: gr.SelectData) -> int:
        return evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index

    @guard
    def pick_record(user, keys, evt: gr.SelectData):
        reference = service.row_ref(keys, _row(evt))
        return service.record_view(reference), reference

    @guard
    def pick_session(user, keys, evt: gr.SelectData):
        return service.row_ref(keys, _row(evt))

    @guard
    def exclude_record(user, reference, why):
        message = service.exclude(reference, why, user)
        return service.record_view(reference), message

    @guard
    def exclude_session(user, session_id, why):
        return service.exclude_session(session_id, why, user)

    lists = [queue_info, queue, queue_keys, consistency_info, consistency, consistency_keys, fast_info, fast,
             fast_keys, burst_info, burst, burst_keys, reasons_plot, reasons, reasons_info, queue_box,
             consistency_box, fast_box, burst_box, session_row, reasons_box]
    guard.on(tab.select, refresh, [], lists, "quality_tab")
    guard.on(refresh_btn.click, refresh, [], lists, "quality")
    guard.on(queue.select, pick_record, [queue_keys], [record_md, ref], "quality_pick")
    guard.on(consistency.select, pick_session, [consistency_keys], [session], "consistency_pick")
    guard.on(fast.select, pick_session, [fast_keys], [session], "fast_pick")
    guard.on(burst.select, pick_session, [burst_keys], [session], "burst_pick")
    excluded = guard.on(exclude_ref_btn.click, exclude_record, [ref, ref_reason], [record_md, quality_msg],
                        "quality_exclude")
    guard.on(excluded.success, refresh, [], lists, "quality_after_exclude")
    session_excluded = guard.on(exclude_session_btn.click, exclude_session, [session, session_reason],
                                [quality_msg], "session_exclude")
    guard.on(session_excluded.success, refresh, [], lists, "quality_after_session_exclude")


def build_versions_tab(service: ConsoleService, guard: Guard) -> gr.Dropdown:
    """What is served, lineage, serving history; promote / roll back after a confirmation.
    Returns the version picker (its choices are set at login)."""
    with gr.Tab("Versions", id="versions") as tab:
        pending = gr.State(None)     # a promote/rollback waiting for confirmation
        served_md = gr.Markdown("", elem_id="console-served")
        versions_table = _grid(headers=VERSION_COLUMNS, elem_id="console-versions")
        serve_info = gr.Markdown("", elem_id="console-serve-info")
        with gr.Row(visible=False, elem_id="console-serve") as serve_row:  # only with another version to serve
            serve_version = gr.Dropdown([], label="Version", allow_custom_value=True, scale=2)
            serve_action = gr.Radio(["rollback", "promote"], value="rollback", label="Action")
            serve_reason = gr.Textbox(label="Reason", scale=2)
            serve_btn = gr.Button("Serve this version…", elem_id="console-serve-btn")  # red only to confirm
        with gr.Row(visible=False) as confirm_row:
            confirm_md = gr.Markdown("")
            confirm_btn = gr.Button("Confirm", variant="stop", scale=0)
            cancel_btn = gr.Button("Cancel", scale=0)
        with gr.Column(visible=False) as history_box:
            serving_table = _grid(label="Serving history", headers=HISTORY_COLUMNS)

    def shown():
        v = service.versions()
        return (v.served, v.table, gr.update(choices=v.ids), v.history, v.serve_info, _visible(v.can_serve),
                _visible(not v.history.empty))

    @guard
    def versions_view(user):
        return shown()

    @guard
    def ask_serve(user, version_id, action, why):
        plan, question = service.plan_serve(version_id, action, why)
        return plan, gr.update(visible=True), question

    @guard
    def confirm_serve(user, plan):
        service.serve(plan, user)
        return None, gr.update(visible=False), "", *shown()

    @guard
    def cancel_serve(user):
        return None, gr.update(visible=False), ""

    view = [served_md, versions_table, serve_version, serving_table, serve_info, serve_row, history_box]
    asking = [pending, confirm_row, confirm_md]
    guard.on(serve_btn.click, ask_serve, [serve_version, serve_action, serve_reason], asking, "ask_serve")
    guard.on(confirm_btn.click, confirm_serve, [pending], [*asking, *view], "confirm_serve")
    guard.on(cancel_btn.click, cancel_serve, [], asking, "cancel_serve")
    guard.on(tab.select, versions_view, [], view, "versions_tab")
    return serve_version


def build_leaderboard_tab(service: ConsoleService, guard: Guard) -> None:
    """Bradley-Terry ratings of the versions from users' A/B votes: a plot beside the table."""
    with gr.Tab("Leaderboard", id="leaderboard") as tab:
        gr.Markdown("Bradley-Terry ratings (Elo scale, mean 1000) from users' A/B votes between "
                    "answers of *different* versions, with 95% bootstrap intervals. A tie counts as "
                    "half a win each; \"both bad\", edits and same-version pairs are left out.")
        compute_btn = gr.Button("Recompute", size="sm", scale=0)
        board_info = gr.Markdown("", elem_id="console-leaderboard-info")
        with gr.Row(visible=False) as board_box:  # once two versions met in a vote
            board_plot = gr.Plot(show_label=False)
            board = _grid(headers=LEADERBOARD_COLUMNS, elem_id="console-leaderboard")

    @guard
    def compute_leaderboard(user):
        rows, table = service.leaderboard()
        return (_leaderboard_figure(rows) if rows else None), table, service.leaderboard_info(rows), _visible(bool(rows))

    shown = [board_plot, board, board_info, board_box]
    guard.on(compute_btn.click, compute_leaderboard, [], shown, "leaderboard")
    guard.on(tab.select, compute_leaderboard, [], shown, "leaderboard_tab")


def build_export_tab(service: ConsoleService, guard: Guard, filters: list) -> ExportShelf:
    """TRL JSONL and CSV of the judgements the Feedback tab's ``filters`` select, and a copy
    of the database.  Returns the shelf that hands the files out."""
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
    shelf = ExportShelf(export_file)

    @guard
    def export_trl(user, with_excluded, *values):
        f = make_filters(*values)
        return shelf.publish(".trl.jsonl", lambda p: service.export_trl(f, p, bool(with_excluded)))

    @guard
    def export_csv(user, with_excluded, *values):
        f = make_filters(*values)
        return shelf.publish(".csv", lambda p: service.export_csv(f, p, bool(with_excluded)))

    @guard
    def export_db(user):
        return shelf.publish(".sqlite", service.export_db)

    shown = [export_file, export_msg]
    guard.on(trl_btn.click, export_trl, [include_excluded, *filters], shown, "export_trl")
    guard.on(csv_btn.click, export_csv, [include_excluded, *filters], shown, "export_csv")
    guard.on(db_btn.click, export_db, [], shown, "export_db")
    return shelf


# ----------------------------------------------------------------------------- the page
def build(ctx: AppContext) -> None:
    """Lays out the console inside the current Blocks/route context: the login, then the
    tabs (hidden until logged in), each built by its ``build_*_tab``."""
    auth = get_auth(ctx)
    service = ctx.extras["console_service"] = ConsoleService(ctx.settings, ctx.store, ctx.registry, ctx.scheduler)
    handlers: dict[str, Callable] = ctx.extras.setdefault("console_handlers", {})
    token = gr.State("")
    guard = Guard(auth, token, handlers)

    gr.HTML(head=f"<style>{CSS}</style>", visible="hidden")
    gr.Markdown("# Maintainers' console")
    with gr.Column(visible=True, elem_id="console-login-box") as login_box:
        if not (ctx.settings.admin_password or has_users(ctx.store)):
            gr.Markdown("No maintainer account is configured: set `--admin-password` "
                        "(`ASSISTANT_ADMIN_PASSWORD`) or run `python -m feedback add-user`.")
        user_in = gr.Textbox(label="User name", elem_id="console-user")
        password_in = gr.Textbox(label="Password", type="password", elem_id="console-password")
        login_btn = gr.Button("Log in", variant="primary", elem_id="console-login")
        login_msg = gr.Markdown("", elem_id="console-login-msg")

    with gr.Column(visible=False, elem_id="console-main") as main:
        with gr.Row():
            who = gr.Markdown("")
            logout_btn = gr.Button("Log out", size="sm", scale=0)
        with gr.Tabs():
            overview = build_overview_tab(service, guard)
            feedback = build_feedback_tab(service, guard)
            build_charts_tab(service, guard)
            build_training_tab(service, guard)
            build_quality_tab(service, guard)
            serve_version = build_versions_tab(service, guard)
            build_leaderboard_tab(service, guard)
            ctx.extras["console_exports"] = build_export_tab(service, guard, feedback.filters)

    refusals = LoginRefusals()

    def login(username, password, request: gr.Request = None):
        """Refuses with an error (shown as the line under the form, not over it); on success
        the token goes into the session's State and ``enter`` opens the console."""
        try:
            tok = auth.login(username, password, client=_client_address(request))
        except AuthError as exc:
            refusals.remember(_session_of(request), str(exc))
            raise gr.Error(str(exc), title="Login refused", visible=False, print_exception=False) from None
        refusals.forget(_session_of(request))
        log.info("console: %s logged in", username)
        return tok, f"Logged in as **{esc(username)}**"
    handlers["login"] = login

    def login_refused(request: gr.Request = None):
        """The line under the form after a refused login (this browser session's own reason);
        the password field is emptied for the next try, the form stays as it is."""
        return refusals.line(_session_of(request)), ""

    @guard
    def enter(user):
        """After a login: the form gives way to the console, which opens on its first screen."""
        return (_visible(False), _visible(True), "", "", *overview.show())

    def logout(tok, *_):
        """Revokes the token server-side; forgetting it in the page alone would leave it valid."""
        user = guard.user(tok)
        auth.logout(tok)
        log.info("console: %s logged out", user)
        return "", gr.update(visible=True), gr.update(visible=False), ""
    handlers["logout"] = logout

    @guard
    def versions_choices(user):
        return (gr.update(choices=["", *service.filter_versions()]),
                gr.update(choices=service.filter_versions(), value=service.served_version()))

    # the login writes only the token and the (hidden) greeting: a refusal marks nothing on the form
    logged_in = gr.on([login_btn.click, password_in.submit], login, [user_in, password_in], [token, who],
                      api_name="console_login", api_visibility=PRIVATE, show_progress="hidden")
    logged_in.failure(login_refused, [], [login_msg, password_in], api_name="console_login_refused",
                      api_visibility=PRIVATE, show_progress="hidden")
    guard.on(logged_in.success, enter, [], [login_box, main, password_in, login_msg, *overview.outputs], "enter",
             show_progress="hidden")
    listed = guard.on(logged_in.success, feedback.list_first, feedback.filters, feedback.list_outputs,
                      "list_on_login")
    guard.on(listed.success, versions_choices, [], [feedback.version, serve_version], "versions_on_login")
    logout_btn.click(logout, [token], [token, login_box, main, feedback.detail], api_name="console_logout",
                     api_visibility=PRIVATE)
