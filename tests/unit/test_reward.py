"""Reward model: hand-computed tie-aware Bradley-Terry and unpaired losses, the Wilson
interval, padding invariance, and tiny-model training on a trivially separable preference
from pairs, ties and unpaired labels."""

from __future__ import annotations

import json
import math

import pytest
import torch

from retrain.backbone import attention_bias, frozen_dtype, native_bf16, pad_left, positions_from_mask
from retrain.data import Pair, Point
from retrain.reward import (
    RewardConfig,
    RewardModel,
    accuracy_of,
    bradley_terry_loss,
    new_reward_model,
    normalize,
    pair_margins,
    pointwise_loss,
    preference_loss,
    train_reward_model,
    wilson,
)
from tests.factories import separable_pairs

SYS = {"role": "system", "content": "You are a helpful AI assistant."}


def test_bradley_terry_loss_by_hand():
    # -log sigmoid(2) = log(1 + e^-2) = 0.126928; -log sigmoid(0) = log 2 = 0.693147
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert float(loss) == pytest.approx((0.126928 + 0.693147) / 2, abs=1e-5)
    # a margin shifts the difference: -log sigmoid(2 - 1) = 0.313262
    assert float(bradley_terry_loss(torch.tensor([2.0]), torch.tensor([0.0]), margin=1.0)) == pytest.approx(
        0.313262, abs=1e-5)


def test_tie_aware_loss_by_hand():
    c, r = torch.tensor([2.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 0.0])
    # a tie (label 0.5) at d = 2: 0.5 * (-log sigmoid(2)) + 0.5 * (-log sigmoid(-2))
    #   = 0.5 * 0.126928 + 0.5 * 2.126928 = 1.126928; at d = 0 it is log 2 = 0.693147 (its minimum)
    per = [0.126928, 0.693147, 1.126928]  # preferred d=2, tie d=0, tie d=2
    label = torch.tensor([1.0, 0.5, 0.5])
    assert float(preference_loss(c, r, label)) == pytest.approx(sum(per) / 3, abs=1e-5)
    # weights: (1 * 0.126928 + 3 * 1.126928) / 4 (the tie at d=0 weighs 0)
    w = torch.tensor([1.0, 0.0, 3.0])
    assert float(preference_loss(c, r, label, w)) == pytest.approx((0.126928 + 3 * 1.126928) / 4, abs=1e-5)
    # label 1 is plain Bradley-Terry; the margin applies to decisive pairs only
    assert float(preference_loss(c[:1], r[:1], torch.tensor([1.0]), margin=1.0)) == pytest.approx(0.313262, abs=1e-5)
    assert float(preference_loss(c[1:2], r[1:2], torch.tensor([0.5]), margin=1.0)) == pytest.approx(0.693147,
                                                                                                    abs=1e-5)
    # a tie pulls both ways equally: zero gradient at d = 0, towards 0 elsewhere
    d = torch.tensor([1.5], requires_grad=True)
    preference_loss(d, torch.zeros(1), torch.tensor([0.5])).backward()
    assert float(d.grad) == pytest.approx(float(torch.sigmoid(torch.tensor(1.5))) - 0.5, abs=1e-6)


def test_pointwise_loss_by_hand():
    # good answer scored 2: -log sigmoid(2) = 0.126928; bad answer scored 2: -log sigmoid(-2) = 2.126928
    s = torch.tensor([2.0, 2.0])
    assert float(pointwise_loss(s, torch.tensor([1.0, 0.0]))) == pytest.approx((0.126928 + 2.126928) / 2, abs=1e-5)
    assert float(pointwise_loss(s, torch.tensor([1.0, 0.0]), torch.tensor([3.0, 1.0]))) == pytest.approx(
        (3 * 0.126928 + 2.126928) / 4, abs=1e-5)


