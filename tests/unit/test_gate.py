"""The gate: degeneracy measures by hand, checks relative to the served model, decisions on
the interval's lower bound, and a degenerate candidate rejected with reasons."""

from __future__ import annotations

import pytest
import torch

from assistant import models
from retrain.gate import Checks, GateConfig, _summary, check_reward_models, evaluate, expected_win_rate, repetition
from retrain.reward import RewardConfig, new_reward_model, train_reward_model
from tests.factories import separable_pairs

SAMPLING = dict(temperature=0.7, top_p=0.9)


def test_degeneracy_measures():
    assert repetition("a b c d a b c d") == pytest.approx(1 - 4 / 5)
    assert repetition("one two") == 0.0
    s = _summary(["x", "x", "", "y"], [1, 1, 0, 3], [True, True, True, False])
    assert s["empty_rate"] == 0.25 and s["eos_rate"] == 0.75 and s["duplicate_rate"] == 0.5
    assert s["mean_tokens"] == pytest.approx(1.25)


def test_reward_model_checks_use_the_interval():
    cfg = GateConfig()
    checks = Checks()
    check_reward_models(checks, {"accuracy": 0.7, "ci_low": 0.45, "n": 20}, cfg, None)
    assert [r["name"] for r in checks.rows if not r["passed"]] == ["rm_ci_low"]  # 0.7 alone is not evidence
    checks = Checks()
    check_reward_models(checks, {"accuracy": 0.8, "ci_low": 0.62, "n": 60}, cfg, previous_accuracy=0.9)
    assert [r["name"] for r in checks.rows if not r["passed"]] == ["rm_accuracy_vs_previous"]
    assert all({"value", "threshold", "op"} <= set(r) for r in checks.rows)


def test_the_judge_win_rate_is_its_expected_one_with_a_t_bound():
    # a judge that learned nothing (margins near 0, either sign) says about 0.5: no pass
    mean, lo, hi = expected_win_rate(torch.tensor([0.01, -0.01, 0.03, -0.02] * 15), 1.645)
    assert mean == pytest.approx(0.5, abs=0.01) and lo < 0.5 < hi
    # the same signs from a confident judge: 60 of 60 prompts at p = sigmoid(2)
    mean, lo, hi = expected_win_rate(torch.full((60,), 2.0), 1.645)
    assert mean == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item()) and lo == pytest.approx(mean)
    # the bound: t at n - 1 degrees of freedom is wider than the normal one (t_{0.95, 9} = 1.833)
    margins = torch.tensor([1.5, -0.5, 1.0, 0.2, 2.0, -1.0, 0.8, 0.3, 1.2, 0.1])
    p = torch.sigmoid(margins.double())
    mean, lo, _ = expected_win_rate(margins, 1.645)
    assert mean - lo == pytest.approx(1.833 * float(p.std()) / 10 ** 0.5, rel=0.01)
    assert expected_win_rate(torch.tensor([3.0]), 1.645)[1:] == (0.0, 1.0)  # one prompt: no evidence


@pytest.mark.timeout(300)
def test_gate_rejects_degenerate_candidate(tiny_model_dir):

    rcfg = RewardConfig(train_layers=1, epochs=1, batch_size=4)
    judge = new_reward_model(str(tiny_model_dir), rcfg, None, "cpu")
    train_reward_model(judge, separable_pairs(4), [], rcfg)
    good = {"accuracy": 0.9, "ci_low": 0.7, "ci_high": 0.97, "n": 30}
    prompts = [p.prompt for p in separable_pairs(4, 20)]
    tiny = models.load(str(tiny_model_dir), tiny_model_dir.parent, device="cpu")
    # the random tiny model never ends its answers; against a served model that does end them
    # this is degenerate, against itself it is not (checks are relative to the served model)
    cfg = GateConfig(max_new_tokens=6, max_prompts=4, **SAMPLING)
    report = evaluate(tiny, tiny, tiny, judge, prompts, good, cfg)
    assert not report.passed
    assert not any("degenerate" in r for r in report.reasons)  # no worse than what is served
    assert any("judge" in r and "lower bound" in r for r in report.reasons)  # identical: no evidence of a win
    for key in ("kl_candidate_sft", "candidate_eos_rate", "judge_win_rate", "served_mean_tokens", "candidate_entropy"):
        assert key in report.metrics
    assert report.metrics["kl_candidate_sft"] == pytest.approx(0.0, abs=1e-4)
    assert {c["name"] for c in report.checks} >= {"kl_candidate_sft", "eos_rate", "entropy", "judge_win_ci_low"}
    strict = GateConfig(max_new_tokens=6, max_prompts=4, max_eos_drop=-0.5, **SAMPLING)  # demands 50% more endings
    report = evaluate(tiny, tiny, tiny, judge, prompts, good, strict)
    assert any("degenerate" in r and "end within" in r for r in report.reasons)
    bad_rm = {"accuracy": 0.55, "ci_low": 0.4, "ci_high": 0.7, "n": 30}
    report = evaluate(tiny, tiny, tiny, judge, prompts, bad_rm, cfg)
    assert any("reward model accuracy" in r for r in report.reasons)
    assert any("CI lower bound" in r for r in report.reasons)
    with pytest.raises(ValueError, match="must be set"):
        evaluate(tiny, tiny, tiny, judge, prompts, good, GateConfig())
