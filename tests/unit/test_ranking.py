"""Rankings of four answers: the order's forms (``feedback.ranking``) and what the retrain
makes of one (``retrain.data``): its C(4, 2) = 6 pairs with the documented labels and
weights, counted in the per-kind ledger, kept together by the held-out split."""

from __future__ import annotations

import json

import pytest

from feedback import ranking
from feedback.export import comparison_pairs as export_pairs
from retrain.data import KINDS, LabelConfig, Ledger, _split_flags, comparison_pairs

SYS = {"role": "system", "content": "You are a helpful AI assistant."}
PROMPT = [SYS, {"role": "user", "content": "Rank these"}]


def ranking_row(order: str, texts: dict[str, str] | None = None, rid: str = "r1", context=None) -> dict:
    texts = texts or {"A": "answer A", "B": "answer B", "C": "answer C", "D": "answer D"}
    return {"id": rid, "session_id": "s1", "conversation_id": "c1", "turn": 1,
            "context": json.dumps(PROMPT if context is None else context), "verdict": "rank", "source": "regenerate",
            "a_text": texts["A"], "b_text": texts["B"], "created_at": "2026-01-01T00:00:00.000",
            "decided_at": "2026-01-01T00:00:01.000",
            "extra_answers": json.dumps([{"label": k, "generation_id": f"g{k}", "text": texts[k]} for k in "CD"]),
            "ranking": json.dumps(ranking.parse_order(order, "ABCD"))}


def test_orders_parse_format_and_refuse():
    assert ranking.parse_order("C>A>D>B", "ABCD") == [["C"], ["A"], ["D"], ["B"]]
    assert ranking.parse_order(" c > a = d > b ", "ABCD") == [["C"], ["A", "D"], ["B"]]
    assert ranking.parse_order(["C", "D=A", "B"], "ABCD") == [["C"], ["A", "D"], ["B"]]  # a tier in label order
    assert ranking.format_order([["C"], ["A", "D"], ["B"]]) == "C>A=D>B"
    assert ranking.from_ranks({"A": 2, "B": 4, "C": 1, "D": 2}) == [["C"], ["A", "D"], ["B"]]
    assert ranking.from_ranks({"A": 1, "B": 3, "C": 3, "D": 4}) == [["A"], ["B", "C"], ["D"]]
    assert ranking.best([["C", "A"], ["B", "D"]]) == "A" and ranking.best([["D", "C"], ["A", "B"]]) == "C"
    for bad in ("A>B>C", "A>B>C>D>A", "A>B>C>E", "A>B>>C>D", "", "  ", None, 3, ["A", None], "=A>B>C>D"):
        with pytest.raises(ranking.InvalidOrder):
            ranking.parse_order(bad, "ABCD")
    assert ranking.loads("not json") is None and ranking.loads('[["A"], []]') is None
    assert ranking.loads('[["A", "B"]]') == [["A", "B"]]


def test_a_ranking_of_four_is_its_six_pairs():
    assert len(ranking.pairs([["A"], ["B"], ["C"], ["D"]])) == 6
    assert ranking.pairs([["C"], ["A", "D"], ["B"]]) == [
        ("C", "A", 1.0), ("C", "D", 1.0), ("C", "B", 1.0), ("A", "D", 0.5), ("A", "B", 1.0), ("D", "B", 1.0)]
    assert ranking.pairs([["A", "B", "C", "D"]]) == [
        ("A", "B", 0.5), ("A", "C", 0.5), ("A", "D", 0.5), ("B", "C", 0.5), ("B", "D", 0.5), ("C", "D", 0.5)]


