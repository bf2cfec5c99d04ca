"""Label quality: the queries behind the console's "Label quality" tab, which a maintainer
reviews before a retrain trusts the labels.

- ``session_consistency``: per session, A/B votes that contradict each other (the same two
  answers judged both ways: A over B, then B over A) and how lopsided the session's choice
  of button is (a session that always presses "A" is not reading);
- ``fast_sessions``: sessions that decide comparisons faster than anyone can read the two
  answers (the time from answer B being complete to the vote, against the words shown);
- ``bursts``: clients (an address, else a browser key) that wrote many judgements of any
  kind (votes, rewrites, rankings, thumbs) within a few minutes: a flood of rewrites needs
  no generation, so it never shows up as fast voting;
- ``reason_counts``: thumbs-down reason tags per day (a tag that jumps after a release says
  what the new version broke);
- ``records``: the rows behind a list of record references, for the disagreement queue
  (whose scores the retrain writes, ``retrain.job.label_scores``).

Opted-out sessions are included: a maintainer reviews everything stored.  Excluded records
are counted but marked, so an excluded session does not keep coming back to the top.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from statistics import median

from feedback.store import FeedbackStore


@dataclass(frozen=True)
class SpeedLimits:
    """What counts as an inhuman vote: decided within ``min_seconds`` of answer B being
    complete, or faster than ``max_words_per_second`` over the words of both answers (silent
    reading is about 4 words per second; skimming two answers at 25 words per second is
    already not reading them)."""

    min_seconds: float = 1.0
    max_words_per_second: float = 25.0

    def too_fast(self, seconds: float, words: int) -> bool:
        return seconds < max(self.min_seconds, words / self.max_words_per_second)


def _decided(store: FeedbackStore) -> list[dict]:
    return store.query(
        "SELECT c.id, c.session_id, s.user, c.a_text, c.b_text, c.verdict, c.excluded, c.created_at, c.decided_at, "
        "(julianday(c.decided_at) - julianday(c.created_at)) * 86400.0 AS seconds "
        "FROM comparisons c JOIN sessions s ON s.id = c.session_id "
        "WHERE c.source = 'regenerate' AND c.verdict IN ('a', 'b', 'tie', 'both_bad') "
        "ORDER BY c.decided_at, c.rowid")


def _norm(text: str | None) -> str:
    return " ".join((text or "").split()).lower()


def session_consistency(store: FeedbackStore, min_votes: int = 4) -> list[dict]:
    """Sessions with at least ``min_votes`` A/B votes, the least consistent first: each with
    its votes, how many pairs of its votes contradict each other (``contradictions``, with
    the comparison ids of one such pair in ``example``), the share of decisive votes for A
    (``a_share``; 0.5 is no position bias) and the share of its most pressed verdict."""
    by_session: dict[str, list[dict]] = defaultdict(list)
    for row in _decided(store):
        by_session[row["session_id"]].append(row)
    out = []
    for sid, rows in by_session.items():
        if len(rows) < min_votes:
            continue
        winners: dict[frozenset, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["verdict"] in ("a", "b") and _norm(r["a_text"]) != _norm(r["b_text"]):
                key = frozenset((_norm(r["a_text"]), _norm(r["b_text"])))
                winners[key][_norm(r["a_text"] if r["verdict"] == "a" else r["b_text"])].append(r["id"])
        contradictions, example = 0, []
        for won in winners.values():
            if len(won) == 2:
                first, second = won.values()
                contradictions += len(first) * len(second)
                example = example or [first[0], second[0]]
        decisive = [r["verdict"] for r in rows if r["verdict"] in ("a", "b")]
        counts = defaultdict(int)
        for r in rows:
            counts[r["verdict"]] += 1
        top, top_n = max(counts.items(), key=lambda kv: kv[1])
        out.append({"session_id": sid, "user": rows[0]["user"], "votes": len(rows), "decisive": len(decisive),
                    "a_share": decisive.count("a") / len(decisive) if decisive else None,
                    "top_verdict": top, "top_share": top_n / len(rows), "contradictions": contradictions,
                    "example": example, "excluded": sum(r["excluded"] for r in rows)})
    return sorted(out, key=lambda s: (-s["contradictions"], -s["top_share"], -s["votes"]))


def fast_sessions(store: FeedbackStore, limits: SpeedLimits = SpeedLimits(), min_votes: int = 3) -> list[dict]:
    """Sessions with at least ``min_votes`` decided comparisons of which at least half were
    too fast to have been read (``limits``), the fastest first: votes, fast votes, the median
    seconds from answer B to the vote, and the fastest vote's comparison id."""
    by_session: dict[str, list[dict]] = defaultdict(list)
    for row in _decided(store):
        if row["seconds"] is not None:
            by_session[row["session_id"]].append(row)
    out = []
    for sid, rows in by_session.items():
        fast = [r for r in rows if limits.too_fast(r["seconds"], len(f"{r['a_text']} {r['b_text']}".split()))]
        if len(rows) < min_votes or 2 * len(fast) < len(rows):
            continue
        fastest = min(rows, key=lambda r: r["seconds"])
        out.append({"session_id": sid, "user": rows[0]["user"], "votes": len(rows), "fast": len(fast),
                    "median_seconds": median(r["seconds"] for r in rows), "fastest": fastest["id"],
                    "excluded": sum(r["excluded"] for r in rows)})
    return sorted(out, key=lambda s: (-s["fast"] / s["votes"], s["median_seconds"]))


