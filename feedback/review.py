"""Console queries: the filtered, paged list of judgements, one record in full, bulk
exclusion, the first screen's counts, chart data, runs and versions.  The console and the CLI call these; they hold
no UI code.

A *judgement* is a decided comparison (verdict a, b, tie, both_bad or edit) or a rating
(thumb up or down); both tables are listed together as one time-ordered stream with a
common shape (see ``COLUMNS``).  Undecided comparisons (a regenerate nobody voted on) are
not judgements and are not listed.

Paging is keyset ("seek") paging on ``(created_at, id)`` descending: each page starts
strictly after the last row of the previous one, so page 1000 costs what page 1 costs,
and SQLite answers the two-table stream as a merge of two ordered index scans that stops
after ``limit`` rows.  ``benchmarks/console_paging.py`` measures it at 100,000 records.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from feedback import ranking
from feedback.store import FeedbackStore, NotFound, StoreError

COMPARISON_KINDS = ("a", "b", "tie", "both_bad", "edit", "rank")
RATING_KINDS = ("up", "down")
KINDS = COMPARISON_KINDS + RATING_KINDS
STATUSES = ("all", "included", "excluded")
COLUMNS = ("record_type", "id", "created_at", "kind", "session_id", "user", "model_version",
           "reasons", "comment", "excluded", "exclude_reason", "snippet")

_SNIPPET = 120


@dataclass
class Filters:
    """What the maintainer narrowed the list to; every field empty means everything."""

    since: str = ""          # ISO time or date, inclusive
    until: str = ""          # ISO time or date, exclusive (a bare date means up to that day)
    kinds: list[str] = field(default_factory=list)  # subset of KINDS
    reason: str = ""         # a rating reason tag
    model_version: str = ""  # either answer of a comparison, or the rated answer
    session: str = ""        # session id, or the session's user name
    has_comment: bool | None = None
    status: str = "all"      # all | included | excluded
    search: str = ""         # free text over the prompt, the answers and the comment

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Filters:
        data = dict(data or {})
        known = {f.name for f in fields(cls)}
        out = cls(**{k: v for k, v in data.items() if k in known and v is not None})
        if isinstance(out.kinds, str):
            out.kinds = [out.kinds] if out.kinds else []
        return out

    def validate(self) -> Filters:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise StoreError(f"unknown kinds {bad}: use {', '.join(KINDS)}")
        if self.status not in STATUSES:
            raise StoreError(f"status must be one of {', '.join(STATUSES)}")
        return self


def _like(text: str) -> str:
    return "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def _common_where(alias: str, f: Filters, params: list) -> list[str]:
    where = []
    if f.since:
        where.append(f"{alias}.created_at >= ?")
        params.append(f.since)
    if f.until:
        where.append(f"{alias}.created_at < ?")
        params.append(f.until)
    if f.status == "included":
        where.append(f"{alias}.excluded = 0")
    elif f.status == "excluded":
        where.append(f"{alias}.excluded = 1")
    if f.session:
        where.append(f"({alias}.session_id = ? OR {alias}.session_id IN (SELECT id FROM sessions WHERE user = ?))")
        params += [f.session, f.session]
    return where


def _comparison_arm(f: Filters, select: str) -> tuple[str, list] | None:
    kinds = [k for k in f.kinds if k in COMPARISON_KINDS] if f.kinds else list(COMPARISON_KINDS)
    if not kinds or f.reason or f.has_comment:
        return None  # comparisons carry no reason tags and no comment
    params: list = []
    where = [f"c.verdict IN ({', '.join('?' * len(kinds))})"]
    params += kinds
    where += _common_where("c", f, params)
    if f.model_version:
        where.append("((SELECT model_version FROM generations WHERE id = c.a_generation_id) = ? OR "
                     "(SELECT model_version FROM generations WHERE id = c.b_generation_id) = ?)")
        params += [f.model_version, f.model_version]
    if f.search:
        where.append("(c.context LIKE ? ESCAPE '\\' OR c.a_text LIKE ? ESCAPE '\\' OR c.b_text LIKE ? ESCAPE '\\')")
        params += [_like(f.search)] * 3
    return f"{select} FROM comparisons c WHERE {' AND '.join(where)}", params


def _rating_arm(f: Filters, select: str) -> tuple[str, list] | None:
    kinds = [k for k in f.kinds if k in RATING_KINDS] if f.kinds else list(RATING_KINDS)
    if not kinds:
        return None
    params: list = []
    where = [f"r.thumb IN ({', '.join('?' * len(kinds))})"]
    params += kinds
    where += _common_where("r", f, params)
    if f.reason:
        where.append("EXISTS (SELECT 1 FROM json_each(r.reasons) WHERE value = ?)")
        params.append(f.reason)
    if f.has_comment is True:
        where.append("COALESCE(r.comment, '') != ''")
    elif f.has_comment is False:
        where.append("COALESCE(r.comment, '') = ''")
    if f.model_version:
        where.append("(SELECT model_version FROM generations WHERE id = r.generation_id) = ?")
        params.append(f.model_version)
    if f.search:
        where.append("(r.context LIKE ? ESCAPE '\\' OR r.answer_text LIKE ? ESCAPE '\\' OR r.comment LIKE ? ESCAPE '\\')")
        params += [_like(f.search)] * 3
    return f"{select} FROM ratings r WHERE {' AND '.join(where)}", params


_C_KEYS = "'comparison' AS record_type, c.id AS id, c.created_at AS created_at"
_R_KEYS = "'rating' AS record_type, r.id AS id, r.created_at AS created_at"


def _union(f: Filters, c_select: str, r_select: str) -> tuple[str, list]:
    arms = [a for a in (_comparison_arm(f, c_select), _rating_arm(f, r_select)) if a]
    if not arms:
        return "", []
    sql = " UNION ALL ".join(a[0] for a in arms)
    params = [p for a in arms for p in a[1]]
    return sql, params


def count(store: FeedbackStore, filters: Filters | dict | None = None) -> int:
    f = filters if isinstance(filters, Filters) else Filters.from_dict(filters)
    f.validate()
    sql, params = _union(f, "SELECT COUNT(*) AS n", "SELECT COUNT(*) AS n")
    if not sql:
        return 0
    return sum(r["n"] for r in store.query(sql, tuple(params)))


def page(store: FeedbackStore, filters: Filters | dict | None = None, limit: int = 50,
         after: tuple[str, str] | None = None) -> list[dict]:
    """One page of judgements, newest first.  ``after`` is the ``(created_at, id)`` of the
    last row of the previous page (keyset paging); ``None`` gives the first page."""
    f = filters if isinstance(filters, Filters) else Filters.from_dict(filters)
    f.validate()
    limit = max(1, min(int(limit), 1000))
    c_keys, r_keys = _C_KEYS, _R_KEYS
    if after:
        # The seek condition goes into each arm so both index scans start at the cursor.
        f_c = _seek(after, "c")
        f_r = _seek(after, "r")
    else:
        f_c = f_r = ("", [])
    c_arm = _comparison_arm(f, f"SELECT {c_keys}")
    r_arm = _rating_arm(f, f"SELECT {r_keys}")
    arms, params = [], []
    for arm, seek in ((c_arm, f_c), (r_arm, f_r)):
        if arm:
            arms.append(arm[0] + seek[0])
            params += arm[1] + seek[1]
    if not arms:
        return []
    sql = " UNION ALL ".join(arms) + " ORDER BY created_at DESC, id DESC LIMIT ?"
    keys = store.query(sql, tuple(params + [limit]))
    return _hydrate(store, keys)


def _seek(after: tuple[str, str], alias: str) -> tuple[str, list]:
    created_at, rid = after
    # "created_at <= ?" lets SQLite start the index scan at the cursor; the rest breaks ties.
    return (f" AND {alias}.created_at <= ? AND ({alias}.created_at < ? OR {alias}.id < ?)",
            [created_at, created_at, rid])


def _hydrate(store: FeedbackStore, keys: list[dict]) -> list[dict]:
    """The display columns of the page's rows (a few primary-key lookups)."""
    out = []
    for k in keys:
        if k["record_type"] == "comparison":
            rows = store.query(
                "SELECT c.*, s.user AS user, ga.model_version AS a_version, gb.model_version AS b_version "
                "FROM comparisons c LEFT JOIN sessions s ON s.id = c.session_id "
                "LEFT JOIN generations ga ON ga.id = c.a_generation_id "
                "LEFT JOIN generations gb ON gb.id = c.b_generation_id WHERE c.id = ?", (k["id"],))
            if not rows:
                continue
            r = rows[0]
            versions = r["a_version"] or ""
            if r["verdict"] == "edit":
                versions = f"{versions} vs human edit"
            elif r["b_version"] and r["b_version"] != r["a_version"]:
                versions = f"{versions} vs {r['b_version']}"
            out.append({"record_type": "comparison", "id": r["id"], "created_at": r["created_at"],
                        "kind": r["verdict"], "session_id": r["session_id"], "user": r["user"] or "",
                        "model_version": versions, "reasons": "", "comment": "",
                        "excluded": bool(r["excluded"]), "exclude_reason": r["exclude_reason"] or "",
                        "snippet": _snippet(_last_user(r["context"]))})
        else:
            rows = store.query(
                "SELECT r.*, s.user AS user, g.model_version AS version FROM ratings r "
                "LEFT JOIN sessions s ON s.id = r.session_id "
                "LEFT JOIN generations g ON g.id = r.generation_id WHERE r.id = ?", (k["id"],))
            if not rows:
                continue
            r = rows[0]
            out.append({"record_type": "rating", "id": r["id"], "created_at": r["created_at"],
                        "kind": r["thumb"], "session_id": r["session_id"], "user": r["user"] or "",
                        "model_version": r["version"] or "", "reasons": ", ".join(_loads(r["reasons"]) or []),
                        "comment": r["comment"] or "", "excluded": bool(r["excluded"]),
                        "exclude_reason": r["exclude_reason"] or "",
                        "snippet": _snippet(_last_user(r["context"]))})
    return out


