"""The maintainers' console as plain Python (no Gradio here): what each tab of the console
(``assistant/console.py``) shows and every action it offers, as ``ChatService`` is for the chat.

- Methods take plain values: ``review.Filters`` (``make_filters`` builds them from the
  Feedback tab's fields), a record reference ``comparison:ID`` / ``rating:ID``, and the
  maintainer's name for every change that is audited (exclusions, serving, retrains).
- They return plain data: Markdown for the text views, a sentence for an action, lists,
  dicts and pandas DataFrames (the tables as shown).
- A refused request raises ``StoreError`` with a message for the maintainer: ``ConsoleError``
  for the console's own checks, ``NotFound`` / ``NotServable`` from the layers below.

Markdown views show user text (chats, comments, names) through ``esc``: inert as HTML *and*
as Markdown, so a chat line ``![](https://evil.example/p.png)`` is shown as those characters
and the maintainer's browser fetches nothing.  Table cells are plain text: free text cut to
``PREVIEW`` characters (the record view has it all), times as ``2026-11-22 11:05`` (UTC),
record and run ids in the last column.

All SQL lives in ``feedback.review`` / ``feedback.leaderboard`` / ``feedback.export`` /
``feedback.registry``.
"""

from __future__ import annotations

import json
import logging
import os
import string
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from assistant.settings import Settings
from feedback import export, leaderboard, quality, review
from feedback.registry import Registry
from feedback.store import FeedbackStore, StoreError
from retrain import versions as serving
from retrain.canary import CanaryConfig
from retrain.canary import status as canary_status
from retrain.job import LABEL_SCORES

log = logging.getLogger(__name__)

PAGE_SIZE = 50
PREVIEW = 80  # characters of free text in a table cell
FEEDBACK_COLUMNS = ["time", "kind", "user", "version", "reasons", "comment", "status", "prompt", "record"]
RUN_COLUMNS = ["started", "status", "reason", "trigger", "prefs", "RM acc", "KL", "took", "version", "run"]
VERSION_COLUMNS = ["version", "serving", "parent", "kind", "created", "run", "note"]
HISTORY_COLUMNS = ["time", "version", "action", "by", "reason"]
PER_VERSION_COLUMNS = ["version", "comparisons", "both bad %", "ratings", "thumbs down %"]
LEADERBOARD_COLUMNS = ["version", "rating", "95% CI", "games", "wins", "ties", "losses"]
CHECK_COLUMNS = ["check", "result", "value", "needs", "threshold"]
DATA_COLUMNS = ["kind", "seen", "used", "dropped", "why dropped"]
CANARY_COLUMNS = ["time", "verdict", "candidate", "winner"]
DISAGREEMENT_COLUMNS = ["time", "kind", "human said", "reward models say", "disagreement", "user", "status", "prompt",
                        "record"]
CONSISTENCY_COLUMNS = ["user", "votes", "contradictions", "A share", "most pressed", "excluded", "session"]
FAST_COLUMNS = ["user", "votes", "too fast", "median s", "excluded", "session"]
BURST_COLUMNS = ["client", "most in 10 min", "votes", "rewrites", "rankings", "thumbs", "sessions", "excluded",
                 "busiest session"]
REASON_COLUMNS = ["day", "reason", "thumb", "ratings"]
QUEUE_SIZE = 50
PPO_CURVES = ("score", "kl", "entropy", "response_length")  # the curves a run's page plots
SERVE_ACTIONS = ("rollback", "promote")
COMMENT_CHOICES = {"any": None, "with comment": True, "without comment": False}
# What a stored verdict or thumb is called in tables, filters and charts (stored values and
# exports keep the codes): the words of the chat's buttons, shortened.
VERDICT_LABELS = {"a": "A better", "b": "B better", "tie": "Tie", "both_bad": "Both bad", "edit": "Rewrite",
                  "rank": "Ranking", "up": "Thumbs up", "down": "Thumbs down"}
WEEK_DAYS = 7              # the overview's "this week": today and the 6 days before (UTC)
DOWN_ALERT_SHARE = 0.5     # the overview asks for a look once this share of the week's thumbs is down...
DOWN_ALERT_MIN = 3         # ...out of at least this many ratings
VERDICT_WORDS = {"a": "A is better", "b": "B is better", "tie": "Tie", "both_bad": "Both are bad",
                 "edit": "Edited: the user's rewrite (B) is preferred over the model's answer (A)",
                 "up": "Thumbs up", "down": "Thumbs down", "rank": "Ranked"}


class ConsoleError(StoreError):
    """A request the console refuses by itself; the message is meant for the maintainer."""


# ----------------------------------------------------------------------------- text helpers
# ASCII punctuation (HTML's and Markdown's syntax) as character references: CommonMark never
# reads a reference as syntax (spec: "entity and numeric character references cannot be used in
# place of symbols indicating structure"), GFM's autolinks need a literal ":", "." or "@", and
# the browser shows the character itself.  The HTML five get html.escape's own spelling; "/",
# "(" and ")" stay readable: without "[", "]", "<" and ":" they start nothing.
_HTML = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#x27;"}
_INERT = str.maketrans({c: _HTML.get(c, f"&#{ord(c)};") for c in string.punctuation if c not in "/()"}
                       | {"\n": "<br>"})