def test_accuracy_counts_decisive_pairs_and_tie_gap():
    pairs = [Pair(str(i), "s", "t", [], "c", "r", "x", label) for i, label in enumerate([1, 1, 1, 0.5, 0.5])]
    out = accuracy_of(torch.tensor([1.0, -2.0, 0.0, 0.5, -1.5]), pairs)
    assert out["n"] == 3 and out["accuracy"] == pytest.approx(1.5 / 3)  # a zero margin counts half
    assert out["tie_gap"] == pytest.approx(1.0) and out["n_ties"] == 2


def test_wilson_by_hand():
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    # z = 1.645 (one-sided 95%): den 1.2706, centre 0.9353 / den = 0.7361,
    # half 1.645 * sqrt(0.016 + 0.006765) / den = 0.1953 -> 0.5408
    lo, _ = wilson(8, 10, z=1.645)
    assert lo == pytest.approx(0.5408, abs=1e-3)


def test_left_padding_positions_and_mask():
    ids, mask = pad_left([[5, 6, 7], [1, 2, 3, 4, 5]], pad_id=0)
    assert ids.tolist() == [[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]]
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    bias = attention_bias(mask, torch.float32)[0, 0]  # row 0: pads at 0, 1
    allowed = (bias == 0).int().tolist()
    assert allowed[2] == [0, 0, 1, 0, 0]  # first real token sees only itself
    assert allowed[4] == [0, 0, 1, 1, 1]
    assert allowed[0] == [1, 0, 0, 0, 0]  # a pad query sees itself only (no empty softmax row)


def _ties(n, offset=0):
    """Tied pairs whose answers differ only in length: the evidence that length does not matter."""
    return [Pair(f"t{i + offset}", f"s{i % 3}", f"2024-01-02T00:00:{i:02d}",
                 [SYS, {"role": "user", "content": f"Say something about item {i + offset}."}],
                 "Sure.", "Sure. Sure. Sure. Sure. Sure. Sure.", "tie", 0.5) for i in range(n)]


@pytest.mark.timeout(300)
def test_reward_model_learns_separable_preference(tiny_model_dir, tmp_path):
    cfg = RewardConfig(train_layers=2, lr=2e-3, head_lr=5e-3, epochs=2, batch_size=4)
    train, held = separable_pairs(16), separable_pairs(6, offset=100)
    points = [Point(f"q{i}", "s", "t", p.prompt, p.rejected, 0.0, "thumb_down") for i, p in enumerate(train[:4])]
    ref = [(p.prompt, p.chosen) for p in train[:4]] + [(p.prompt, p.rejected) for p in train[:4]]
    logged = []
    rm = new_reward_model(str(tiny_model_dir), cfg, None, "cpu")
    cache = rm.cache()
    rep = train_reward_model(rm, train + _ties(4), points, cfg, cache=cache,
                             log=lambda phase, step, m: logged.append((phase, step, m)))
    assert rep.n_pairs == 20 and rep.n_ties == 4 and rep.n_points == 4
    assert rep.losses[0] > 0.3 and sum(rep.losses[-2:]) / 2 < rep.losses[0] - 0.2, rep.losses
    normalize(rm, ref, cache)
    ev = accuracy_of(pair_margins(rm, held, cache), held)
    assert ev["accuracy"] == 1.0 and ev["ci_low"] > 0.5 and ev["margin"] > 0
    assert any(p == "rm" for p, _, _ in logged)
    rm.save(str(tmp_path / "rm"))
    rm = RewardModel.load(str(tmp_path / "rm"))
    s = rm.score([p for p, _ in ref], [r for _, r in ref])
    assert float(s.mean()) == pytest.approx(0.0, abs=1e-3)  # normalised on the reference samples
    assert float(s.std()) == pytest.approx(1.0, abs=1e-3)
    # left padding does not change a score: alone vs batched with a longer sequence
    alone = rm.score([held[0].prompt], [held[0].chosen])
    batched = rm.score([held[0].prompt, held[1].prompt], [held[0].chosen, held[1].rejected])
    assert float(alone[0]) == pytest.approx(float(batched[0]), abs=1e-4)
    # warm start from the previous RM keeps what it learned
    cfg2 = RewardConfig(train_layers=2, epochs=1, batch_size=4, lr=1e-6, head_lr=1e-6)
    rm2 = new_reward_model(str(tiny_model_dir), cfg2, str(tmp_path / "rm"), "cpu")
    train_reward_model(rm2, train[:4], [], cfg2)
    ev2 = accuracy_of(pair_margins(rm2, held, rm2.cache()), held)
    assert ev2["accuracy"] == 1.0 and not math.isnan(ev2["margin"])
    # the critic copy starts in normalised units and is trainable; the RM itself stays frozen
    value = rm.as_value_model()
    assert value.parameters() and not rm.parameters()
    low = rm.lower(*pad_left([rm.encode(held[0].prompt, held[0].chosen)], rm.tokenizer.pad_token_id))
    assert float(value.values(low, normalized=False)[0, -1]) == pytest.approx(float(rm.values(low)[0, -1]), abs=1e-4)