def _loads(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _last_user(context: str | None) -> str:
    for m in reversed(_loads(context) or []):
        if m.get("role") == "user":
            return m.get("content") or ""
    return ""


def _snippet(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _SNIPPET else text[:_SNIPPET - 1] + "…"


def matching_ids(store: FeedbackStore, filters: Filters | dict | None = None) -> list[tuple[str, str]]:
    """Every ``(record_type, id)`` the filters select (for a bulk exclude or restore)."""
    f = filters if isinstance(filters, Filters) else Filters.from_dict(filters)
    f.validate()
    sql, params = _union(f, f"SELECT {_C_KEYS}", f"SELECT {_R_KEYS}")
    if not sql:
        return []
    return [(r["record_type"], r["id"]) for r in store.query(sql, tuple(params))]


def matching_rows(store: FeedbackStore, filters: Filters | dict | None, record_type: str) -> list[dict]:
    """Full rows of one table that the filters select, oldest first (for exports)."""
    f = filters if isinstance(filters, Filters) else Filters.from_dict(filters)
    f.validate()
    if record_type == "comparison":
        arm = _comparison_arm(f, "SELECT c.*, s.user AS user, s.opt_out AS opt_out, "
                                 "ga.model_version AS a_version, gb.model_version AS b_version")
        if arm is None:
            return []
        sql = arm[0].replace("FROM comparisons c", "FROM comparisons c LEFT JOIN sessions s ON s.id = c.session_id "
                                                   "LEFT JOIN generations ga ON ga.id = c.a_generation_id "
                                                   "LEFT JOIN generations gb ON gb.id = c.b_generation_id", 1)
        return store.query(sql + " ORDER BY c.created_at, c.id", tuple(arm[1]))
    if record_type == "rating":
        arm = _rating_arm(f, "SELECT r.*, s.user AS user, s.opt_out AS opt_out, g.model_version AS version")
        if arm is None:
            return []
        sql = arm[0].replace("FROM ratings r", "FROM ratings r LEFT JOIN sessions s ON s.id = r.session_id "
                                               "LEFT JOIN generations g ON g.id = r.generation_id", 1)
        return store.query(sql + " ORDER BY r.created_at, r.id", tuple(arm[1]))
    raise StoreError("record type must be 'comparison' or 'rating'")


def set_excluded_matching(store: FeedbackStore, filters: Filters | dict | None, excluded: bool, reason: str,
                          actor: str) -> int:
    """Excludes (or restores) every record the filters select; logged per record."""
    ids = matching_ids(store, filters)
    changed = 0
    for record_type in ("comparison", "rating"):
        chosen = [i for t, i in ids if t == record_type]
        if chosen:
            changed += store.set_excluded(record_type, chosen, excluded, reason, actor)
    return changed


# ----------------------------------------------------------------------------- one record
def _generation(store: FeedbackStore, gen_id: str | None) -> dict | None:
    if not gen_id:
        return None
    rows = store.query("SELECT id, model_version, sampling, prompt_tokens, completion_tokens, ttft_ms, "
                       "latency_ms, finish_reason, created_at FROM generations WHERE id = ?", (gen_id,))
    if not rows:
        return None
    g = rows[0]
    g["sampling"] = _loads(g["sampling"]) or {}
    return g


def record(store: FeedbackStore, record_type: str, record_id: str) -> dict:
    """One judgement in full: the conversation up to the judged turn, the answer(s), the
    verdict, what produced each answer, the session and the review history."""
    if record_type == "comparison":
        rows = store.query("SELECT * FROM comparisons WHERE id = ?", (record_id,))
        if not rows:
            raise NotFound(f"no comparison {record_id!r}")
        r = rows[0]
        answers = [{"label": "A", "text": r["a_text"], "generation": _generation(store, r["a_generation_id"])},
                   {"label": "B (human edit)" if r["verdict"] == "edit" else "B", "text": r["b_text"],
                    "generation": _generation(store, r["b_generation_id"])}]
        answers += [{"label": e["label"], "text": e.get("text"), "generation": _generation(store, e.get("generation_id"))}
                    for e in ranking.extra_answers(r)]  # "compare more": C, D
        verdict = r["verdict"]
    elif record_type == "rating":
        rows = store.query("SELECT * FROM ratings WHERE id = ?", (record_id,))
        if not rows:
            raise NotFound(f"no rating {record_id!r}")
        r = rows[0]
        answers = [{"label": "Rated answer", "text": r["answer_text"],
                    "generation": _generation(store, r["generation_id"])}]
        verdict = r["thumb"]
    else:
        raise StoreError("record type must be 'comparison' or 'rating'")
    session = store.session(r["session_id"]) or {}
    system = store.query("SELECT system_prompt FROM conversations WHERE id = ?", (r["conversation_id"],))
    return {
        "record_type": record_type, "id": record_id, "created_at": r["created_at"],
        "decided_at": r.get("decided_at"), "verdict": verdict, "source": r.get("source"),
        "reasons": _loads(r.get("reasons")) or [], "comment": r.get("comment") or "",
        "context": _loads(r["context"]) or [], "answers": answers, "turn": r["turn"],
        "order": ranking.format_order(ranking.loads(r.get("ranking")) or []),  # "C>A=D>B" for a ranking, else ""
        "session_id": r["session_id"], "user": session.get("user"), "opt_out": bool(session.get("opt_out")),
        "conversation_id": r["conversation_id"],
        "system_prompt": system[0]["system_prompt"] if system else None,
        "excluded": bool(r["excluded"]), "exclude_reason": r["exclude_reason"],
        "excluded_by": r["excluded_by"], "excluded_at": r["excluded_at"], "used_in_run": r["used_in_run"],
        "review_log": store.query("SELECT action, reason, actor, at FROM review_log "
                                  "WHERE record_type = ? AND record_id = ? ORDER BY id", (record_type, record_id)),
    }


# ----------------------------------------------------------------------------- the console's first screen
def activity(store: FeedbackStore, today: str, week: str) -> dict[str, int]:
    """Judgements since ``today`` and since ``week`` (ISO dates or times, inclusive, ``week``
    the earlier one), and the ratings and thumbs down since ``week``: ``{today, week,
    ratings_week, down_week}``.  Counted by ``created_at``, as the Feedback list filters."""
    comparisons = store.query(
        "SELECT COALESCE(SUM(created_at >= ?), 0) AS today, COUNT(*) AS week FROM comparisons "
        "WHERE verdict IS NOT NULL AND created_at >= ?", (today, week))[0]
    ratings = store.query(
        "SELECT COALESCE(SUM(created_at >= ?), 0) AS today, COUNT(*) AS week, "
        "COALESCE(SUM(thumb = 'down'), 0) AS down FROM ratings WHERE created_at >= ?", (today, week))[0]
    return {"today": comparisons["today"] + ratings["today"], "week": comparisons["week"] + ratings["week"],
            "ratings_week": ratings["week"], "down_week": ratings["down"]}


# ----------------------------------------------------------------------------- charts
def per_day(store: FeedbackStore, since: str = "") -> list[dict]:
    """Judgements per UTC day and kind: ``[{day, kind, n}]``."""
    params = [since, since]
    return store.query(
        "SELECT substr(created_at, 1, 10) AS day, verdict AS kind, COUNT(*) AS n FROM comparisons "
        "WHERE verdict IS NOT NULL AND (? = '' OR created_at >= ?) GROUP BY day, kind "
        "UNION ALL SELECT substr(created_at, 1, 10) AS day, 'thumbs ' || thumb AS kind, COUNT(*) AS n "
        "FROM ratings WHERE (? = '' OR created_at >= ?) GROUP BY day, kind ORDER BY day, kind",
        tuple(params + params))


def per_version(store: FeedbackStore) -> list[dict]:
    """Per model version: comparisons it took part in and the share judged "both bad";
    ratings of its answers and the share thumbed down."""
    comp = store.query(
        "SELECT v AS version, COUNT(*) AS comparisons, SUM(verdict = 'both_bad') AS both_bad FROM ("
        " SELECT c.id, c.verdict, ga.model_version AS v FROM comparisons c "
        "  JOIN generations ga ON ga.id = c.a_generation_id WHERE c.verdict IS NOT NULL"
        " UNION SELECT c.id, c.verdict, gb.model_version AS v FROM comparisons c "
        "  JOIN generations gb ON gb.id = c.b_generation_id WHERE c.verdict IS NOT NULL"
        ") GROUP BY v")
    rat = store.query(
        "SELECT g.model_version AS version, COUNT(*) AS ratings, SUM(r.thumb = 'down') AS down "
        "FROM ratings r JOIN generations g ON g.id = r.generation_id GROUP BY g.model_version")
    out: dict[str, dict] = {}
    for row in comp:
        out.setdefault(row["version"], {"version": row["version"]}).update(
            comparisons=row["comparisons"], both_bad=row["both_bad"])
    for row in rat:
        out.setdefault(row["version"], {"version": row["version"]}).update(ratings=row["ratings"], down=row["down"])
    result = []
    for v in sorted(out):
        d = {"comparisons": 0, "both_bad": 0, "ratings": 0, "down": 0, **out[v]}
        d["both_bad_share"] = d["both_bad"] / d["comparisons"] if d["comparisons"] else None
        d["down_share"] = d["down"] / d["ratings"] if d["ratings"] else None
        result.append(d)
    return result


def versions_seen(store: FeedbackStore) -> list[str]:
    rows = store.query("SELECT id FROM model_versions UNION SELECT DISTINCT model_version FROM generations "
                       "WHERE model_version IS NOT NULL ORDER BY 1")
    return [r["id"] for r in rows]


# ----------------------------------------------------------------------------- training
def runs(store: FeedbackStore, limit: int = 100) -> list[dict]:
    """Training runs, newest first: status, times, preferences, the gate's decision (parsed
    JSON; a decision stored as plain text stays text), the reason in words, RM accuracy,
    final KL and the candidate version."""
    rows = store.query("SELECT * FROM training_runs ORDER BY created_at DESC LIMIT ?", (limit,))
    return [{"id": r["id"], "status": r["status"], "trigger": r["trigger"],
             "started_at": r["started_at"] or r["created_at"], "finished_at": r["finished_at"] or "",
             "preferences": r["n_preferences"],
             "decision": _loads(r["decision"]) if r["decision"] and r["decision"][:1] in "{[\"" else r["decision"],
             "reason": r["reason"] or "", "rm_accuracy": r["rm_accuracy"], "kl": r["kl"],
             "candidate_version": r["candidate_version"] or ""} for r in rows]


def run_detail(store: FeedbackStore, run_id: str) -> dict:
    rows = store.query("SELECT * FROM training_runs WHERE id = ?", (run_id,))
    if not rows:
        raise NotFound(f"no training run {run_id!r}")
    run = rows[0]
    metrics = store.query("SELECT phase, step, name, value FROM run_metrics WHERE run_id = ? "
                          "ORDER BY phase, name, step", (run_id,))
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for m in metrics:
        series.setdefault(m["phase"], {}).setdefault(m["name"], []).append((m["step"], m["value"]))
    return {"run": run, "config": _loads(run["config"]) or {}, "data": _loads(run["data"]),
            "decision": _loads(run["decision"]) if run["decision"] else None, "series": series}


def versions(store: FeedbackStore) -> list[dict]:
    """Model versions with lineage and which one serves now."""
    served = store.query("SELECT version_id FROM serving_log ORDER BY id DESC LIMIT 1")
    served_id = served[0]["version_id"] if served else None
    rows = store.query("SELECT id, parent_id, kind, created_at, run_id, note FROM model_versions ORDER BY created_at")
    for r in rows:
        r["served"] = r["id"] == served_id
    return rows