def esc(text: object) -> str:
    """Untrusted text for Markdown: inert as HTML and as Markdown, so a chat message like
    ``![](https://evil.example/p.png)`` is shown, not fetched."""
    return str(text or "").replace("\r\n", "\n").replace("\r", "\n").translate(_INERT)


def _parse_time(stamp: str | None) -> datetime | None:
    try:
        t = datetime.fromisoformat(stamp or "")
    except ValueError:
        return None
    return t.astimezone(timezone.utc) if t.tzinfo else t


def when(stamp: str | None) -> str:
    """A stored ISO time as ``2026-11-22 11:05`` (UTC); text that is no time stays as it is."""
    t = _parse_time(stamp)
    return t.strftime("%Y-%m-%d %H:%M") if t else (stamp or "")


def took(start: str | None, end: str | None) -> str:
    """How long from ``start`` to ``end``: ``45 s``, ``12 min``, ``2 h 5 min``; empty until
    both are known."""
    t0, t1 = _parse_time(start), _parse_time(end)
    if not (t0 and t1):
        return ""
    seconds = max(0, round((t1 - t0).total_seconds()))
    if seconds < 60:
        return f"{seconds} s"
    hours, minutes = divmod(seconds // 60, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"


def preview(text: object, limit: int = PREVIEW) -> str:
    """Free text on one line, at most ``limit`` characters (ending in "…" when cut)."""
    line = " ".join(str(text or "").split())
    return line if len(line) <= limit else line[:limit - 1].rstrip() + "…"


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _percent(share: float | None) -> float | None:
    return None if share is None else round(100 * share, 1)


def verdict_label(kind: str | None) -> str:
    """A verdict or thumb in words (``both_bad`` -> "Both bad", ``thumbs up`` -> "Thumbs up");
    anything else stays as it is."""
    kind = kind or ""
    return VERDICT_LABELS.get(kind.removeprefix("thumbs "), kind)


def kind_choices() -> list[tuple[str, str]]:
    """The Feedback filter's verdict kinds as (words shown, stored value)."""
    return [(verdict_label(k), k) for k in review.KINDS]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' * (n != 1)}"


def parse_ref(ref: str | None) -> tuple[str, str]:
    """``comparison:ID`` or ``rating:ID`` as (record type, id)."""
    ref = (ref or "").strip()
    if ":" in ref:
        kind, rid = ref.split(":", 1)
        if kind in ("comparison", "rating"):
            return kind, rid.strip()
    raise ConsoleError("give a record as comparison:ID or rating:ID (the record column of the table)")


def make_filters(since: str = "", until: str = "", kinds: list[str] | None = None, reason: str = "",
                 version: str = "", session: str = "", has_comment: str = "any", status: str = "all",
                 search: str = "") -> review.Filters:
    """The Feedback tab's fields (in their order on the page) as validated filters;
    ``has_comment`` is one of ``COMMENT_CHOICES``."""
    return review.Filters(
        since=(since or "").strip(), until=(until or "").strip(), kinds=list(kinds or []), reason=reason or "",
        model_version=version or "", session=(session or "").strip(),
        has_comment=COMMENT_CHOICES.get(has_comment or "any"), status=status or "all",
        search=(search or "").strip()).validate()


def describe_filters(f: review.Filters) -> str:
    """The filter bar's label: what the list is narrowed to, in words."""
    comment = {True: "with a comment", False: "without a comment"}.get(f.has_comment)
    parts = [f"“{preview(f.search, 30)}”" if f.search else "",
             ", ".join(verdict_label(k) for k in f.kinds),
             f"from {f.since}" if f.since else "", f"until {f.until}" if f.until else "",
             f"tag {f.reason}" if f.reason else "", f"version {f.model_version}" if f.model_version else "",
             f"session or user {f.session}" if f.session else "", comment or "",
             f.status if f.status != "all" else ""]
    shown = [part for part in parts if part]
    return "Filters · " + (" · ".join(shown) if shown else "none (every judgement)")


# ----------------------------------------------------------------------------- tables and views
def feedback_table(rows: list[dict]) -> pd.DataFrame:
    """``review.page`` rows as the Feedback tab shows them."""
    return pd.DataFrame([[when(r["created_at"]), verdict_label(r["kind"]), r["user"] or r["session_id"][:12], r["model_version"],
                          r["reasons"], preview(r["comment"]),
                          preview(f"excluded: {r['exclude_reason']}") if r["excluded"] else "included",
                          preview(r["snippet"]), f"{r['record_type']}:{r['id']}"]
                         for r in rows], columns=FEEDBACK_COLUMNS)


def run_reason(run: dict) -> str:
    """Why a run ended as it did, in words: its stored reason, else the gate's failed checks;
    a rejected or failed run always gets some words."""
    if run["reason"]:
        return run["reason"]
    decision = run["decision"]
    if isinstance(decision, dict) and decision.get("reasons"):
        return "; ".join(str(r) for r in decision["reasons"])
    return "no reason recorded" if run["status"] in ("rejected", "failed") else ""


def runs_table(runs: list[dict]) -> pd.DataFrame:
    """``review.runs`` rows as the Training tab shows them."""
    return pd.DataFrame([[when(r["started_at"]), r["status"], preview(run_reason(r)), r["trigger"],
                          "" if r["preferences"] is None else r["preferences"], _number(r["rm_accuracy"], 3),
                          _number(r["kl"], 2), took(r["started_at"], r["finished_at"]), r["candidate_version"],
                          r["id"]] for r in runs], columns=RUN_COLUMNS)


def checks_table(decision: dict) -> pd.DataFrame:
    """The gate's checks as stored (``{name, value, op, threshold, passed}``): failed first."""
    rows = sorted(decision.get("checks") or [], key=lambda c: bool(c.get("passed")))
    return pd.DataFrame([[str(c.get("name", "")).replace("_", " "), "pass" if c.get("passed") else "FAIL",
                          _value(c.get("value")), c.get("op", ""), _value(c.get("threshold"))] for c in rows],
                        columns=CHECK_COLUMNS)


def _value(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else str(v)
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def data_table(judgements: dict) -> pd.DataFrame:
    """A snapshot's per-kind ledger (``{kind: {seen, used, dropped: {reason: n}}}``)."""
    rows = []
    for kind, j in (judgements or {}).items():
        dropped = j.get("dropped") or {}
        rows.append([kind.replace("_", " "), j.get("seen", 0), j.get("used", 0), sum(dropped.values()),
                     "; ".join(f"{n} {why}" for why, n in dropped.items())])
    return pd.DataFrame(rows, columns=DATA_COLUMNS)


def canary_table(votes: list[dict], version_id: str) -> pd.DataFrame:
    rows = []
    for v in votes:
        side = "A" if v["a_version"] == version_id else "B"
        winner = ("tie" if v["verdict"] not in ("a", "b") else
                  "candidate" if v["verdict"].upper() == side else "served")
        rows.append([when(v["decided_at"]), verdict_label(v["verdict"]), side, winner])
    return pd.DataFrame(rows, columns=CANARY_COLUMNS)


def _human_said(row: dict) -> str:
    if row["source"].startswith("thumb") or row["source"] == "both_bad":
        return "good" if row["label"] >= 0.5 else "bad"
    return "tie" if row["label"] == 0.5 else "chosen better"


def _models_say(row: dict) -> str:
    if row["source"].startswith("thumb") or row["source"] == "both_bad":
        return f"{'above' if row['model'] > 0 else 'below'} a typical answer ({row['model']:+.2f})"
    if row["label"] == 0.5:
        return f"{'first' if row['model'] > 0 else 'second'} better ({abs(row['model']):.2f})"
    return f"{'chosen' if row['model'] > 0 else 'rejected'} better ({row['model']:+.2f})"


def _last_user(context: str | None) -> str:
    try:
        messages = json.loads(context or "[]")
    except ValueError:
        return ""
    return next((m.get("content", "") for m in reversed(messages) if m.get("role") == "user"), "")


def record_markdown(rec: dict) -> str:
    """One ``review.record`` in full, as Markdown with every user text escaped."""
    verdict = VERDICT_WORDS.get(rec["verdict"], rec["verdict"] or "undecided")
    if rec.get("order"):  # "compare more": best first, "=" between equal ranks
        verdict += f" {rec['order']}"
    lines = [f"### {rec['record_type']} `{rec['id']}`",
             f"**Verdict:** {esc(verdict)} &nbsp; **at** {when(rec['created_at'])} UTC &nbsp; **turn** {rec['turn']}",
             f"**Session:** <code>{esc(rec['session_id'])}</code> (user: {esc(rec['user'] or '-')}"
             f"{', OPTED OUT' if rec['opt_out'] else ''}) &nbsp; **conversation** <code>{esc(rec['conversation_id'])}</code>"]
    if rec["reasons"] or rec["comment"]:
        lines.append(f"**Reasons:** {esc(', '.join(rec['reasons']) or '-')} &nbsp; "
                     f"**Comment:** {esc(rec['comment'] or '-')}")
    status = (f"**EXCLUDED** by {esc(rec['excluded_by'])} at {when(rec['excluded_at'])}: {esc(rec['exclude_reason'])}"
              if rec["excluded"] else "Included in training")
    if rec["used_in_run"]:
        status += f" (used in run `{rec['used_in_run']}`)"
    lines += [f"**Status:** {status}", "#### Conversation up to the judged turn"]
    for m in rec["context"]:
        lines.append(f"<b>{esc(m.get('role'))}:</b><blockquote>{esc(m.get('content'))}</blockquote>")
    for ans in rec["answers"]:
        lines.append(f"#### Answer {esc(ans['label'])}\n<small>{_generation_line(ans['generation'])}</small>"
                     f"<blockquote>{esc(ans['text'])}</blockquote>")
    if rec["review_log"]:
        lines.append("#### Review history")
        lines += [f"- {when(e['at'])} **{e['action']}** by {esc(e['actor'])}: {esc(e['reason'])}"
                  for e in rec["review_log"]]
    return "\n\n".join(lines)


def _generation_line(g: dict | None) -> str:
    if not g:
        return "(no generation record)"
    return (f"version <code>{esc(g['model_version'])}</code>, sampling <code>"
            f"{esc(json.dumps(g['sampling'], ensure_ascii=False))}</code>, tokens "
            f"{g['prompt_tokens']} in / {g['completion_tokens']} out, latency "
            f"{g['latency_ms'] or 0:.0f} ms (first token {g['ttft_ms'] or 0:.0f} ms), finish {g['finish_reason']}")


def _missing_parts(no_checks: bool, no_data: bool, no_curves: bool) -> str:
    """A sentence naming what a run's page has nothing to show for (a run that failed or
    was stopped early), so no header-only table or empty plot stands in for it."""
    parts = [name for absent, name in ((no_checks, "gate checks"), (no_data, "ledger of the judgements it used"),
                                       (no_curves, "PPO curves")) if absent]
    if not parts:
        return ""
    listed = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " or " + parts[-1]
    return f"This run recorded no {listed} (it ended before that step, or skipped it)."


def _judgements_card(o: Overview) -> str:
    if not o.total:
        return "**Judgements**\n\nNone yet."
    return (f"**Judgements**\n\n## {o.today} today\n\n{o.week} in the last {WEEK_DAYS} days, "
            f"{o.total} in all")


def _thumbs_card(o: Overview) -> str:
    if o.down_share is None:
        return f"**Thumbs down**\n\nNo thumbs in the last {WEEK_DAYS} days."
    return (f"**Thumbs down**\n\n## {o.down_share:.0%}\n\nof {_plural(o.ratings_week, 'rating')} in the last "
            f"{WEEK_DAYS} days")


def _run_card(run: dict | None) -> str:
    if run is None:
        return "**Last training run**\n\nNo run yet."
    why = preview(run_reason(run))
    return (f"**Last training run**\n\n## {esc(run['status'].capitalize())}\n\n{when(run['started_at'])} UTC"
            f"{': ' + esc(why) if why else ''}")


def _queue_card(o: Overview) -> str:
    if o.queue is None:
        return "**Label quality**\n\nNo queue yet: it fills after the first retrain."
    return (f"**Label quality**\n\n## {o.queue_included} to review\n\n"
            f"{_plural(len(o.queue.keys), 'judgement')} in the disagreement queue")


# ----------------------------------------------------------------------------- what methods return
@dataclass
class Page:
    """One page of the Feedback table, and what the console keeps to turn pages."""

    table: pd.DataFrame
    keys: list[str]     # "type:id" of each row, in order
    cursors: list       # keyset cursors of the pages so far; the last starts this page (None: the first)
    info: str           # "1–50 of 1234 judgements"


@dataclass
class Charts:
    per_day: list[dict]      # {day, kind, n}, the kind in words
    per_version: list[dict]  # review.per_version rows
    table: pd.DataFrame      # per version, in percent
    info: str = ""           # a sentence when there is nothing to chart


@dataclass
class Training:
    schedule: str            # Markdown: next scheduled run and the live canary
    table: pd.DataFrame
    run_ids: list[str]
    info: str = ""           # a sentence over the table (what to do when there is no run yet)


@dataclass
class RunDetail:
    text: str                # Markdown
    series: dict             # {phase: {metric: [(step, value)]}}
    config: dict
    checks: pd.DataFrame     # the gate's checks, each with its value and threshold
    data: pd.DataFrame       # the judgements the run used, by kind
    canary: pd.DataFrame     # users' votes of the run's live canary, oldest first
    canary_text: str = ""    # Markdown: the trial's standing or its decision
    has_curves: bool = False # whether PPO logged any curve


@dataclass
class Queue:
    """A label-quality list: its table, the record or session behind each row, a sentence."""

    table: pd.DataFrame
    keys: list[str]
    info: str


@dataclass
class VersionsView:
    served: str              # Markdown: what is served, since when, by whom
    table: pd.DataFrame
    ids: list[str]
    history: pd.DataFrame    # serving log, newest first
    can_serve: bool = False  # whether there is another version to promote or roll back to
    serve_info: str = ""     # a sentence when there is not


@dataclass
class Overview:
    """The console's first screen: what came in, how it went, what to look at first."""

    today: int               # judgements since 00:00 UTC
    week: int                # judgements in the last ``WEEK_DAYS`` days, today included
    total: int               # judgements ever stored
    ratings_week: int
    down_week: int           # thumbs down among ``ratings_week``
    last_run: dict | None    # the newest ``review.runs`` row
    queue: Queue | None      # the disagreement queue; None before any reward model was trained
    queue_included: int      # the queue's judgements still used for training
    cards: list[str]         # Markdown, one per card: judgements, thumbs down, last run, label quality
    todo: list[str]          # Markdown, one line each: what to look at first

    @property
    def down_share(self) -> float | None:
        return self.down_week / self.ratings_week if self.ratings_week else None


# ----------------------------------------------------------------------------- the service
class ConsoleService:
    """Everything the console does.  ``scheduler`` is the app's ``RetrainScheduler``, or None
    when the app does not schedule retrains."""

    def __init__(self, settings: Settings, store: FeedbackStore, registry: Registry, scheduler: Any = None):
        self.settings = settings
        self.store = store
        self.registry = registry
        self.scheduler = scheduler

    # -- feedback --------------------------------------------------------------------------
    def page(self, f: review.Filters, cursors: list | None = None) -> Page:
        """The page the last of ``cursors`` starts (the first page without cursors)."""
        cursors = list(cursors or [None])
        after = tuple(cursors[-1]) if cursors[-1] else None
        rows = review.page(self.store, f, limit=PAGE_SIZE, after=after)
        total = review.count(self.store, f)
        first = (len(cursors) - 1) * PAGE_SIZE
        info = f"{first + 1}–{first + len(rows)} of {total} judgements" if rows else self._no_rows(f)
        return Page(feedback_table(rows), [f"{r['record_type']}:{r['id']}" for r in rows], cursors, info)

    def _no_rows(self, f: review.Filters) -> str:
        """Why a page is empty, in a sentence."""
        if f != review.Filters() or review.count(self.store):
            return "No judgements match these filters: widen them under **Filters**, or clear them."
        return "No judgements yet: votes, rewrites and thumbs from the chat appear here as users give them."

    def next_page(self, f: review.Filters, cursors: list, keys: list[str]) -> Page:
        """The page after the one showing ``keys`` (the same page when it was the last)."""
        if len(keys) < PAGE_SIZE:
            return self.page(f, cursors)
        last = review.record(self.store, *parse_ref(keys[-1]))
        return self.page(f, [*cursors, (last["created_at"], last["id"])])

    def previous_page(self, f: review.Filters, cursors: list) -> Page:
        return self.page(f, cursors[:-1] if len(cursors) > 1 else None)

    @staticmethod
    def row_ref(keys: list[str], row: int | None) -> str:
        """The record shown in table row ``row``."""
        if row is None or not 0 <= row < len(keys):
            raise ConsoleError("no such row")
        return keys[row]

    def record_view(self, ref: str) -> str:
        """One record in full (Markdown)."""
        return record_markdown(review.record(self.store, *parse_ref(ref)))

    def filter_versions(self) -> list[str]:
        """Every model version that answered or was registered (the Feedback filter's choices)."""
        return review.versions_seen(self.store)

    def exclude(self, ref: str, reason: str, user: str) -> str:
        """Excludes one record from training; ``reason`` is required and logged with ``user``."""
        return self._set_one(ref, True, reason, user)

    def restore(self, ref: str, reason: str, user: str) -> str:
        return self._set_one(ref, False, reason, user)

    def _set_one(self, ref: str, excluded: bool, reason: str, user: str) -> str:
        kind, rid = parse_ref(ref)
        if not self.store.set_excluded(kind, [rid], excluded, reason or "", user):
            raise ConsoleError(f"no {kind} {rid}")
        verb = "Excluded" if excluded else "Restored"
        log.info("console: %s %s %s %s", user, verb.lower(), kind, rid)
        return f"{verb} {kind} `{rid}`."

    def exclude_matching(self, f: review.Filters, reason: str, user: str) -> str:
        """Excludes every record the filters select (each one logged with ``reason`` and ``user``)."""
        return self._set_matching(f, True, reason, user)

    def restore_matching(self, f: review.Filters, reason: str, user: str) -> str:
        return self._set_matching(f, False, reason, user)

    def _set_matching(self, f: review.Filters, excluded: bool, reason: str, user: str) -> str:
        n = review.set_excluded_matching(self.store, f, excluded, reason or "", user)
        verb = "Excluded" if excluded else "Restored"
        log.info("console: %s %s %d records", user, verb.lower(), n)
        return f"{verb} {n} records."

    # -- label quality ---------------------------------------------------------------------
    def label_scores(self) -> tuple[str | None, list[dict]]:
        """The newest run's out-of-fold label scores (``retrain.job.label_scores``): (run id,
        rows); (None, []) before any run has trained reward models."""
        for run in review.runs(self.store):
            path = self.settings.runs_dir / run["id"] / LABEL_SCORES
            if path.is_file():
                try:
                    return run["id"], json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    log.warning("unreadable %s: %s", path, exc)
        return None, []

    def disagreements(self, limit: int = QUEUE_SIZE) -> Queue:
        """Judgements the current reward models most strongly disagree with, strongest first:
        each scored by the cross-fitted model that never trained on it, so a disagreement is
        evidence (a mislabel, or a taste the models have not learned), not memorisation."""
        run_id, scores = self.label_scores()
        if run_id is None:
            return Queue(pd.DataFrame(columns=DISAGREEMENT_COLUMNS), [],
                         "No reward model has been trained yet: the queue fills after the first retrain.")
        worst: dict[str, dict] = {}
        for row in scores:  # one row per record: its strongest disagreement
            if row["disagreement"] > 0 and row["disagreement"] > worst.get(row["record"], {}).get("disagreement", 0):
                worst[row["record"]] = row
        ranked = sorted(worst.values(), key=lambda r: -r["disagreement"])[:limit]
        found = quality.records(self.store, [r["record"] for r in ranked])
        ranked = [r for r in ranked if r["record"] in found]  # deleted since (delete my data)
        table = pd.DataFrame([[when(found[r["record"]]["created_at"]), verdict_label(found[r["record"]]["kind"]),
                               _human_said(r),
                               _models_say(r), f"{r['disagreement']:.2f}",
                               found[r["record"]]["user"] or found[r["record"]]["session_id"][:12],
                               "excluded" if found[r["record"]]["excluded"] else "included",
                               preview(_last_user(found[r["record"]]["prompt"])), r["record"]] for r in ranked],
                             columns=DISAGREEMENT_COLUMNS)
        info = (f"{len(ranked)} judgement{'s' * (len(ranked) != 1)} the reward models of run `{run_id}` disagree with, strongest first "
                f"(of {len(scores)} scored; disagreement in reward standard deviations, each judgement scored "
                "by the cross-fitted model that never trained on it)." if ranked else
                f"The reward models of run `{run_id}` agree with every judgement they scored ({len(scores)}).")
        return Queue(table, [r["record"] for r in ranked], info)

    def consistency(self) -> Queue:
        """Sessions whose votes contradict each other or always press the same button."""
        rows = quality.session_consistency(self.store)
        table = pd.DataFrame([[r["user"] or "", r["votes"], r["contradictions"], _percent(r["a_share"]),
                               f"{verdict_label(r['top_verdict'])} ({r['top_share']:.0%})", r["excluded"],
                               r["session_id"]]
                              for r in rows], columns=CONSISTENCY_COLUMNS)
        suspicious = sum(1 for r in rows if r["contradictions"] or r["top_share"] >= 0.9)
        return Queue(table, [r["session_id"] for r in rows],
                     f"{len(rows)} sessions with 4+ votes; {suspicious} contradict themselves or press one button "
                     "90%+ of the time (listed first)." if rows else "No session has 4 or more votes yet.")

    def fast_voters(self) -> Queue:
        """Sessions deciding comparisons faster than the two answers can be read."""
        limits = quality.SpeedLimits()
        rows = quality.fast_sessions(self.store, limits)
        table = pd.DataFrame([[r["user"] or "", r["votes"], r["fast"], f"{r['median_seconds']:.1f}", r["excluded"],
                               r["session_id"]] for r in rows], columns=FAST_COLUMNS)
        rule = (f"a vote within {limits.min_seconds:.0f} s of answer B being complete, or faster than "
                f"{limits.max_words_per_second:.0f} words per second over both answers")
        return Queue(table, [r["session_id"] for r in rows],
                     f"{len(rows)} sessions cast half or more of their votes too fast to read ({rule})."
                     if rows else f"No session votes inhumanly fast ({rule}).")

    def bursts(self) -> Queue:
        """Clients that wrote many judgements of any kind within minutes (a flood of rewrites
        needs no generation, so it is not fast voting); a row picks its busiest session."""
        minutes, least = 10, 30
        rows = quality.bursts(self.store, minutes, least)
        table = pd.DataFrame([[r["client"], r["peak"], *(r["kinds"].get(k, 0) for k in
                                                        ("votes", "rewrites", "rankings", "thumbs")),
                               len(r["sessions"]), r["excluded"], r["sessions"][0]] for r in rows],
                             columns=BURST_COLUMNS)
        return Queue(table, [r["sessions"][0] for r in rows],
                     f"{len(rows)} client{'s' * (len(rows) != 1)} wrote {least}+ judgements within {minutes} minutes "
                     "(a client is one address, or one browser); the retrain keeps at most a share of a run "
                     "from any one client." if rows else
                     f"No client wrote {least} or more judgements within {minutes} minutes.")

    @staticmethod
    def reason_info(rows: list[dict]) -> str:
        """A sentence under "Reason tags over time" when there is nothing to plot."""
        return "" if rows else "No rating carries a reason tag yet."

    def reason_counts(self) -> tuple[list[dict], pd.DataFrame]:
        """Rating reason tags per day: the rows for the plot, and the table."""
        rows = quality.reason_counts(self.store)
        return rows, pd.DataFrame([[r["day"], r["reason"], r["thumb"], r["n"]] for r in rows], columns=REASON_COLUMNS)

    def exclude_session(self, session_id: str, reason: str, user: str) -> str:
        """Excludes every judgement of one session (each logged with ``reason`` and ``user``)."""
        session_id = (session_id or "").strip()
        if not session_id or not self.store.session(session_id):
            raise ConsoleError("pick a session from the list first")
        if not (reason or "").strip():
            raise ConsoleError("give a reason for excluding this session's judgements")
        n = review.set_excluded_matching(self.store, review.Filters(session=session_id), True, reason, user)
        log.info("console: %s excluded %d records of session %s", user, n, session_id)
        return f"Excluded {n} judgements of session `{esc(session_id)}`."

    # -- charts and leaderboard ------------------------------------------------------------
    def charts(self) -> Charts:
        rows = review.per_version(self.store)
        table = pd.DataFrame([[r["version"], r["comparisons"], _percent(r["both_bad_share"]), r["ratings"],
                               _percent(r["down_share"])] for r in rows], columns=PER_VERSION_COLUMNS)
        per_day = [{**r, "kind": verdict_label(r["kind"])} for r in review.per_day(self.store)]
        info = "" if per_day else ("No judgements yet: the charts appear once users vote on, rewrite or rate "
                                   "answers in the chat.")
        return Charts(per_day, rows, table, info)

    def leaderboard(self) -> tuple[list[dict], pd.DataFrame]:
        """The Bradley-Terry ratings: the rows (for the plot) and the table."""
        rows = leaderboard.leaderboard(self.store)
        return rows, pd.DataFrame([[r["version"], r["rating"], f"{r['ci_low']:.0f}–{r['ci_high']:.0f}", r["games"],
                                    r["wins"], r["ties"], r["losses"]] for r in rows], columns=LEADERBOARD_COLUMNS)

    @staticmethod
    def leaderboard_info(rows: list[dict]) -> str:
        """A sentence instead of an empty leaderboard."""
        return "" if rows else ("No A/B votes between answers of two different versions yet: the leaderboard "
                                "fills once a candidate is compared with the served version.")

    # -- the first screen ------------------------------------------------------------------
    def overview(self, at: datetime | None = None) -> Overview:
        """What came in today and this week, the week's thumbs-down share, the last run and
        its outcome, the disagreement queue; and what to look at first.  ``at``: now (UTC)."""
        at = (at or datetime.now(timezone.utc)).astimezone(timezone.utc)
        today = at.date()
        counts = review.activity(self.store, today.isoformat(),
                                 (today - timedelta(days=WEEK_DAYS - 1)).isoformat())
        runs = review.runs(self.store, limit=1)
        run_id, _ = self.label_scores()
        queue = self.disagreements() if run_id else None
        included = 0 if queue is None else int((queue.table["status"] == "included").sum())
        o = Overview(counts["today"], counts["week"], review.count(self.store), counts["ratings_week"],
                     counts["down_week"], runs[0] if runs else None, queue, included, [], [])
        o.cards = [_judgements_card(o), _thumbs_card(o), _run_card(o.last_run), _queue_card(o)]
        o.todo = self._todo(o)
        return o

    def _todo(self, o: Overview) -> list[str]:
        """What to look at first, most pressing first (each line names the tab)."""
        todo = []
        trial = self.registry.canary()
        if trial:
            todo.append(f"A candidate, **{esc(trial['version_id'])}**, is on trial with users: see how it "
                        "stands on **Training**.")
        if o.last_run and o.last_run["status"] in ("failed", "rejected"):
            todo.append(f"The last training run was **{o.last_run['status']}**: read why on **Training**.")
        if o.queue_included:
            todo.append(f"{_plural(o.queue_included, 'judgement')} the reward models doubt "
                        f"{'is' if o.queue_included == 1 else 'are'} still used for training: review "
                        f"{'it' if o.queue_included == 1 else 'them'} in **Label quality**.")
        share = o.down_share
        if share is not None and share >= DOWN_ALERT_SHARE and o.ratings_week >= DOWN_ALERT_MIN:
            todo.append(f"{share:.0%} of this week's thumbs are down: read them in **Feedback** "
                        "(Filters: Thumbs down).")
        if not o.total:
            todo.append("No judgements yet: votes, rewrites and thumbs appear here as users give them in the chat.")
        return todo or ["Nothing needs a look right now."]

    # -- training --------------------------------------------------------------------------
    def training(self) -> Training:
        runs = review.runs(self.store)
        return Training(self.schedule(), runs_table(runs), [r["id"] for r in runs], self._runs_info(runs))

    def _runs_info(self, runs: list[dict]) -> str:
        if runs:
            return f"{_plural(len(runs), 'run')}, newest first. Click a run to open its page."
        if self.scheduler is None:
            return ("No training run yet, and this app schedules none: start it with `--retrain-enabled`, or run "
                    "`python -m retrain run --now`.")
        return (f"No training run yet: the scheduler starts one once {self.settings.retrain_min_preferences} new "
                "usable preferences exist, or press **Retrain now**.")

    def schedule(self) -> str:
        """The next scheduled retrain and the live canary's progress (Markdown)."""
        if self.scheduler is None:
            text = "Scheduled retraining: **scheduler not running**."
        else:
            nxt = self.scheduler.next_run_time()
            text = f"Next scheduled retrain: **{nxt.isoformat(timespec='minutes') if nxt else 'none scheduled'}**"
        return text + "\n\n" + self._canary()

    def _canary(self) -> str:
        s = self.settings
        state = self.registry.canary()
        standing = canary_status(self.registry, CanaryConfig.from_settings(s))
        if not (state and standing):
            return "Live canary: **no candidate on trial**" + ("" if s.canary_enabled else " (switched off)")
        rate = "–" if standing.wins + standing.losses == 0 else f"{standing.win_rate:.0%}"
        return (f"Live canary: **{esc(state['version_id'])}** on trial against {esc(state['parent_id'])} since "
                f"{when(state['started_at'])} (run {esc(state['run_id'])}): **{standing.wins} wins, "
                f"{standing.losses} losses, {standing.ties} ties** (decisive win rate {rate}; needs "
                f"{s.canary_min_votes}+ decisive votes and a lower bound above 50%, at most {s.canary_max_votes} "
                f"votes / {s.canary_max_minutes:.0f} min)")

    def run_detail(self, run_id: str) -> RunDetail:
        """One run's page: status and reason, the gate's checks, the data by kind, the curves,
        the config and, when it went on trial, the canary's votes."""
        d = review.run_detail(self.store, run_id or "")
        run = d["run"]
        decision = d["decision"] if isinstance(d["decision"], dict) else {}
        gate = ("passed" if decision.get("passed") else "not passed") if "passed" in decision else "-"
        judgements = decision.get("judgements") or (d["data"] or {}).get("judgements") or {}
        timings = decision.get("timings") or {}
        ci = (f" ({run['rm_ci_low']:.2f}–{run['rm_ci_high']:.2f})"
              if run.get("rm_ci_low") is not None and run.get("rm_ci_high") is not None else "")
        duration = f", took {took(run['started_at'], run['finished_at'])}" if run["finished_at"] else ""
        text = (f"### Run <code>{esc(run['id'])}</code>: {esc(run['status'])}\n\n"
                f"**Why:** {esc(run_reason({**run, 'decision': decision}) or '-')}\n\n"
                f"Trigger {esc(run['trigger'])}, started {when(run['started_at'] or run['created_at'])}, finished "
                f"{when(run['finished_at']) or '-'} (UTC){duration}; {run['n_preferences'] or 0} training pairs; "
                f"RM accuracy {_number(run['rm_accuracy'], 3) or '-'}{ci}; final KL {_number(run['kl'], 2) or '-'}; "
                f"candidate {esc(run['candidate_version'] or '-')}\n\n**Gate:** {gate}")
        if timings:
            text += " &nbsp; **Phases:** " + ", ".join(f"{esc(k.removesuffix('_s'))} {v:.0f} s" for k, v in timings.items()
                                                     if isinstance(v, (int, float)))
            if decision.get("sampler"):
                text += f" (answers sampled with {esc(decision['sampler'])})"
        votes, canary_text = self._run_canary(run, decision)
        checks, data = checks_table(decision), data_table(judgements)
        has_curves = any((d["series"].get("ppo") or {}).get(name) for name in PPO_CURVES)
        missing = _missing_parts(checks.empty, data.empty, not has_curves)
        if missing:
            text += f"\n\n{missing}"
        return RunDetail(text, d["series"], d["config"], checks, data,
                         canary_table(votes, run["candidate_version"] or ""), canary_text, has_curves)

    def _run_canary(self, run: dict, decision: dict) -> tuple[list[dict], str]:
        """The votes of the run's trial (live while it runs) and a sentence on where it stands."""
        version = run["candidate_version"]
        state = self.registry.canary()
        live = bool(state and state["run_id"] == run["id"])
        if not version or not (live or decision.get("canary")):
            return [], ""
        trial = state if live else decision["canary"]
        parent = state["parent_id"] if live else self.registry.version(version)["parent_id"]
        since = trial.get("started_at") or self.registry.version(version)["created_at"]
        votes = self.registry.canary_votes(version, parent, since)
        if not live and run["finished_at"]:  # the trial's votes, not later ones between the same versions
            votes = [v for v in votes if v["decided_at"] <= run["finished_at"]]
        if live:
            standing = canary_status(self.registry, CanaryConfig.from_settings(self.settings))
            return votes, f"**Live canary, on trial now:** {esc(standing.reason)}"
        return votes, f"**Live canary, ended:** {esc(trial.get('reason') or run['reason'])}"

    def retrain_now(self, user: str) -> str:
        """Starts a training run now, beside the schedule."""
        if self.scheduler is None:
            raise ConsoleError("scheduler not running: start the app with --retrain-enabled")
        try:
            rid = self.scheduler.run_now(trigger="manual")
        except RuntimeError as exc:  # a run is already in progress
            raise ConsoleError(str(exc)) from None
        log.info("console: %s started retrain %s", user, rid)
        return f"Started run `{rid}`. " + self.schedule()

    # -- versions --------------------------------------------------------------------------
    def served_version(self) -> str | None:
        return self.registry.served_version()

    def versions(self) -> VersionsView:
        rows = review.versions(self.store)
        served = self.registry.served()
        text = (f"Serving **{esc(served['version_id'])}** since {when(served['at'])} UTC "
                f"({esc(served['action'])} by {esc(served['actor'])}{': ' + esc(served['reason']) if served['reason'] else ''})"
                if served else "Nothing served yet.")
        table = pd.DataFrame([[r["id"], "● serving" if r["served"] else "", r["parent_id"] or "", r["kind"],
                               when(r["created_at"]), r["run_id"] or "", preview(r["note"])] for r in rows],
                             columns=VERSION_COLUMNS)
        history = pd.DataFrame([[when(h["at"]), h["version_id"], h["action"], h["actor"], preview(h["reason"])]
                                for h in reversed(self.registry.serving_history())], columns=HISTORY_COLUMNS)
        can_serve = len(rows) >= 2
        info = "" if can_serve else (
            f"{'Only one version exists' if rows else 'No version is registered yet'}: there is nothing to promote "
            "or roll back to until a retrain makes a candidate.")
        return VersionsView(text, table, [r["id"] for r in rows], history, can_serve, info)

    def plan_serve(self, version_id: str, action: str, reason: str) -> tuple[dict, str]:
        """Checks a promote/rollback before it is confirmed: returns the plan for ``serve``
        and the question to confirm (Markdown)."""
        self.registry.version(version_id or "")
        if action not in SERVE_ACTIONS:
            raise ConsoleError("choose rollback or promote")
        plan = {"version": version_id, "action": action, "reason": reason or ""}
        return plan, (f"**{action.title()} to <code>{esc(version_id)}</code>?** "
                      "New chats will be answered by it within seconds.")

    def serve(self, plan: dict | None, user: str) -> None:
        """Serves the planned version (``serving_log`` records ``user`` and the reason)."""
        if not plan:
            raise ConsoleError("nothing to confirm")
        serving.serve_version(self.registry, plan["version"], plan["action"], actor=user, reason=plan["reason"])
        log.info("console: %s %s to %s", user, plan["action"], plan["version"])

    # -- exports ---------------------------------------------------------------------------
    def export_trl(self, f: review.Filters, path: Path, include_excluded: bool = False) -> str:
        """The filtered preference pairs as TRL conversational JSONL at ``path``."""
        n = export.export_trl(self.store, path, f, include_excluded=include_excluded)
        return f"{n} preference pairs exported."

    def export_csv(self, f: review.Filters, path: Path, include_excluded: bool = False) -> str:
        n = export.export_csv(self.store, path, f, include_excluded=include_excluded)
        return f"{n} judgements exported."

    def export_db(self, path: Path) -> str:
        """A consistent copy of the database without console users or opted-out sessions."""
        export.shareable_db_copy(self.store.path, path)
        return (f"Consistent copy of the database without console users or opted-out sessions "
                f"({os.path.getsize(path) // 1024} KiB).")
