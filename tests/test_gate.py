"""The gate: degeneracy measures by hand and a degenerate candidate rejected with reasons."""

from __future__ import annotations

import pytest

from retrain.gate import GateConfig, _summary, evaluate, repetition
from retrain.reward import RewardConfig, RewardReport, train_reward_model


def test_degeneracy_measures():
    assert repetition("a b c d a b c d") == pytest.approx(1 - 4 / 5)
    assert repetition("one two") == 0.0
    s = _summary(["x", "x", "", "y"], [1, 1, 0, 3], [True, True, True, False])
    assert s["empty_rate"] == 0.25 and s["eos_rate"] == 0.75 and s["duplicate_rate"] == 0.5
    assert s["mean_tokens"] == pytest.approx(1.25)


@pytest.mark.timeout(300)
def test_gate_rejects_degenerate_candidate(tiny_model_dir, tmp_path):
    from tests.test_reward import _separable

    rep = train_reward_model(str(tiny_model_dir), _separable(4), _separable(2, 10), str(tmp_path / "rm"),
                             RewardConfig(train_layers=1, epochs=1, batch_size=4))
    good = RewardReport(path=rep.path, accuracy=0.9, ci_low=0.7, ci_high=0.97, margin=1.0, norm_mean=0.0,
                        norm_std=1.0, n_train=4, n_heldout=30)
    prompts = [p.prompt for p in _separable(4, 20)]
    # the random tiny model never ends its answers: a degenerate candidate
    cfg = GateConfig(max_new_tokens=6, max_prompts=4)
    report = evaluate(str(tiny_model_dir), str(tiny_model_dir), str(tiny_model_dir), rep.path, prompts, good, cfg)
    assert not report.passed
    assert any("degenerate" in r and "end" in r for r in report.reasons)
    assert any("wins" in r for r in report.reasons)  # identical to the served model: no win
    for key in ("kl_candidate_sft", "candidate_eos_rate", "rm_win_rate", "served_mean_tokens"):
        assert key in report.metrics
    bad_rm = RewardReport(path=rep.path, accuracy=0.55, ci_low=0.4, ci_high=0.7, margin=0.1, norm_mean=0.0,
                          norm_std=1.0, n_train=4, n_heldout=30)
    report = evaluate(str(tiny_model_dir), str(tiny_model_dir), str(tiny_model_dir), rep.path, prompts, bad_rm, cfg)
    assert any("reward model held-out accuracy" in r for r in report.reasons)
    assert any("CI lower bound" in r for r in report.reasons)
