"""The disagreement queue's scores (``retrain.job.label_scores``), by hand."""

from __future__ import annotations

import pytest

from retrain.data import Pair, Point
from retrain.job import label_scores, record_of

PROMPT = [{"role": "user", "content": "hi"}]


def pair(pid, source, label=1.0):
    return Pair(pid, "s", "2026-11-22T10:00:00+00:00", PROMPT, "chosen", "rejected", source, label)


def point(pid, source, label):
    return Point(pid, "s", "2026-11-22T10:00:00+00:00", PROMPT, "answer", label, source)


def test_each_item_names_its_record():
    assert record_of("c1", "regenerate") == "comparison:c1"
    assert record_of("c1:0", "both_bad+edit") == "comparison:c1"
    assert record_of("thumbs:up1:down1", "thumbs") == "rating:down1"
    assert record_of("r1", "thumb_down") == "rating:r1"
    assert record_of("c2:1", "both_bad") == "comparison:c2"


def test_disagreement_is_how_far_the_models_are_from_the_human_strongest_first():
    rows = label_scores(
        [pair("agree", "regenerate"), pair("flip", "regenerate"), pair("tie", "tie", 0.5)], [1.5, -2.0, -0.75],
        [point("good", "thumb_up", 1.0), point("bad", "thumb_down", 0.0)], [-0.5, 1.25])
    got = [(r["item"], r["disagreement"]) for r in rows]
    # decided pair: -margin; tie: |margin|; a good label scoring -0.5: 0.5; a bad one scoring 1.25: 1.25
    assert got == [("flip", 2.0), ("bad", 1.25), ("tie", 0.75), ("good", 0.5), ("agree", -1.5)]
    assert {r["item"]: r["record"] for r in rows}["bad"] == "rating:bad"


def test_lengths_must_match():
    with pytest.raises(ValueError):
        label_scores([pair("a", "regenerate")], [], [], [])
