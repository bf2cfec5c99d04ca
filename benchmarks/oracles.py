"""Simulated annotators (AlpacaFarm style): hidden functions that judge a pair of answers.

An oracle is any callable ``oracle(prompt, a, b) -> "a" | "b" | "tie"`` where ``prompt`` is
the chat messages (or a plain string).  The training side never sees an oracle, only its
votes, so any user-written oracle plugs in the same way (``get("module:function")``).

Shipped tastes: about length (``concise``, ``verbose``), about form (``no_lists``, ``lists``,
``no_markdown``), about voice (``no_first_person``) and about engagement (``question_back``);
the last three compare rates per word or presence, not raw counts, so that a longer answer is
not favoured just for being longer.  Tastes of other kinds (issue 19), none about
length or a count of list or markdown marks: lexical (``plain_words``, mean word length),
semantic (``on_topic``, the question's own words), epistemic voice (``no_hedging``) and
rhythm (``short_sentences``, words per sentence).  ``random`` is the null control: its votes carry no
preference at all, so the retrain's gate must reject what it learns from them.
"""

from __future__ import annotations

import importlib
import random
import re
import threading
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


_LIST_LINE = re.compile(r"(?m)^\s*(?:[-*\u2022]|\d+[.)])\s+")


def _list_lines(text: str) -> int:
    return len(_LIST_LINE.findall(text or ""))


def lists(prompt, a: str, b: str) -> str:
    """The opposite of ``no_lists``: prefers answers organised as lists; more bullet/numbered
    list lines wins, a tie when equal.  Raw counts (as in ``no_lists``), so it is not
    length-neutral: a longer list wins; the benchmark's length-matched win rate tells list-ness
    from length."""
    ca, cb = _list_lines(a), _list_lines(b)
    return "tie" if ca == cb else ("a" if ca > cb else "b")


def _empty_rule(a: str, b: str) -> str | None:
    """An empty answer never wins against a non-empty one (else a taste for "less of X" would
    be satisfied best by saying nothing); None when both or neither are empty."""
    ea, eb = not (a or "").strip(), not (b or "").strip()
    if ea == eb:
        return None
    return "b" if ea else "a"


def _fewer_per_word(a: str, b: str, count: Callable[[str], int]) -> str:
    """Fewer occurrences per word wins; a tie when the counts are equal (both zero included:
    equal counts in answers of different lengths would otherwise favour the longer one) or
    the rates are equal (``x`` against ``x`` repeated twice)."""
    verdict = _empty_rule(a, b)
    if verdict:
        return verdict
    ca, cb = count(a), count(b)
    wa, wb = max(1, _words(a)), max(1, _words(b))
    if ca == cb or ca * wb == cb * wa:
        return "tie"
    return "a" if ca * wb < cb * wa else "b"


FIRST_PERSON = frozenset({"i", "me", "my", "mine", "myself", "i'm", "im", "i've", "i'd", "i'll"})


def _first_person(text: str) -> int:
    words = re.findall(r"[a-z']+", (text or "").lower().replace("\u2019", "'"))
    return sum(w.strip("'") in FIRST_PERSON for w in words)


def no_first_person(prompt, a: str, b: str) -> str:
    """Prefers impersonal answers: fewer first-person singular pronouns (I, me, my, mine, myself,
    I'm, I've, I'd, I'll) *per word* wins ("As an AI, I think..." loses to a plain statement);
    a tie when the counts are equal (e.g. both have none) or the rates are.  Length-neutral: an
    answer and the same answer written twice tie.  An empty answer never wins."""
    return _fewer_per_word(a, b, _first_person)


_MARKDOWN = re.compile(
    r"\*\*[^*\n]+?\*\*"                          # **bold**
    r"|__[^_\n]+?__"                             # __bold__
    r"|(?<![*\w])\*[^*\s][^*\n]*?\*(?![*\w])"    # *italic* (not a "* " bullet, not 2*3*4)
    r"|`{3}|`[^`\n]+`"                           # code fences, `inline code`
    r"|\[[^\]\n]+\]\([^)\n]*\)"                  # [links](url)
    r"|(?m:^[ \t]*#{1,6}[ \t]+\S)"               # # headers
    r"|(?m:^[ \t]*>[ \t]?\S)"                    # > block quotes
    r"|(?m:^[ \t]*\|.*\|[ \t]*$)"                # | table | rows |
)


def _markdown_marks(text: str) -> int:
    return len(_MARKDOWN.findall(text or ""))


def no_markdown(prompt, a: str, b: str) -> str:
    """Prefers plain text: fewer markdown marks (bold, italics, headers, code, links, quotes,
    table rows) *per word* wins; list markers do not count (``no_lists`` is that taste).  A tie
    when the counts are equal (e.g. both plain) or the rates are; length-neutral as
    ``no_first_person``.  An empty answer never wins."""
    return _fewer_per_word(a, b, _markdown_marks)


def _ends_with_question(text: str) -> bool:
    return (text or "").rstrip().rstrip("\"')*_ \u201d\u2019").endswith("?")


def question_back(prompt, a: str, b: str) -> str:
    """Prefers answers that end by asking the user something ("... Would you like a recipe?"):
    the one whose last sentence ends with "?" wins; a tie when both or neither do.
    Presence, not a count, so length-neutral as such; but an answer cut off by the token cap
    ends mid-sentence, so under a cap it also rewards finishing in time.  An empty answer never
    wins."""
    verdict = _empty_rule(a, b)
    if verdict:
        return verdict
    qa, qb = _ends_with_question(a), _ends_with_question(b)
    return "tie" if qa == qb else ("a" if qa else "b")



