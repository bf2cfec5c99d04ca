"""benchmarks/reward_pool.py and reward_curve.py: the reward model's inner loop."""

from __future__ import annotations

import pytest

from benchmarks import oracles
from benchmarks.leakcheck import check_disjoint
from benchmarks.reward_curve import label, outer_fold, parse_design
from benchmarks.reward_pool import build_pool, load_pool
from retrain.features import FeatureSpec

PROMPT = [{"role": "user", "content": "How do I make tea?"}]
PROSE = "Boil water, pour it over the leaves and wait three minutes."
LIST = "Steps:\n1. Boil water.\n2. Pour it over the leaves.\n3. Wait three minutes."


def test_label_names_the_chosen_answer_and_keeps_ties():
    rows = [{"prompt": PROMPT, "a": PROSE, "b": LIST}, {"prompt": PROMPT, "a": LIST, "b": PROSE},
            {"prompt": PROMPT, "a": PROSE, "b": PROSE + " Enjoy."}]
    assert label(rows, oracles.get("lists")) == [(0, 1, 1.0), (1, 0, 1.0), (2, 0, 0.5)]
    assert label(rows, oracles.get("no_lists")) == [(0, 0, 1.0), (1, 1, 1.0), (2, 0, 0.5)]
    assert len({outer_fold(r, 5) for r in rows}) == 1  # one prompt, one fold


def test_designs_parse():
    d = parse_design("linear-ens5@8/16+last", FeatureSpec())
    assert (d.kind, d.ensemble, d.prompt) == ("linear", 5, "auto")
    assert d.spec == FeatureSpec(layers=(8, 16), last=True, length=True, prompt=True)
    off = parse_design("mlp-noprompt", FeatureSpec())
    assert off.spec == FeatureSpec() and off.prompt == "off"
    assert parse_design("linear+prompt", FeatureSpec(), "off").prompt == "on"
    assert parse_design("linear", FeatureSpec(), "off").spec == FeatureSpec(prompt=False)
    assert parse_design("lora", FeatureSpec()).kind == "lora"
    with pytest.raises(ValueError, match="design"):
        parse_design("forest", FeatureSpec())


def test_the_pool_is_seeded_and_disjoint_from_the_heldout_prompts(tmp_path, tiny_model_dir):
    from assistant.settings import Settings

    settings = Settings(data_dir=str(tmp_path), model=str(tiny_model_dir), backend="torch", max_new_tokens=6,
                        max_batch=4)
    prompts = ["What is the capital of France?", "Why is the sky blue?", "Write a haiku about autumn."]
    first = build_pool(settings, prompts, 5, seed=0, heldout=["How do ants find their way home?"],
                       progress=False)
    rows = load_pool(first)
    again = load_pool(build_pool(settings, prompts, 5, seed=0, heldout=[], rebuild=True, progress=False))
    other = load_pool(build_pool(settings, prompts, 5, seed=1, heldout=[], progress=False))
    assert len(rows) == 5 and [r["prompt"][-1]["content"] for r in rows[:3]] == prompts
    assert [(r["a"], r["b"]) for r in rows] == [(r["a"], r["b"]) for r in again]  # same seed, same pairs
    assert [(r["a"], r["b"]) for r in rows] != [(r["a"], r["b"]) for r in other]
    with pytest.raises(ValueError, match="leak"):
        check_disjoint(["Why is the sky blue?"], prompts)
    with pytest.raises(ValueError, match="near-paraphrase"):
        check_disjoint(["Explain why the sky is blue."], prompts)
