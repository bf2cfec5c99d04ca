"""benchmarks/reward_curve.py: re-labelling logged answer pairs with an oracle."""

from __future__ import annotations

from benchmarks import oracles
from benchmarks.reward_curve import relabel

PROMPT = [{"role": "user", "content": "How do I make tea?"}]
PROSE = "Boil water, pour it over the leaves and wait three minutes."
LIST = "Steps:\n1. Boil water.\n2. Pour it over the leaves.\n3. Wait three minutes."


def test_relabel_orders_decisive_pairs_by_the_oracle_and_keeps_ties():
    rows = [(PROMPT, PROSE, LIST, "c1"), (PROMPT, LIST, PROSE, "c2"), (PROMPT, PROSE, PROSE + " Enjoy.", "c3")]
    decisive, ties = relabel(rows, oracles.get("lists"))
    assert [(p.id, p.chosen) for p in decisive] == [("c1", LIST), ("c2", LIST)]
    assert [p.id for p in ties] == ["c3"] and ties[0].label == 0.5
    decisive, ties = relabel(rows, oracles.get("no_lists"))
    assert [(p.id, p.chosen) for p in decisive] == [("c1", PROSE), ("c2", PROSE)]
    assert all(p.fold == decisive[0].fold for p in decisive + ties)  # one prompt, one fold