# -- tastes of other kinds (issue 19): neither length nor a count of list or markdown marks --------
def _tie_within(xa: float, xb: float, rel_tol: float) -> bool:
    return abs(xa - xb) <= rel_tol * max(abs(xa), abs(xb), 1e-9)


def _prefer(a: str, b: str, measure: Callable[[str], float], rel_tol: float, lower: bool = True) -> str:
    """The answer with the lower (``lower``) or higher ``measure`` wins; a tie within
    ``rel_tol``; an empty answer never wins."""
    verdict = _empty_rule(a, b)
    if verdict:
        return verdict
    xa, xb = measure(a), measure(b)
    if _tie_within(xa, xb, rel_tol):
        return "tie"
    return "a" if (xa < xb) == lower else "b"


def _letters_per_word(text: str) -> float:
    words = re.findall(r"[A-Za-z]+", text or "")
    return sum(len(w) for w in words) / max(1, len(words))


def plain_words(prompt, a: str, b: str, rel_tol: float = 0.03) -> str:
    """A lexical taste, continuous in every answer: prefers simpler vocabulary, the lower mean
    word length in letters ("use" over "utilise"); a tie when the two are within 3%.
    Length-neutral: an answer and the same answer written twice tie.  An empty answer never
    wins."""
    return _prefer(a, b, _letters_per_word, rel_tol)


_STOP = frozenset("a an and are as at be by can do does for from how i in is it me my of on or so that the "
                  "this to was what when where which who why will with you your".split())


def _content_words(text: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", (text or "").lower()) if len(w) > 2 and w not in _STOP}


def _user_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    users = [m.get("content", "") for m in prompt or [] if m.get("role") == "user"]
    return users[-1] if users else ""


def on_topic(prompt, a: str, b: str, margin: float = 0.15) -> str:
    """A semantic taste: prefers the answer that stays on the question, the larger share of the
    question's content words (stop words dropped) that the answer uses *per word of its own*
    scaled to a length-neutral rate: ``hits / sqrt(words)``; a tie within 15%.  Depends on the
    prompt, unlike the other tastes.  An empty answer never wins."""
    verdict = _empty_rule(a, b)
    if verdict:
        return verdict
    q = _content_words(_user_text(prompt))
    if not q:
        return "tie"

    def rate(text: str) -> float:
        words = re.findall(r"[a-z]+", text.lower())
        hits = sum(w in q for w in words)
        return hits / max(1.0, len(words)) ** 0.5

    ra, rb = rate(a), rate(b)
    if _tie_within(ra, rb, margin):
        return "tie"
    return "a" if ra > rb else "b"


HEDGES = frozenset({"may", "might", "could", "perhaps", "possibly", "probably", "usually", "generally",
                    "typically", "often", "sometimes", "likely", "somewhat", "maybe", "seems", "seem",
                    "suggests", "suggest", "appear", "appears", "approximately", "around", "about", "roughly",
                    "can", "tend", "tends"})


def _hedges(text: str) -> int:
    return sum(w in HEDGES for w in re.findall(r"[a-z]+", (text or "").lower()))


def no_hedging(prompt, a: str, b: str) -> str:
    """An epistemic-voice taste: prefers confident answers, fewer hedges (may, might, could,
    perhaps, usually, generally, around, can, ...) *per word*; a tie when the counts or the
    rates are equal; length-neutral as ``no_first_person``.  An empty answer never wins."""
    return _fewer_per_word(a, b, _hedges)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", (text or "").strip()) if re.search(r"\w", s)]


def first_half(text: str) -> str | None:
    """An answer's first half of sentences (rounded down; whole sentences, so it ends), or
    None under four sentences: the same answer, shorter, for checks along the length axis."""
    sentences = [x for x in re.split(r"(?<=[.!?])\s+", (text or "").strip()) if x]
    return " ".join(sentences[:len(sentences) // 2]) if len(sentences) >= 4 else None


def short_sentences(prompt, a: str, b: str, rel_tol: float = 0.1) -> str:
    """A rhythm taste: prefers the shorter mean sentence (words per sentence), whatever the
    answer's total length; a tie within 10%.  An empty answer never wins."""
    def mean_len(text: str) -> float:
        ss = _sentences(text)
        return sum(_words(s) for s in ss) / max(1, len(ss))

    return _prefer(a, b, mean_len, rel_tol)

NULL_SEED = 0
_null_rng = random.Random(NULL_SEED)
_null_lock = threading.Lock()


def reseed_random(seed: int = NULL_SEED) -> None:
    """Restarts the null control's draws (the benchmark does so for each run)."""
    global _null_rng
    with _null_lock:
        _null_rng = random.Random(seed)


def random_verdict(prompt, a: str, b: str) -> str:
    """The null control (``random``): ignores the answers and votes "a", "b" or "tie" with
    probability 1/3 each, drawn from a module-level ``random.Random(NULL_SEED)`` (see
    ``reseed_random``), so a sequence of calls is reproducible.  Its votes hold no
    preference, so a reward model fit to them is at chance and the gate **must reject** the
    candidate; a promotion here is a false positive of the whole loop."""
    with _null_lock:
        return _null_rng.choice(("a", "b", "tie"))


ORACLES: dict[str, Oracle] = {"concise": concise, "verbose": verbose, "no_lists": no_lists, "lists": lists,
                              "no_first_person": no_first_person, "no_markdown": no_markdown,
                              "question_back": question_back, "plain_words": plain_words, "on_topic": on_topic,
                              "no_hedging": no_hedging, "short_sentences": short_sentences,
                              "random": random_verdict}


def get(name: str) -> Oracle:
    """A built-in oracle by name, or any callable as ``package.module:function``."""
    if name in ORACLES:
        return ORACLES[name]
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    raise KeyError(f"unknown oracle {name!r}: use one of {', '.join(ORACLES)} or module:function")
