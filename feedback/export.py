"""Exports of the feedback log in formats people already use.

TRL's conversational preference format (what ``trl.RewardTrainer`` and ``DPOTrainer`` read),
one JSON object per line::

    {"prompt":   [{"role": "system", "content": ...}, {"role": "user", "content": ...}, ...],
     "chosen":   [{"role": "assistant", "content": ...}],
     "rejected": [{"role": "assistant", "content": ...}]}

Ties and "both bad" carry no ordering between the two answers and have no place in this
format; they are skipped here (the CSV export keeps every judgement).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
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
