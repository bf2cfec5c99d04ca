"""Reward model: hand-computed Bradley-Terry loss and Wilson interval, padding invariance,
and a tiny-model training run on a trivially separable preference."""

from __future__ import annotations

import math

import pytest
import torch

from retrain.data import Pair
from retrain.reward import (
    RewardConfig,
    RewardModel,
    attention_bias,
    bradley_terry_loss,
    pad_left,
    positions_from_mask,
    train_reward_model,
    wilson,
)

SYS = {"role": "system", "content": "You are a helpful AI assistant."}


def test_bradley_terry_loss_by_hand():
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert float(loss) == pytest.approx((0.126928 + 0.693147) / 2, abs=1e-5)
    # a margin shifts the difference: -log sigmoid(2 - 1) = 0.313262
    assert float(bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=1.0)) == pytest.approx(
        0.313262, abs=1e-5)


def test_wilson_by_hand():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)


def test_left_padding_positions_and_mask():
    ids, mask = pad_left([[5, 6, 7], [1, 2, 3, 4, 5]], pad_id=0)
    assert ids.tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]]
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    bias = attention_bias(mask, torch.float32)[0, 0]  # row 0: pads at 0, 1
    allowed = (bias == 0).int().tolist()
    assert allowed[2] == [0, 0, 1, 0, 0]  # first real token sees only itself
    assert allowed[4] == [0, 0, 1, 1, 1]
    assert allowed[0] == [1, 0, 0, 0, 0]  # a pad query sees itself only (no empty softmax row)


def _separable(n, offset=0):
    out = []
    for i in range(n):
        prompt = [SYS, {"role": "user", "content": f"Tell me about thing {i + offset}."}]
        out.append(Pair(f"p{i + offset}", f"s{i % 3}", f"2024-01-01T00:00:{i:02d}", prompt,
                        "Sure.", "No no no no no no no no no no no no.", "regenerate"))
    return out


@pytest.mark.timeout(300)
def test_reward_model_learns_separable_preference(tiny_model_dir, tmp_path):
    cfg = RewardConfig(train_layers=2, lr=2e-3, head_lr=5e-3, epochs=2, batch_size=4)
    train, held = _separable(16), _separable(6, offset=100)
    ref = [(p.prompt, p.chosen) for p in train[:4]] + [(p.prompt, p.rejected) for p in train[:4]]
    logged = []
    rep = train_reward_model(str(tiny_model_dir), train, held, str(tmp_path / "rm"), cfg, ref_samples=ref,
                             log=lambda phase, step, m: logged.append((phase, step, m)))
    assert rep.losses[0] > 0.3 and sum(rep.losses[-2:]) / 2 < rep.losses[0] - 0.2, rep.losses
    assert rep.accuracy == 1.0 and rep.ci_low > 0.5 and rep.margin > 0
    assert any(p == "reward" for p, _, _ in logged)
    rm = RewardModel.load(str(tmp_path / "rm"))
    s = rm.score([p for p, _ in ref], [r for _, r in ref])
    assert float(s.mean()) == pytest.approx(0.0, abs=1e-3)  # normalised on the reference samples
    assert float(s.std()) == pytest.approx(1.0, abs=1e-3)
    # left padding does not change a score: alone vs batched with a longer sequence
    alone = rm.score([held[0].prompt], [held[0].chosen])
    batched = rm.score([held[0].prompt, held[1].prompt], [held[0].chosen, held[1].rejected])
    assert float(alone[0]) == pytest.approx(float(batched[0]), abs=1e-4)
    # warm start from the previous RM keeps what it learned
    rep2 = train_reward_model(str(tiny_model_dir), train[:4], held, str(tmp_path / "rm2"),
                              RewardConfig(train_layers=2, epochs=1, batch_size=4, lr=1e-6, head_lr=1e-6),
                              init_from=str(tmp_path / "rm"))
    assert rep2.accuracy == 1.0 and not math.isnan(rep2.margin)