@pytest.mark.timeout(300)
def test_ties_teach_that_length_does_not_matter(tiny_model_dir):
    """Only ties between a short and a long answer: the RM learns to score them alike."""
    cfg = RewardConfig(train_layers=2, lr=2e-3, head_lr=5e-3, epochs=3, batch_size=4)
    ties = _ties(16)
    rm = new_reward_model(str(tiny_model_dir), cfg, None, "cpu")
    cache = rm.cache()
    before = pair_margins(rm, ties, cache).abs().mean()
    train_reward_model(rm, ties, [], cfg, cache=cache)
    after = pair_margins(rm, ties, cache).abs().mean()
    assert float(after) < 0.5 * float(before), (float(before), float(after))


def test_frozen_precision_is_detected_and_kept_with_the_model(tiny_model_dir, tmp_path):
    """bf16 for the frozen layers only where the device computes it natively; a model keeps
    the precision it was trained with, and scores (``score``) as its training cache did."""
    cpu = torch.device("cpu")
    assert frozen_dtype("auto", cpu) == (torch.bfloat16 if native_bf16(cpu) else torch.float32)
    assert frozen_dtype("float32", cpu) == torch.float32 and frozen_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="auto, float32 or bfloat16"):
        frozen_dtype("fp8", cpu)
    pairs = separable_pairs(4)
    seqs = lambda rm: [rm.encode(p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)]  # noqa: E731
    states = {}
    for name in ("float32", "bfloat16"):
        rm = new_reward_model(str(tiny_model_dir), RewardConfig(train_layers=1, frozen_dtype=name), None, "cpu")
        assert rm.frozen_dtype == frozen_dtype(name, cpu) and rm.split == 1  # one frozen layer of two
        states[name] = rm.cache().get(rm.model, seqs(rm))
        assert all(h.dtype == torch.float32 for h in states[name])  # stored in fp32 either way
    fp32, bf16 = torch.cat(states["float32"]), torch.cat(states["bfloat16"])
    rel = float((bf16 - fp32).norm() / fp32.norm())
    assert 0 < rel < 0.05, rel  # computed in bf16 (not fp32), and close to it
    rm.save(str(tmp_path / "rm"))
    assert json.loads((tmp_path / "rm" / "reward_config.json").read_text())["frozen_dtype"] == "bfloat16"
    loaded = RewardModel.load(str(tmp_path / "rm"))
    assert loaded.frozen_dtype == torch.bfloat16
    cached = loaded.scores_of(loaded.cache().get(loaded.model, seqs(loaded)))
    scored = loaded.score([p.prompt for p in pairs for _ in range(2)],
                          [a for p in pairs for a in (p.chosen, p.rejected)], normalized=False)
    assert torch.allclose(cached, scored, atol=2e-2), (cached, scored)
