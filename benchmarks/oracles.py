"""Simulated annotators (AlpacaFarm style): hidden functions that judge a pair of answers.

An oracle is any callable ``oracle(prompt, a, b) -> "a" | "b" | "tie"`` where ``prompt`` is
the chat messages (or a plain string).  The training side never sees an oracle, only its
votes, so any user-written oracle plugs in the same way (``get("module:function")``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

Oracle = Callable[[object, str, str], str]


def _words(text: str) -> int:
    return len(re.findall(r"\S+", text or ""))


def concise(prompt, a: str, b: str, rel_tol: float = 0.1, abs_tol: int = 2) -> str:
    """Prefers the shorter answer (in words); a tie when the lengths are within 10% (or 2 words).
    An empty answer never wins against a non-empty one."""
    la, lb = _words(a), _words(b)
    if (la == 0) != (lb == 0):
        return "b" if la == 0 else "a"
    if abs(la - lb) <= max(abs_tol, rel_tol * max(la, lb)):
        return "tie"
    return "a" if la < lb else "b"


def verbose(prompt, a: str, b: str) -> str:
    """The opposite taste: prefers the longer answer (ties as in ``concise``)."""
    v = concise(prompt, a, b)
    return {"a": "b", "b": "a", "tie": "tie"}[v] if _words(a) and _words(b) else v


def no_lists(prompt, a: str, b: str) -> str:
    """Prefers prose: fewer bullet/numbered list lines wins; tie when equal."""
    def count(t: str) -> int:
        return len(re.findall(r"(?m)^\s*(?:[-*\u2022]|\d+[.)])\s+", t or ""))
    ca, cb = count(a), count(b)
    return "tie" if ca == cb else ("a" if ca < cb else "b")


ORACLES: dict[str, Oracle] = {"concise": concise, "verbose": verbose, "no_lists": no_lists}


def get(name: str) -> Oracle:
    """A built-in oracle by name, or any callable as ``package.module:function``."""
    if name in ORACLES:
        return ORACLES[name]
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    raise KeyError(f"unknown oracle {name!r}: use one of {', '.join(ORACLES)} or module:function")
