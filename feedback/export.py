"""Exports of the feedback log in formats people already use.

TRL's conversational preference format (what ``trl.RewardTrainer`` and ``DPOTrainer`` read),
one JSON object per line::

    {"prompt":   [{"role": "system", "content": ...}, {"role": "user", "content": ...}, ...],
     "chosen":   [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}

Ties and "both bad" carry no ordering between the two answers and have no place in this
format; they are skipped here (the CSV export keeps every judgement).

Also here: the filtered TRL and CSV exports the console and ``python -m feedback export``
offer, and a consistent copy of the live database (``backup_db``).
"""

from __future__ import annotations

import csv
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path


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


def comparison_to_trl(row: dict) -> dict | None:
    pair = comparison_pair(row)
    if pair is None:
        return None
    context = row["context"] if isinstance(row["context"], list) else json.loads(row["context"])
    return trl_record(context, *pair)


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
               "used_in_run", "context_json")


def _export_filters(filters, include_excluded: bool):
    from feedback.review import Filters

    f = filters if isinstance(filters, Filters) else Filters.from_dict(filters)
    f = Filters(**{**f.__dict__, "kinds": list(f.kinds)})
    if not include_excluded:
        f.status = "included"
    return f.validate()


def trl_records(store, filters=None, include_excluded: bool = False) -> Iterator[dict]:
    """TRL conversational records of the filtered comparisons that have an ordering
    (a, b, edit); ties and both-bad are skipped, ratings have no pair."""
    from feedback.review import matching_rows

    for row in matching_rows(store, _export_filters(filters, include_excluded), "comparison"):
        if row.get("opt_out"):
            continue
        record = comparison_to_trl(row)
        if record is not None:
            yield record


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
        out.update(prompt=prompt, context_json=row["context"], comment=row.get("comment") or "",
                   reasons=row["reasons"] if isinstance(row["reasons"], str) else "")
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
            writer.writerow(row)
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
