"""Snapshot of the feedback log -> labelled training data, a held-out split, rollout prompts.

Every kind of judgement teaches (``docs/rlhf.md`` says why); how each one becomes data:

========================  ===============================================================
judgement                 training data
========================  ===============================================================
``a`` / ``b``             a pair, the picked answer over the other (``label`` 1)
``tie``                   a pair with ``label`` 0.5: "these two are equally good".  A tie
                          between answers of different length is exactly the evidence
                          that length does not matter, so it is kept, not dropped.
``edit`` (rewrite)        a pair, the user's rewrite over the model answer, ``weight``
                          ``rewrite_weight`` (a strong signal: the user wrote it)
``both_bad``              two unpaired *bad* labels (one per answer); and when the same
                          turn later got a rewrite, the rewrite is chosen over both
thumbs up / down          an unpaired *good* / *bad* label on the answer (KTO-style);
                          a ``down`` with reason tags weighs ``1 + reason_weight`` per tag;
                          an up and a down on the same context also make one pair
``rank`` (K answers,      all C(K, 2) pairs: each answer over each answer ranked below it
"compare more")           (``label`` 1), and a ``label`` 0.5 pair for two answers ranked
                          equal.  Each pair weighs ``rank_weight / (K - 1)`` (times
                          ``tie_weight`` for an equal pair): every answer is in K - 1 pairs,
                          so each answer counts once, as in a vote, and the ranking as a
                          whole K / 2 votes (2 for four answers).  InstructGPT trains a
                          prompt's C(K, 2) pairs as one batch element because the pairs
                          share answers and overfit when each is a full example; one
                          ranking here weighs the same however its pairs are batched, but
                          more than one vote, since it orders four answers.  Its pairs stay
                          together on one side of the held-out split and in one fold; a
                          pair of two identical answers, or whose better one is empty, is
                          skipped (counted in ``stats["rank_pairs_skipped"]``)
========================  ===============================================================

Nothing is dropped silently: ``Snapshot.judgements`` counts, per kind, what was seen, what
was used and what was dropped with the reason (shown in the console's run page).

Per-client cap: one client must not write the training data (InstructGPT capped the prompts
per labeller).  Each judgement has a contributor (``sessions.contributor``, a keyed hash of
the client's address; a session without one counts as its own) and a browser key
(``sessions.owner``).  Per run, no contributor, and no browser key, keeps more than
``max_client_share`` of the run's judgements (at least ``min_per_client``, and one or two
contributors are never capped: there is no crowd to outweigh).  Its earliest judgements are
kept; the rest are dropped and counted in the ledger, with the number of clients capped in
``stats["capped_clients"]``.

Held-out split: by time (exactly the newest ``heldout_fraction`` of the labelled items; the
default) or by session (a stable hash of the session id), never by random row: one user's
votes correlate.

Cross-fitting: every item also has a ``fold`` (0 or 1, a stable hash of its prompt), so two
reward models can be trained on disjoint halves: PPO optimises one, the gate's judge is the
other (``retrain.job``).  The same prompt is always in the same fold.

Rollout prompts: the real user prompts of the log (contexts of generations in sessions that
allow training, deduplicated, at most ``max_prompts_per_session`` per session, the most
recent), split with the same rule as the labels; topped up with the shipped seed prompts
(``seed_prompts.txt``) so that a cold start has at least ``min_seed_prompts`` rollout
prompts.  Prompts of held-out items never appear among the rollout prompts.

Reference samples: answers the reference (SFT) model gave to training prompts in the log,
for the reward normalisation (mean 0, std 1 on the reference policy's own answers).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from feedback import ranking

SEED_FILE = Path(__file__).with_name("seed_prompts.txt")
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant."

# judgement kinds, in the order the console lists them
KINDS = ("preference", "tie", "edit", "both_bad", "rank", "thumb_up", "thumb_down")


@dataclass
class Pair:
    """``chosen`` vs ``rejected`` given the ``prompt`` messages: ``label`` 1 means chosen is
    better, 0.5 means a tie (then the order carries no meaning)."""

    id: str
    session_id: str
    at: str
    prompt: list[dict]
    chosen: str
    rejected: str
    source: str  # 'regenerate' | 'tie' | 'edit' | 'both_bad+edit' | 'thumbs' | 'rank'
    label: float = 1.0
    weight: float = 1.0
    fold: int = 0

    @property
    def decisive(self) -> bool:
        return self.label != 0.5


@dataclass
class Point:
    """An unpaired absolute label on one answer: ``label`` 1 good, 0 bad."""

    id: str
    session_id: str
    at: str
    prompt: list[dict]
    answer: str
    label: float
    source: str  # 'thumb_up' | 'thumb_down' | 'both_bad'
    weight: float = 1.0
    fold: int = 0


@dataclass
class Snapshot:
    train: list[Pair]
    heldout: list[Pair]
    rollout_prompts: list[list[dict]]
    heldout_prompts: list[list[dict]]
    record_ids: list[str]  # comparison rows used
    train_points: list[Point] = field(default_factory=list)
    heldout_points: list[Point] = field(default_factory=list)
    rating_ids: list[str] = field(default_factory=list)
    reference: list[tuple[list[dict], str]] = field(default_factory=list)  # (prompt, SFT answer)
    judgements: dict = field(default_factory=dict)  # kind -> {seen, used, dropped: {reason: n}}
    stats: dict = field(default_factory=dict)


def load_seed_prompts() -> list[str]:
    """The shipped cold-start prompts, one per line (blank lines and ``#`` comments skipped)."""
    lines = SEED_FILE.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def _messages(context) -> list[dict]:
    msgs = json.loads(context) if isinstance(context, str) else list(context or [])
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def _key(messages: list[dict]) -> str:
    return json.dumps(messages, ensure_ascii=False, sort_keys=True)


def _frac(text: str) -> float:
    """A stable number in [0, 1) from a string (split by session, folds, seed prompts)."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) / 16**8


def fold_of(prompt: list[dict]) -> int:
    """The cross-fitting fold (0 or 1) of a prompt: stable across runs and processes."""
    return int(_frac("fold:" + _key(prompt)) >= 0.5)


def _ok(chosen: str | None, rejected: str | None) -> bool:
    return bool(chosen and chosen.strip()) and bool(rejected is not None) and chosen.strip() != (rejected or "").strip()


class Ledger:
    """Per kind of judgement: how many were seen, used, and dropped (with the reason)."""

    def __init__(self):
        self.rows = {k: {"seen": 0, "used": 0, "dropped": defaultdict(int)} for k in KINDS}

    def seen(self, kind: str) -> None:
        self.rows[kind]["seen"] += 1

    def used(self, kind: str) -> None:
        self.rows[kind]["used"] += 1

    def dropped(self, kind: str, reason: str) -> None:
        self.rows[kind]["dropped"][reason] += 1

    def as_dict(self) -> dict:
        return {k: {"seen": r["seen"], "used": r["used"], "dropped": dict(r["dropped"])} for k, r in self.rows.items()}


@dataclass
class LabelConfig:
    """How strongly each kind of judgement counts (multipliers on its loss term)."""

    rewrite_weight: float = 2.0
    """A user's rewrite over the model answer: the strongest evidence a user gives."""
    tie_weight: float = 1.0
    """A tie (label 0.5 in the tie-aware loss)."""
    both_bad_weight: float = 1.0
    """Each answer of a "both are bad" verdict, as an unpaired bad label."""
    thumb_weight: float = 1.0
    """A thumb up or down, as an unpaired label."""
    reason_weight: float = 0.25
    """Added to a thumb's weight per reason tag given with it (a reasoned thumb is surer)."""
    rank_weight: float = 1.0
    """A ranking of K answers: each of its C(K, 2) pairs weighs ``rank_weight / (K - 1)``, so
    each answer counts once and the ranking K / 2 votes (see the table above)."""


_KIND_OF = {"a": "preference", "b": "preference", "tie": "tie", "edit": "edit", "both_bad": "both_bad",
            ranking.RANK: "rank"}  # verdict -> kind of judgement


def ranking_pairs(r: dict, prompt: list[dict], fold: int, labels: LabelConfig) -> tuple[list[Pair], int]:
    """The pairs of one ranking row (see the table above) and how many were skipped
    (identical or empty answers).  No pairs when its order is malformed."""
    tiers = ranking.loads(r.get("ranking"))
    texts = ranking.answers(r)
    if not tiers or sorted(label for tier in tiers for label in tier) != sorted(texts):
        return [], 0
    weight = labels.rank_weight / max(1, len(texts) - 1)
    at = r["decided_at"] or r["created_at"]
    pairs, skipped = [], 0
    for first, second, label in ranking.pairs(tiers):
        chosen, rejected = texts[first], texts[second]
        if not _ok(chosen, rejected):
            skipped += 1
            continue
        pairs.append(Pair(f"{r['id']}:{first}{'>' if label == 1.0 else '='}{second}", r["session_id"], at, prompt,
                          chosen, rejected, "rank", label, weight * (labels.tie_weight if label == 0.5 else 1.0),
                          fold))
    return pairs, skipped


def comparison_pairs(rows: list[dict], ledger: Ledger, labels: LabelConfig,
                     stats: dict | None = None) -> tuple[list[Pair], list[Point], list[str]]:
    """Pairs and bad labels from decided comparison rows (ordered by time); returns them with
    the ids of the rows used.  ``stats`` gets the counts of ranking pairs made and skipped."""
    stats = stats if stats is not None else {}
    edits: dict[tuple, dict] = {}
    for r in rows:
        if r["verdict"] == "edit":
            edits.setdefault((r["conversation_id"], r["turn"]), r)
    pairs: list[Pair] = []
    points: list[Point] = []
    used: list[str] = []
    for r in rows:
        verdict, prompt = r["verdict"], _messages(r["context"])
        kind = _KIND_OF.get(verdict)
        if kind is None:
            continue  # an unknown verdict cannot be stored (the store validates verdicts)
        ledger.seen(kind)
        at = r["decided_at"] or r["created_at"]
        if not prompt or prompt[-1]["role"] != "user":
            ledger.dropped(kind, "context does not end with a user message")
            continue
        fold = fold_of(prompt)
        if verdict == ranking.RANK:
            made, skipped = ranking_pairs(r, prompt, fold, labels)
            stats["rank_pairs"] = stats.get("rank_pairs", 0) + len(made)
            stats["rank_pairs_skipped"] = stats.get("rank_pairs_skipped", 0) + skipped
            if made:
                pairs += made
                ledger.used(kind)
                used.append(r["id"])
            else:
                ledger.dropped(kind, "the ranking is malformed" if not skipped else "all answers identical or empty")
            continue
        if verdict == "both_bad":
            made = 0
            for k, text in (("a", r["a_text"]), ("b", r["b_text"])):
                if text and text.strip():
                    points.append(Point(f"{r['id']}:{k}", r["session_id"], at, prompt, text, 0.0, "both_bad",
                                        labels.both_bad_weight, fold))
                    made += 1
            edit = edits.get((r["conversation_id"], r["turn"]))
            if edit is not None and (edit["decided_at"] or "") >= (r["decided_at"] or ""):
                rewrite = edit["b_text"]
                for k, other in (("a", r["a_text"]), ("b", r["b_text"])):
                    if _ok(rewrite, other) and other != edit["a_text"]:
                        pairs.append(Pair(f"{r['id']}:{k}", r["session_id"], edit["decided_at"], prompt, rewrite,
                                          other, "both_bad+edit", 1.0, labels.rewrite_weight, fold))
                        made += 1
            if made:
                ledger.used(kind)
                used.append(r["id"])
            else:
                ledger.dropped(kind, "both answers empty")
            continue
        if verdict == "a":
            chosen, rejected = r["a_text"], r["b_text"]
        else:  # b, edit (the rewrite is b_text), tie (order is meaningless)
            chosen, rejected = r["b_text"], r["a_text"]
        if not _ok(chosen, rejected):
            ledger.dropped(kind, "the two answers are identical or empty")
            continue
        label, weight, source = 1.0, 1.0, r.get("source") or "regenerate"
        if verdict == "tie":
            label, weight, source = 0.5, labels.tie_weight, "tie"
        elif verdict == "edit":
            weight, source = labels.rewrite_weight, "edit"
        pairs.append(Pair(r["id"], r["session_id"], at, prompt, chosen, rejected, source, label, weight, fold))
        ledger.used(kind)
        used.append(r["id"])
    return pairs, points, used


def rating_labels(rows: list[dict], ledger: Ledger, labels: LabelConfig) -> tuple[list[Pair], list[Point], list[str]]:
    """Thumbs as unpaired labels; an up and a down on answers to the same context, in the
    same session, also make one pair (up chosen over down)."""
    points: list[Point] = []
    used: list[str] = []
    by_ctx: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {"up": [], "down": []})
    for r in rows:
        kind = f"thumb_{r['thumb']}"
        ledger.seen(kind)
        prompt = _messages(r["context"])
        if not prompt or prompt[-1]["role"] != "user":
            ledger.dropped(kind, "context does not end with a user message")
            continue
        if not (r["answer_text"] or "").strip():
            ledger.dropped(kind, "empty answer")
            continue
        reasons = json.loads(r["reasons"] or "[]") if isinstance(r.get("reasons"), str) else (r.get("reasons") or [])
        weight = labels.thumb_weight * (1 + labels.reason_weight * len(set(reasons)))
        points.append(Point(r["id"], r["session_id"], r["created_at"], prompt, r["answer_text"],
                            1.0 if r["thumb"] == "up" else 0.0, kind, weight, fold_of(prompt)))
        ledger.used(kind)
        used.append(r["id"])
        by_ctx[_key(prompt)][r["thumb"]].append(r)
    pairs = []
    for groups in by_ctx.values():
        for up in groups["up"]:
            for down in groups["down"]:
                if up["session_id"] != down["session_id"] or not _ok(up["answer_text"], down["answer_text"]):
                    continue
                prompt = _messages(up["context"])
                pairs.append(Pair(f"thumbs:{up['id']}:{down['id']}", up["session_id"],
                                  max(up["created_at"], down["created_at"]), prompt, up["answer_text"],
                                  down["answer_text"], "thumbs", 1.0, labels.thumb_weight, fold_of(prompt)))
    return pairs, points, used


