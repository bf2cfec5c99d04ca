"""Snapshot of the feedback log -> preference pairs, a held-out split and rollout prompts.

How each judgement becomes training data (the choices the recipe leaves open):

- ``a`` / ``b``: the picked answer is *chosen*, the other *rejected* (source ``regenerate``
  or whatever the comparison row says).
- ``edit``: the user's rewrite (``b_text``) is chosen over the model answer (``a_text``).
- ``tie``: **dropped** from the Bradley-Terry loss (no 0.5 target): a tie says nothing about
  which way the reward should move, and with a few hundred votes every pair counts; counted
  in ``stats["ties"]``.
- ``both_bad``: no ordering between A and B, so it is **skipped**, unless the same
  conversation turn later received a user rewrite (an ``edit`` row): then the rewrite is
  chosen over *both* answers (source ``both_bad+edit``).  Counted in ``stats``.
- thumbs (``ratings``): an *up* and a *down* on two answers to the very same context become
  one pair (up chosen over down, source ``thumbs``); lone thumbs are not used.

Held-out split: by time (the newest ``heldout_fraction`` of the pairs, the default) or by
session (a stable hash of the session id), never by random row: one user's votes correlate.

Rollout prompts: the real user prompts of the log (contexts of usable generations, opted-out
sessions excluded), deduplicated, at most ``max_prompts_per_session`` per session (the most
recent), split with the same rule as the pairs; topped up with the shipped seed prompts
(``seed_prompts.txt``) so that a cold start has at least ``min_seed_prompts`` rollout
prompts.  Prompts of held-out pairs never appear among the rollout prompts.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

SEED_FILE = Path(__file__).with_name("seed_prompts.txt")
DEFAULT_SYSTEM_PROMPT = "You are a helpful AI assistant."


@dataclass
class Pair:
    """One preference: ``chosen`` over ``rejected`` given the ``prompt`` messages."""

    id: str
    session_id: str
    at: str
    prompt: list[dict]
    chosen: str
    rejected: str
    source: str  # 'regenerate' | 'edit' | 'both_bad+edit' | 'thumbs'


@dataclass
class Snapshot:
    train: list[Pair]
    heldout: list[Pair]
    rollout_prompts: list[list[dict]]
    heldout_prompts: list[list[dict]]
    record_ids: list[str]
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
    """A stable number in [0, 1) from a string (split by session, seed prompts)."""
    return int(hashlib.sha1(text.encode("utf-8")).hexdigest()[:8], 16) / 16**8


def _ok(chosen: str | None, rejected: str | None) -> bool:
    return bool(chosen and chosen.strip()) and bool(rejected is not None) and chosen.strip() != (rejected or "").strip()


def comparison_pairs(rows: list[dict], stats: dict) -> tuple[list[Pair], list[str]]:
    """Pairs from decided comparison rows (ordered by time); returns pairs and used ids."""
    edits: dict[tuple, dict] = {}
    for r in rows:
        if r["verdict"] == "edit":
            edits.setdefault((r["conversation_id"], r["turn"]), r)
    pairs: list[Pair] = []
    used: list[str] = []
    for r in rows:
        verdict, prompt = r["verdict"], _messages(r["context"])
        if not prompt or prompt[-1]["role"] != "user":
            stats["skipped_bad_context"] += 1
            continue
        if verdict == "tie":
            stats["ties"] += 1
            continue
        if verdict == "both_bad":
            stats["both_bad"] += 1
            edit = edits.get((r["conversation_id"], r["turn"]))
            if edit is None or (edit["decided_at"] or "") < (r["decided_at"] or ""):
                stats["both_bad_skipped"] += 1
                continue
            rewrite = edit["b_text"]
            made = 0
            for k, other in (("a", r["a_text"]), ("b", r["b_text"])):
                if _ok(rewrite, other) and other != edit["a_text"]:
                    pairs.append(Pair(f"{r['id']}:{k}", r["session_id"], edit["decided_at"], prompt,
                                      rewrite, other, "both_bad+edit"))
                    made += 1
            if made:
                stats["both_bad_with_rewrite"] += 1
                used.append(r["id"])
            continue
        if verdict == "a":
            chosen, rejected = r["a_text"], r["b_text"]
        elif verdict in ("b", "edit"):
            chosen, rejected = r["b_text"], r["a_text"]
        else:
            stats["skipped_unknown_verdict"] += 1
            continue
        if not _ok(chosen, rejected):
            stats["skipped_identical_or_empty"] += 1
            continue
        if verdict == "edit":
            stats["edits"] += 1
        source = "edit" if verdict == "edit" else (r.get("source") or "regenerate")
        pairs.append(Pair(r["id"], r["session_id"], r["decided_at"] or r["created_at"], prompt, chosen,
                          rejected, source))
        used.append(r["id"])
    return pairs, used


def thumb_pairs(rows: list[dict], stats: dict) -> list[Pair]:
    """An up and a down on answers to the same context -> one pair per (up, down) couple."""
    by_ctx: dict[str, dict[str, list[dict]]] = defaultdict(lambda: {"up": [], "down": []})
    for r in rows:
        by_ctx[_key(_messages(r["context"]))][r["thumb"]].append(r)
    pairs = []
    for groups in by_ctx.values():
        for up in groups["up"]:
            for down in groups["down"]:
                if up["session_id"] != down["session_id"] or not _ok(up["answer_text"], down["answer_text"]):
                    continue
                prompt = _messages(up["context"])
                if not prompt or prompt[-1]["role"] != "user":
                    continue
                pairs.append(Pair(f"thumbs:{up['id']}:{down['id']}", up["session_id"],
                                  max(up["created_at"], down["created_at"]), prompt, up["answer_text"],
                                  down["answer_text"], "thumbs"))
                stats["thumb_pairs"] += 1
    return pairs


def _split_flags(items: list[tuple[str, str]], heldout_fraction: float,
                 split: str) -> tuple[list[bool], str | None]:
    """items: (session_id, at), in the order the store recorded them.  Returns held-out flags
    and, for the time split, the time of the oldest held-out item.

    The time split holds out exactly the newest ``round(n * heldout_fraction)`` items (at
    least one when there are two or more), ordered by ``(at, position)``: judgements recorded
    in the same millisecond keep the store's order, so the count never depends on the clock."""
    if split == "session":
        return [_frac(s) < heldout_fraction for s, _ in items], None
    if split != "time":
        raise ValueError("split must be 'time' or 'session'")
    if len(items) < 2 or heldout_fraction <= 0:
        return [False] * len(items), None
    n_held = max(1, round(len(items) * heldout_fraction))
    order = sorted(range(len(items)), key=lambda i: (items[i][1], i))
    held = set(order[len(items) - n_held:])
    return [i in held for i in range(len(items))], items[order[len(items) - n_held]][1]