def test_the_retrain_reads_a_ranking_as_its_six_weighted_pairs_and_the_ledger_counts_it():
    labels = LabelConfig(rank_weight=1.5, tie_weight=0.8)
    ledger = Ledger()
    stats: dict = {}
    pairs, points, used = comparison_pairs([ranking_row("C>A=D>B")], ledger, labels, stats)
    w = 1.5 / 3  # rank_weight / (K - 1): every answer is in K - 1 = 3 pairs
    got = [(p.id, p.chosen, p.rejected, p.label, p.weight, p.source) for p in pairs]
    assert got == [("r1:C>A", "answer C", "answer A", 1.0, w, "rank"),
                   ("r1:C>D", "answer C", "answer D", 1.0, w, "rank"),
                   ("r1:C>B", "answer C", "answer B", 1.0, w, "rank"),
                   ("r1:A=D", "answer A", "answer D", 0.5, w * 0.8, "rank"),
                   ("r1:A>B", "answer A", "answer B", 1.0, w, "rank"),
                   ("r1:D>B", "answer D", "answer B", 1.0, w, "rank")]
    assert sum(p.weight for p in pairs if p.decisive) == pytest.approx(5 * w)  # a strict order: 6 w = K / 2 votes
    assert points == [] and used == ["r1"]
    assert all(p.prompt == PROMPT and p.fold == pairs[0].fold and p.at == "2026-01-01T00:00:01.000" for p in pairs)
    assert "rank" in KINDS
    assert ledger.as_dict()["rank"] == {"seen": 1, "used": 1, "dropped": {}}
    assert stats == {"rank_pairs": 6, "rank_pairs_skipped": 0}
    assert LabelConfig().rank_weight == 1.0


def test_identical_answers_are_skipped_and_nothing_is_dropped_silently():
    ledger, stats = Ledger(), {}
    same = {"A": "same", "B": "same", "C": "other", "D": " "}
    rows = [ranking_row("A>B>C>D", same, "r1"),  # A and B identical: that pair teaches nothing
            ranking_row("A>B>C>D", {k: "x" for k in "ABCD"}, "r2"),  # nothing to learn at all
            {**ranking_row("A>B>C>D", rid="r3"), "ranking": "[broken"},
            ranking_row("A>B>C>D", rid="r4", context=[SYS])]  # no user message
    pairs, _, used = comparison_pairs(rows, ledger, LabelConfig(), stats)
    # an empty answer ranked below a real one is a pair, as an empty answer B of a vote is
    assert [p.id for p in pairs] == ["r1:A>C", "r1:A>D", "r1:B>C", "r1:B>D", "r1:C>D"]
    assert used == ["r1"] and stats == {"rank_pairs": 5, "rank_pairs_skipped": 1 + 6}
    row = ledger.as_dict()["rank"]
    assert row == {"seen": 4, "used": 1, "dropped": {"all answers identical or empty": 1, "the ranking is malformed": 1,
                                                      "context does not end with a user message": 1}}
    assert row["seen"] == row["used"] + sum(row["dropped"].values())


def test_the_held_out_split_keeps_a_rankings_pairs_together():
    items = [("s", f"2026-01-01T00:00:0{i}") for i in range(4)] + [("s", "2026-01-01T00:00:09")] * 6
    groups = [None] * 4 + ["r1"] * 6
    flags, cut = _split_flags(items, 0.2, "time")  # 2 of 10: the cut falls inside the ranking
    assert flags == [False] * 8 + [True] * 2
    flags, cut = _split_flags(items, 0.2, "time", groups=groups)
    assert flags == [False] * 4 + [True] * 6 and cut == "2026-01-01T00:00:09"
    flags, _ = _split_flags(items, 0.2, "time", groups=[None] * 10)
    assert flags == [False] * 8 + [True] * 2  # without groups it stays exact


def test_the_trl_export_takes_a_rankings_decisive_pairs():
    row = ranking_row("C>A=D>B")
    assert export_pairs(row) == [("answer C", "answer A"), ("answer C", "answer D"), ("answer C", "answer B"),
                                 ("answer A", "answer B"), ("answer D", "answer B")]
    assert export_pairs({**row, "verdict": "b"}) == [("answer B", "answer A")]
    assert export_pairs({**row, "verdict": "tie"}) == []