CAPPED = "over the per-client cap (data.max_client_share)"


def _client_cap(counts: list[int], share: float, floor: int) -> int | None:
    """The most judgements one of the contributors with ``counts`` may keep: the largest c
    with c <= max(floor, s * sum(min(n, c))), where s = max(share, 2 / len(counts)).  None
    when nobody is over it."""
    if not counts:
        return None
    s = max(share, 2 / len(counts))
    cap = max(counts)
    while True:  # c -> s * total(c) falls to its fixed point
        new = max(floor, int(s * sum(min(n, cap) for n in counts)))
        if new >= cap:
            return None if cap == max(counts) else cap
        cap = new


def cap_clients(comparisons: list[dict], ratings: list[dict], ledger: Ledger, share: float,
                floor: int) -> tuple[list[dict], list[dict], dict]:
    """The rows each contributor and each browser key may keep (see the module's docstring),
    in their order; a dropped row is seen and dropped in ``ledger``.  Returns the kept
    comparisons and ratings, and stats: clients capped, judgements dropped, the caps."""
    rows = [(r, "comparison") for r in comparisons] + [(r, "rating") for r in ratings]
    rows.sort(key=lambda item: item[0].get("decided_at") or item[0]["created_at"])
    keep = [True] * len(rows)
    stats = {"capped_clients": 0, "capped_judgements": 0}
    for who in ("contributor", "owner"):
        counts: dict[str, int] = defaultdict(int)
        for (r, _), kept in zip(rows, keep):
            if kept:
                counts[r.get(who) or "session:" + r["session_id"]] += 1
        cap = _client_cap(list(counts.values()), share, floor)
        if cap is None:
            continue
        stats[f"{who}_cap"] = cap
        stats["capped_clients"] += sum(n > cap for n in counts.values())
        taken: dict[str, int] = defaultdict(int)
        for i, (r, _) in enumerate(rows):
            key = r.get(who) or "session:" + r["session_id"]
            if keep[i]:
                taken[key] += 1
                keep[i] = taken[key] <= cap
    for (r, table), kept in zip(rows, keep):
        if not kept:
            kind = f"thumb_{r['thumb']}" if table == "rating" else _KIND_OF.get(r["verdict"])
            if kind:
                ledger.seen(kind)
                ledger.dropped(kind, CAPPED)
            stats["capped_judgements"] += 1
    kept_rows = [r for (r, _), k in zip(rows, keep) if k]
    kept_ids = {id(r) for r in kept_rows}
    return [r for r in comparisons if id(r) in kept_ids], [r for r in ratings if id(r) in kept_ids], stats


