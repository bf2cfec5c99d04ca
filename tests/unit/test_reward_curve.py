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


def test_a_logged_pool_keeps_the_pairs_both_of_whose_answers_came_from_sft(tmp_path):
    from benchmarks.reward_pool import logged_pool
    from feedback.store import FeedbackStore
    from tests.factories import seed_votes

    for name in ("run1", "run2"):
        (tmp_path / name).mkdir()
        store = FeedbackStore(tmp_path / name / "feedback.sqlite")
        seed_votes(store, 3)  # the same three pairs in both runs: kept once
    store = FeedbackStore(tmp_path / "run2" / "feedback.sqlite")
    conv = store.start_conversation("s", "sys")
    common = dict(session_id="s", conversation_id=conv, turn=1, context=PROMPT, sampling={}, prompt_tokens=5,
                  completion_tokens=5, ttft_ms=1.0, latency_ms=2.0, finish_reason="stop")
    a = store.record_generation(content=PROSE, model_version="sft", **common)
    b = store.record_generation(content=LIST, model_version="v-candidate", **common)
    store.open_comparison(session_id="s", conversation_id=conv, turn=1, a_generation_id=a, b_generation_id=b)

    path = logged_pool([str(tmp_path / "run1"), str(tmp_path / "run2")], tmp_path / "bench")
    rows = load_pool(path)
    assert len(rows) == 3 and path.parent == tmp_path / "bench" / "reward_pool"
    assert all(r["a"].startswith("Well, let me think") and r["prompt"][-1]["role"] == "user" for r in rows)
    assert logged_pool([str(tmp_path / "run2"), str(tmp_path / "run1")], tmp_path / "bench") == path
    with pytest.raises(ValueError, match="no answer pairs"):
        logged_pool([str(tmp_path / "run1")], tmp_path / "bench", version="v-candidate")


def test_the_length_axis_rows_and_the_count_features():
    import torch

    from benchmarks.reward_curve import features_of, halves, with_counts

    long = "One. Two. Three. Four. Five."
    rows = [{"prompt": PROMPT, "a": long, "b": PROSE}, {"prompt": PROMPT, "a": PROSE, "b": long}]
    assert halves(rows) == [{"prompt": PROMPT, "a": long, "b": "One. Two.", "src": 0},
                            {"prompt": PROMPT, "a": long, "b": "One. Two.", "src": 1}]
    n, layers, hidden = 3, 4, 2
    bank = {"means": torch.randn(n, layers, hidden), "lasts": torch.zeros(n, layers, hidden),
            "length": torch.log1p(torch.tensor([0.0, 3.0, 15.0])), "prompt_means": torch.randn(n, layers, hidden)}
    counted, spec = with_counts(bank, FeatureSpec(layers=(2, 4), prompt=True))
    assert spec.layers == (2, 4, 6, 8)
    x = features_of(counted, spec)
    assert x.shape == (n, 4 * hidden + 1 + 4 * hidden)
    scale = torch.tensor([1.0, 3.0 ** 0.5, 15.0 ** 0.5])[:, None]  # sqrt(tokens), at least 1
    assert torch.allclose(x[:, 2 * hidden:3 * hidden], bank["means"][:, 1] * scale)
    assert torch.allclose(x[:, -hidden:], bank["prompt_means"][:, 3])  # the prompt, unscaled
    d = parse_design("linear-ens5+count-noprompt", FeatureSpec())
    assert d.count and d.prompt == "off"
