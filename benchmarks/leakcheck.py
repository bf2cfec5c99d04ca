"""Held-out prompts must stay held out: exact leaks and near-paraphrases of training prompts.

A learning benchmark that evaluates on prompts the policy was trained on (or on light
rewordings of them, "How do I make a good cup of tea?" against the seed "How do I make a cup
of tea?") measures memory, not learning.  Two checks:

- :func:`near_duplicates`: held-out prompts that are near-paraphrases of a training prompt, by
  the Jaccard similarity of their *content words* (after :func:`normalise`, without function
  words, instruction verbs and numbers, with a crude suffix stemmer), so "Explain what an atom
  is." and "What is an atom?" score 1.0 while "Why is the sky dark at night?" and "Why is the
  sky blue?" score 0.25.  :data:`THRESHOLD` was picked by eye on the seed prompts: every pair at
  or above it was a rewording of the same request.
- :func:`leaked_prompts`: held-out prompts that appear verbatim (after :func:`normalise`) among
  the prompts a retrain actually used (rollout and gate prompts).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

THRESHOLD = 0.4

# function words, instruction verbs, numbers and length modifiers: they say how to answer,
# not what about, so two prompts sharing only these are not paraphrases
STOP_WORDS = frozenset("""
a an the and or but of in on at to for from with by about into as is are was were be been being
am do does did done have has had it its this that these those there here what which who whom whose
when where why how i me my we us our you your he she they them their some any each every all
can could should would will shall may might must please also just very more most much many
s t re ve ll d
explain describe give tell write suggest recommend name list show make let
simple simply terms short brief quick good way ways idea ideas example examples
difference between work works cause causes
one two three four five six seven eight nine ten
""".split())


def normalise(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: ``"What's  up?" -> "what s up"``."""
    text = re.sub(r"[^\w\s]|_", " ", (text or "").lower())
    return re.sub(r"\s+", " ", text).strip()


def _stem(word: str) -> str:
    """A crude suffix stemmer: enough to match hike/hiking, volcano/volcanoes, vaccine/vaccines."""
    if len(word) > 4 and word.endswith("ies"):
        word = word[:-3] + "y"
    elif len(word) > 4 and word.endswith("es") and word[-3] in "osxh":
        word = word[:-2]
    elif len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        word = word[:-1]
    if len(word) > 5 and word.endswith("ing"):
        word = word[:-3]
    if len(word) > 3 and word.endswith("e"):
        word = word[:-1]
    return word


_STOP_STEMS = frozenset(_stem(w) for w in STOP_WORDS)


def content_words(text: str) -> frozenset[str]:
    """The stemmed content words of a prompt (what it is about)."""
    stems = (_stem(w) for w in normalise(text).split() if w not in STOP_WORDS)
    return frozenset(w for w in stems if w not in _STOP_STEMS)


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the two prompts' content words; when either has none, 1.0 for the
    same normalised text and 0.0 otherwise."""
    wa, wb = content_words(a), content_words(b)
    if not wa or not wb:
        return 1.0 if normalise(a) == normalise(b) and normalise(a) else 0.0
    return len(wa & wb) / len(wa | wb)


def near_duplicates(heldout: Iterable[str], seeds: Iterable[str],
                    threshold: float = THRESHOLD) -> list[tuple[str, str, float]]:
    """``(held-out prompt, most similar seed prompt, similarity)`` for every held-out prompt
    whose best match scores at least ``threshold`` (exact duplicates score 1.0), most similar
    first."""
    seeds = list(seeds)
    out = []
    for h in heldout:
        if not seeds:
            break
        score, seed = max((similarity(h, s), s) for s in seeds)
        if normalise(h) in {normalise(s) for s in seeds}:
            score = 1.0
        if score >= threshold:
            out.append((h, seed, round(score, 3)))
    return sorted(out, key=lambda t: -t[2])


def leaked_prompts(heldout: Iterable[str], used_prompts: Iterable[str]) -> list[str]:
    """The held-out prompts that appear (after :func:`normalise`) among ``used_prompts`` (plain
    user-message strings, e.g. a retrain's rollout and gate prompts), in held-out order."""
    used = {normalise(p) for p in used_prompts if isinstance(p, str)}
    return [h for h in heldout if normalise(h) in used]


def last_user_message(prompt) -> str | None:
    """The last user message of a chat prompt (a list of ``{"role", "content"}`` messages, a
    ``{"messages": [...]}`` record, or a plain string)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        prompt = prompt.get("messages", prompt.get("prompt"))
        if isinstance(prompt, str):
            return prompt
    for m in reversed(list(prompt or [])):
        if isinstance(m, dict) and m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):  # typed parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            return content if isinstance(content, str) else None
    return None


def check_run_prompts(path: str | Path, heldout: list[str]) -> dict:
    """The leak check of one retrain: ``path`` is its ``runs/<run>/prompts.json``,
    ``{"rollout": [chat messages, ...], "gate": [chat messages, ...]}``; no held-out prompt may
    be the last user message of any of them.  Returns ``available`` (False when the file is
    missing or unreadable), ``leaked`` (held-out prompts found), the counts and a one-line
    ``message``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"available": False, "leaked": [], "message": "leak check: not available"}
    except (OSError, ValueError) as exc:
        return {"available": False, "leaked": [], "message": f"leak check: not available ({path.name}: {exc})"}
    rollout = [m for m in (last_user_message(p) for p in data.get("rollout") or []) if m]
    gate = [m for m in (last_user_message(p) for p in data.get("gate") or []) if m]
    leaked = leaked_prompts(heldout, rollout + gate)
    message = (f"leak check: {len(leaked)} of {len(heldout)} held-out prompts among {len(rollout)} rollout / "
               f"{len(gate)} gate prompts")
    return {"available": True, "leaked": leaked, "n_heldout": len(heldout), "n_rollout": len(rollout),
            "n_gate": len(gate), "message": message}


def check_disjoint(heldout: list[str], prompts: list[str], what: str = "the pool's prompts") -> None:
    """Raises ValueError when a held-out prompt is among ``prompts`` or a near-paraphrase of one."""
    overlap = {normalise(h) for h in heldout} & {normalise(p) for p in prompts}
    if overlap:
        raise ValueError(f"held-out prompts leak into {what}: {sorted(overlap)[:3]}")
    near = near_duplicates(heldout, prompts)
    if near:
        raise ValueError(f"held-out prompts are near-paraphrases of {what}: {near[:3]}")
