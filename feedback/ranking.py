"""Rankings of more than two answers ("compare more"): the order's forms and its pairs.

A ranking orders the answers of one comparison, labelled ``A`` (the kept answer), ``B``
(the regenerated one) and ``C``, ``D``, ... (the extra answers), best first.  Equal ranks
are allowed (answers the user found equally good), so an order is a list of *tiers*:

    "C>A=D>B"   ==   [["C"], ["A", "D"], ["B"]]   ==   ["C", "A=D", "B"]

The string form is what the public API takes (``/rank``) and what messages show; the tiers
are what the store keeps (``comparisons.ranking``, JSON).  Every label appears exactly once.

A ranking of K answers holds C(K, 2) pairs: each answer over each answer in a lower tier,
and a tie (label 0.5) for each two answers in one tier (``pairs``).

No SQL here: the store, the exports, the leaderboard and the retrain snapshot all read a
ranking through these functions, so they agree on what it means.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

LABELS = "ABCDEFGHI"  # A, B and up to seven extra answers (InstructGPT ranked K = 4-9)
RANK = "rank"  # the verdict of a decided ranking


class InvalidOrder(ValueError):
    """An order that is not a ranking of exactly the given labels; the message is for the user."""


def labels_for(n_answers: int) -> tuple[str, ...]:
    return tuple(LABELS[:n_answers])


def parse_order(order: object, labels: Iterable[str]) -> list[list[str]]:
    """``order`` ("C>A=D>B", or a list of labels or "A=D" groups, best first) -> tiers.
    Labels are case-insensitive; whitespace is ignored.  Raises InvalidOrder unless every
    label in ``labels`` appears exactly once."""
    labels = tuple(labels)
    expected = ">".join(labels)
    if isinstance(order, (list, tuple)):
        if not all(isinstance(item, str) for item in order):
            raise InvalidOrder(f"the order must be a string like {expected!r} or a list of labels, best first")
        order = ">".join(order)
    if not isinstance(order, str) or not order.strip():
        raise InvalidOrder(f"give the order of the answers, best first, e.g. {expected!r}")
    if len(order) > 200:
        raise InvalidOrder("the order is too long")
    text = "".join(order.split()).upper()
    tiers = [tier.split("=") for tier in text.split(">")]
    flat = [label for tier in tiers for label in tier]
    if any(not label for label in flat):
        raise InvalidOrder(f"the order {order.strip()[:40]!r} has an empty place: write it like {expected!r} "
                           "('>' between better and worse, '=' between equally good answers)")
    unknown = sorted({label for label in flat if label not in labels})
    if unknown:
        raise InvalidOrder(f"there is no answer {', '.join(u[:5] for u in unknown[:3])}: rank {', '.join(labels)}")
    repeated = sorted({label for label in flat if flat.count(label) > 1})
    if repeated:
        raise InvalidOrder(f"answer {', '.join(repeated)} is ranked more than once")
    missing = [label for label in labels if label not in flat]
    if missing:
        raise InvalidOrder(f"answer {', '.join(missing)} is not ranked: rank all of {', '.join(labels)}")
    return [sorted(tier, key=labels.index) for tier in tiers]


def from_ranks(ranks: dict[str, int]) -> list[list[str]]:
    """Rank numbers per label (1 = best; equal numbers = equally good) -> tiers."""
    by_rank: dict[int, list[str]] = {}
    for label in sorted(ranks, key=LABELS.index):
        by_rank.setdefault(int(ranks[label]), []).append(label)
    return [by_rank[r] for r in sorted(by_rank)]


def format_order(tiers: list[list[str]]) -> str:
    return ">".join("=".join(tier) for tier in tiers)


def loads(text: str | list | None) -> list[list[str]] | None:
    """The stored tiers (JSON) -> tiers; None when there is no ranking or it is malformed."""
    if isinstance(text, list):
        value = text
    else:
        try:
            value = json.loads(text) if text else None
        except ValueError:
            return None
    if not (isinstance(value, list) and value and all(isinstance(t, list) and t for t in value)
            and all(isinstance(label, str) for t in value for label in t)):
        return None
    return value


def best(tiers: list[list[str]]) -> str:
    """The answer that continues the chat: the top tier's, A when A is in it (as a tie keeps
    A), else the first of the top tier in label order."""
    top = tiers[0]
    return "A" if "A" in top else sorted(top, key=LABELS.index)[0]


def pairs(tiers: list[list[str]]) -> list[tuple[str, str, float]]:
    """Every pair of the ranking as ``(first, second, label)``: label 1 when ``first`` is
    ranked above ``second``, 0.5 when they share a tier.  C(K, 2) pairs for K answers."""
    out: list[tuple[str, str, float]] = []
    for i, tier in enumerate(tiers):
        for j, first in enumerate(tier):
            out += [(first, second, 0.5) for second in tier[j + 1:]]
        for lower in tiers[i + 1:]:
            out += [(first, second, 1.0) for first in tier for second in lower]
    return out


def position(tiers: list[list[str]], label: str) -> int:
    return next(i for i, tier in enumerate(tiers) if label in tier)


def answers(row: dict) -> dict[str, str]:
    """label -> text of every answer of a comparison row (A, B and the extra answers)."""
    out = {"A": row.get("a_text"), "B": row.get("b_text")}
    for extra in extra_answers(row):
        out[extra["label"]] = extra.get("text")
    return out


def extra_answers(row: dict) -> list[dict]:
    """The row's extra answers (``[{label, generation_id, text}]``; [] when none or malformed)."""
    raw = row.get("extra_answers")
    try:
        value = json.loads(raw) if isinstance(raw, str) else (raw or [])
    except ValueError:
        return []
    return [e for e in value if isinstance(e, dict) and isinstance(e.get("label"), str)] if isinstance(value, list) else []