def _split_flags(items: list[tuple[str, str]], heldout_fraction: float,
                 split: str, groups: list[str | None] | None = None) -> tuple[list[bool], str | None]:
    """items: (session_id, at), in the order the store recorded them.  Returns held-out flags
    and, for the time split, the time of the oldest held-out item.

    The time split holds out exactly the newest ``round(n * heldout_fraction)`` items (at
    least one when there are two or more), ordered by ``(at, position)``: judgements recorded
    in the same millisecond keep the store's order, so the count never depends on the clock.
    ``groups`` (per item, None for none; may be shorter than ``items``) keeps items together,
    the pairs of one ranking: when the cut falls inside a group, the whole group is held out
    (its items share one time, so the cut time stays the same)."""
    if split == "session":
        return [_frac(s) < heldout_fraction for s, _ in items], None
    if split != "time":
        raise ValueError("split must be 'time' or 'session'")
    if len(items) < 2 or heldout_fraction <= 0:
        return [False] * len(items), None
    n_held = max(1, round(len(items) * heldout_fraction))
    order = sorted(range(len(items)), key=lambda i: (items[i][1], i))
    held = set(order[len(items) - n_held:])
    groups = list(groups or [])
    split_groups = {groups[i] for i in held if i < len(groups) and groups[i] is not None}
    held |= {i for i, g in enumerate(groups) if g is not None and g in split_groups}
    return [i in held for i in range(len(items))], items[order[len(items) - n_held]][1]