def bursts(store: FeedbackStore, window_minutes: float = 10.0, min_judgements: int = 30) -> list[dict]:
    """Clients with at least ``min_judgements`` judgements within some ``window_minutes``,
    the busiest first: the most in one window (``peak``), the counts per kind over all
    time, their sessions (the busiest first) and how many of the judgements are excluded.
    A client is the session's ``contributor`` (its address, hashed), else its browser key,
    else the session itself, as the retrain's per-client cap counts them."""
    rows = store.query(
        "SELECT COALESCE(s.contributor, s.owner, 'session:' || s.id) AS client, s.id AS session_id, s.user, "
        "CASE c.verdict WHEN 'edit' THEN 'rewrites' WHEN 'rank' THEN 'rankings' ELSE 'votes' END AS kind, "
        "julianday(COALESCE(c.decided_at, c.created_at)) AS day, c.excluded "
        "FROM comparisons c JOIN sessions s ON s.id = c.session_id WHERE c.verdict IS NOT NULL "
        "UNION ALL SELECT COALESCE(s.contributor, s.owner, 'session:' || s.id), s.id, s.user, 'thumbs', "
        "julianday(r.created_at), r.excluded FROM ratings r JOIN sessions s ON s.id = r.session_id "
        "ORDER BY 5")
    by_client: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_client[r["client"]].append(r)
    window = window_minutes / 1440.0
    out = []
    for client, items in by_client.items():
        peak, start = 0, 0
        for end, r in enumerate(items):  # two pointers over the client's judgements in time order
            while r["day"] - items[start]["day"] > window:
                start += 1
            peak = max(peak, end - start + 1)
        if peak < min_judgements:
            continue
        kinds: dict[str, int] = defaultdict(int)
        sessions: dict[str, int] = defaultdict(int)
        for r in items:
            kinds[r["kind"]] += 1
            sessions[r["session_id"]] += 1
        out.append({"client": client[:12], "peak": peak, "judgements": len(items), "kinds": dict(kinds),
                    "sessions": sorted(sessions, key=lambda sid: -sessions[sid]),
                    "user": next((r["user"] for r in items if r["user"]), None),
                    "excluded": sum(r["excluded"] for r in items)})
    return sorted(out, key=lambda b: -b["peak"])


def reason_counts(store: FeedbackStore, since: str = "") -> list[dict]:
    """Reason tags of ratings per UTC day: ``[{day, reason, thumb, n}]`` (a rating with two
    tags counts once for each)."""
    rows = store.query("SELECT substr(created_at, 1, 10) AS day, thumb, reasons FROM ratings "
                       "WHERE reasons IS NOT NULL AND reasons NOT IN ('', '[]') AND (? = '' OR created_at >= ?)",
                       (since, since))
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for r in rows:
        try:
            tags = json.loads(r["reasons"])
        except ValueError:
            continue
        for tag in tags if isinstance(tags, list) else []:
            counts[(r["day"], str(tag), r["thumb"])] += 1
    return [{"day": d, "reason": t, "thumb": th, "n": n} for (d, t, th), n in sorted(counts.items())]


def records(store: FeedbackStore, refs: list[str]) -> dict[str, dict]:
    """``{"comparison:ID" | "rating:ID": {created_at, kind, session_id, user, excluded, prompt}}``
    for the references that exist (``prompt``: the context's messages as stored)."""
    out: dict[str, dict] = {}
    by_type: dict[str, list[str]] = defaultdict(list)
    for ref in refs:
        kind, _, rid = ref.partition(":")
        by_type[kind].append(rid)
    for kind, select in (("comparison", "c.verdict AS kind"), ("rating", "'thumbs ' || c.thumb AS kind")):
        ids = by_type.get(kind, [])
        for i in range(0, len(ids), 500):
            chunk = ids[i:i + 500]
            table = "comparisons" if kind == "comparison" else "ratings"
            rows = store.query(
                f"SELECT c.id, c.created_at, {select}, c.session_id, s.user, c.excluded, c.context AS prompt "
                f"FROM {table} c JOIN sessions s ON s.id = c.session_id "
                f"WHERE c.id IN ({','.join('?' * len(chunk))})", tuple(chunk))
            for r in rows:
                out[f"{kind}:{r['id']}"] = r
    return out