def build_snapshot(store, *, heldout_fraction: float = 0.2, split: str = "time", max_prompts_per_session: int = 20,
                   min_seed_prompts: int = 64, min_heldout_prompts: int = 24, include_thumbs: bool = True,
                   since: str | None = None, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> Snapshot:
    """Reads what training may use from the store and turns it into a :class:`Snapshot`."""
    stats: dict = defaultdict(int)
    rows = store.usable_comparisons(since=since)
    stats["comparisons"] = len(rows)
    pairs, used = comparison_pairs(rows, stats)
    if include_thumbs:
        pairs += thumb_pairs(store.usable_ratings(), stats)
    flags, cut = _split_flags([(p.session_id, p.at) for p in pairs], heldout_fraction, split)
    train = [p for p, f in zip(pairs, flags) if not f]
    heldout = [p for p, f in zip(pairs, flags) if f]

    # rollout prompts: real user prompts, deduplicated, capped per session (most recent)
    held_keys = {_key(p.prompt) for p in heldout}
    train_keys = {_key(p.prompt) for p in train}
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
    stats.update(pairs=len(pairs), train=len(train), heldout=len(heldout), split=split,
                 heldout_fraction=heldout_fraction, split_cut=cut, rollout_prompts=len(rollout),
                 heldout_prompts=len(held_prompts))
    return Snapshot(train=train, heldout=heldout, rollout_prompts=rollout, heldout_prompts=held_prompts,
                    record_ids=used, stats=dict(stats))