def build_snapshot(store, *, heldout_fraction: float = 0.2, split: str = "time", max_prompts_per_session: int = 20,
                   min_seed_prompts: int = 64, min_heldout_prompts: int = 24, include_thumbs: bool = True,
                   since: str | None = None, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                   reference_version: str | None = "sft", max_reference: int = 256,
                   labels: LabelConfig | None = None, max_client_share: float = 0.25,
                   min_per_client: int = 50) -> Snapshot:
    """Reads what training may use from the store and turns it into a :class:`Snapshot`."""
    labels = labels or LabelConfig()
    stats: dict = defaultdict(int)
    ledger = Ledger()
    rows = store.usable_comparisons(since=since)
    stats["comparisons"] = len(rows)
    rows, ratings, capped = cap_clients(rows, store.usable_ratings() if include_thumbs else [], ledger,
                                        max_client_share, min_per_client)
    stats.update(capped)
    pairs, points, used = comparison_pairs(rows, ledger, labels, stats)
    rating_ids: list[str] = []
    if include_thumbs:
        t_pairs, t_points, rating_ids = rating_labels(ratings, ledger, labels)
        pairs += t_pairs
        points += t_points
        stats["thumb_pairs"] = len(t_pairs)
    # one time split over every labelled item: pairs first, then points, each in store order;
    # the pairs of one ranking stay together
    flags, cut = _split_flags([(p.session_id, p.at) for p in pairs] + [(q.session_id, q.at) for q in points],
                              heldout_fraction, split,
                              groups=[p.id.split(":")[0] if p.source == "rank" else None for p in pairs])
    pflags, qflags = flags[:len(pairs)], flags[len(pairs):]
    train = [p for p, f in zip(pairs, pflags) if not f]
    heldout = [p for p, f in zip(pairs, pflags) if f]
    train_points = [q for q, f in zip(points, qflags) if not f]
    heldout_points = [q for q, f in zip(points, qflags) if f]

    # rollout prompts: real user prompts, deduplicated, capped per session (most recent)
    held_keys = {_key(p.prompt) for p in heldout} | {_key(q.prompt) for q in heldout_points}
    train_keys = {_key(p.prompt) for p in train} | {_key(q.prompt) for q in train_points}
    per_session: dict[str, list[tuple[str, list[dict]]]] = defaultdict(list)
    seen: set[str] = set()
    for g in reversed(store.user_prompts()):  # newest first
        msgs = _messages(g["context"])
        if not msgs or msgs[-1]["role"] != "user" or not msgs[-1]["content"].strip():
            continue
        k = _key(msgs)
        if k in seen:
            continue
        seen.add(k)
        if len(per_session[g["session_id"]]) < max_prompts_per_session:
            per_session[g["session_id"]].append((g["created_at"], msgs))
        else:
            stats["prompts_capped"] += 1
    rollout, held_prompts = [], []
    for sid, items in per_session.items():
        for at, msgs in reversed(items):
            k = _key(msgs)
            if split == "session":
                is_held = _frac(sid) < heldout_fraction
            else:
                is_held = cut is not None and at >= cut
            if k in held_keys or (is_held and k not in train_keys):
                held_prompts.append(msgs)
            else:
                rollout.append(msgs)
    stats["user_rollout_prompts"] = len(rollout)
    stats["user_heldout_prompts"] = len(held_prompts)
    seeds = load_seed_prompts()
    seed_train = [s for s in seeds if _frac("seed:" + s) >= 0.2]
    seed_held = [s for s in seeds if _frac("seed:" + s) < 0.2]
    wrap = [[{"role": "system", "content": system_prompt}, {"role": "user", "content": s}] for s in seed_train]
    if len(rollout) < min_seed_prompts:
        add = wrap[: max(0, min_seed_prompts - len(rollout))]
        rollout += add
        stats["seed_rollout_prompts"] = len(add)
    if len(held_prompts) < min_heldout_prompts:
        add = [[{"role": "system", "content": system_prompt}, {"role": "user", "content": s}]
               for s in seed_held[: max(0, min_heldout_prompts - len(held_prompts))]]
        held_prompts += add
        stats["seed_heldout_prompts"] = len(add)

    # reference samples: the reference model's own answers to training-side prompts
    reference: list[tuple[list[dict], str]] = []
    if reference_version:
        held_prompt_keys = {_key(p) for p in held_prompts}
        for g in store.answers_of_version(reference_version, limit=4 * max_reference):  # newest first
            msgs = _messages(g["context"])
            if msgs and msgs[-1]["role"] == "user" and (g["content"] or "").strip() \
                    and _key(msgs) not in held_prompt_keys and len(reference) < max_reference:
                reference.append((msgs, g["content"]))
    stats.update(pairs=len(pairs), points=len(points), train=len(train), heldout=len(heldout),
                 train_points=len(train_points), heldout_points=len(heldout_points),
                 train_decisive=sum(p.decisive for p in train), heldout_decisive=sum(p.decisive for p in heldout),
                 split=split, heldout_fraction=heldout_fraction, split_cut=cut, rollout_prompts=len(rollout),
                 heldout_prompts=len(held_prompts), reference_samples=len(reference))
    return Snapshot(train=train, heldout=heldout, rollout_prompts=rollout, heldout_prompts=held_prompts,
                    record_ids=used, train_points=train_points, heldout_points=heldout_points,
                    rating_ids=rating_ids, reference=reference, judgements=ledger.as_dict(), stats=dict(stats))
