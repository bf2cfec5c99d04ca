"""Three tastes written after the reward model and PPO were frozen (issue 19): a check on
oracles the team does not see, not part of ``oracles.ORACLES``.  Each was measured only for its
decisive rate on an earlier run's answer pairs, then run once through the whole loop::

    python benchmarks/learning.py --oracle benchmarks.unseen_tastes:fewer_the
    python benchmarks/learning.py --oracle benchmarks.unseen_tastes:fewer_commas
    python benchmarks/learning.py --oracle benchmarks.unseen_tastes:fancy_words

Their figures are in docs/rlhf.md §6.  None is length (each is a rate per word) nor a count
of list or markdown marks."""
from __future__ import annotations

import re

from benchmarks.oracles import _letters_per_word, _prefer


def _per_word(text: str, pattern: str) -> float:
    words = re.findall(r"[A-Za-z']+", text or "")
    return len(re.findall(pattern, text or "")) / max(1, len(words))


def _fewer(a: str, b: str, pattern: str, rel_tol: float = 0.1) -> str:
    """Fewer matches of ``pattern`` per word wins; a tie within ``rel_tol``."""
    return _prefer(a, b, lambda t: _per_word(t, pattern), rel_tol, lower=True)


def fewer_the(prompt, a: str, b: str) -> str:
    """A terse register: fewer articles (the / a / an) per word."""
    return _fewer(a, b, r"\b(?:[Tt]he|[Aa]n?)\b")


def fewer_commas(prompt, a: str, b: str) -> str:
    """A punctuation style: fewer commas per word."""
    return _fewer(a, b, r",")


def fancy_words(prompt, a: str, b: str) -> str:
    """``plain_words`` reversed: a richer vocabulary, more letters per word; a tie within 3%."""
    return _prefer(a, b, _letters_per_word, 0.03, lower=False)
