"""The feature reward model (``retrain.head_rm``, ``retrain.features``) on the tiny model."""

from __future__ import annotations

import random

import pytest
import torch

from retrain.backbone import pad_left
from retrain.data import Pair, Point
from retrain.features import FeatureSpec
from retrain.head_rm import FeatureRewardModel, fit_feature_model
from retrain.reward import RewardConfig, accuracy_of
from tests.factories import SYS

WARM = ["sunny", "bright", "happy", "golden", "cheerful", "sweet"]
COLD = ["gloomy", "grey", "dull", "bleak", "dreary", "damp"]
FILLER = ["the", "day", "walk", "park", "river", "town", "bread", "music", "garden", "window", "road", "tea"]


def taste_pairs(n: int, seed: int, offset: int = 0) -> list[Pair]:
    """A learnable synthetic taste: the answer in warm words beats the one in cold words; both
    share the same random filler, so only the taste words tell them apart."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        filler = rng.sample(FILLER, 5)
        warm = " ".join(filler[:2] + rng.sample(WARM, 2) + filler[2:])
        cold = " ".join(filler[:2] + rng.sample(COLD, 2) + filler[2:])
        prompt = [SYS, {"role": "user", "content": f"Describe scene number {i + offset}."}]
        out.append(Pair(f"p{i + offset}", "s", "t", prompt, warm, cold, "regenerate", 1.0, 1.0, i % 2))
    return out


TOPICS = ["tea", "river", "garden", "bread", "music", "window", "road", "lamp"]


def topic_pairs(n: int, seed: int, offset: int = 0) -> list[Pair]:
    """A taste that is a relation between question and answer: the answer that talks about the
    prompt's topic beats one about another topic.  Every topic word is as often chosen as
    rejected, so the answer alone says nothing."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic, other = rng.sample(TOPICS, 2)
        filler = rng.sample(WARM + COLD, 4)
        prompt = [SYS, {"role": "user", "content": f"Tell me about the {topic}, scene {i + offset}."}]
        good = " ".join(filler[:2] + [topic, topic] + filler[2:])
        bad = " ".join(filler[:2] + [other, other] + filler[2:])
        out.append(Pair(f"t{i + offset}", "s", "t", prompt, good, bad, "regenerate", 1.0, 1.0, i % 2))
    return out


@pytest.fixture(scope="module")
def shared(tiny_model_dir):
    return {}


def fit(tiny_model_dir, shared, pairs, points=(), **changes):
    cfg = RewardConfig(**{"head_lr": 0.01, "head_patience": 30, "head_max_steps": 1500, "ensemble": 3, **changes})
    ref = [(p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)]
    return fit_feature_model(str(tiny_model_dir), pairs, list(points), ref, cfg, None, shared)


@pytest.mark.timeout(300)
def test_learns_a_synthetic_taste_and_stops_before_the_step_limit(tiny_model_dir, shared, tmp_path):
    train, held = taste_pairs(48, seed=0), taste_pairs(40, seed=1, offset=1000)
    logged = []
    cfg = RewardConfig(head_lr=0.01, head_patience=30, head_max_steps=1500, ensemble=3)
    ref = [(p.prompt, a) for p in train for a in (p.chosen, p.rejected)]
    rm, metrics = fit_feature_model(str(tiny_model_dir), train, [], ref, cfg, None, shared,
                                    log=lambda ph, st, m: logged.append((ph, st, m)))
    ev = accuracy_of(rm.pair_margins(held), held)
    assert ev["accuracy"] >= 0.85 and ev["ci_low"] > 0.6, ev
    # early stopping on each member's inner validation fold ended training before the limit
    assert metrics.stopped.split(",") == ["early"] * 3
    assert 0 < metrics.steps < 3 * cfg.head_max_steps
    assert len(metrics.val_curve) == 3 and all(curve for curve in metrics.val_curve)
    assert {ph for ph, _, _ in logged} == {"rm_m0", "rm_m1", "rm_m2"}
    assert all("val_loss" in m and "val_accuracy" in m for _, _, m in logged)
    # normalised on the reference answers; saved and loaded, it scores the same
    s = rm.score([p for p, _ in ref], [a for _, a in ref])
    assert float(s.mean()) == pytest.approx(0.0, abs=1e-4) and float(s.std()) == pytest.approx(1.0, abs=1e-3)
    rm.save(str(tmp_path / "rm"))
    again = FeatureRewardModel.load(str(tmp_path / "rm"))
    assert torch.allclose(again.score([p for p, _ in ref[:6]], [a for _, a in ref[:6]]), s[:6], atol=1e-5)


@pytest.mark.timeout(300)
def test_a_null_taste_stays_at_chance(tiny_model_dir, shared):
    """Labels drawn at random (seeded): nothing to learn, and accuracy on 200 held-out pairs
    stays within its interval of chance."""
    rng = random.Random(3)
    pairs = []
    for p in taste_pairs(48, seed=4) + taste_pairs(200, seed=5, offset=500):
        if rng.random() < 0.5:
            p = Pair(p.id, p.session_id, p.at, p.prompt, p.rejected, p.chosen, p.source, 1.0, 1.0, p.fold)
        pairs.append(p)
    rm, _ = fit(tiny_model_dir, shared, pairs[:48])
    ev = accuracy_of(rm.pair_margins(pairs[48:]), pairs[48:])
    assert ev["ci_low"] < 0.5 < ev["ci_high"], ev


@pytest.mark.timeout(300)
def test_the_critic_starts_as_the_reward_model_and_rollout_features_match(tiny_model_dir, shared):
    """The value of a whole answer is its score, and PPO's rollout features equal the cache's."""
    train = taste_pairs(24, seed=6)
    points = [Point("q0", "s", "t", train[0].prompt, train[0].rejected, 0.0, "thumb_down")]
    rm, _ = fit(tiny_model_dir, shared, train, points, feature_prompt="on")  # the prompt's part too
    assert rm.spec.prompt and rm.heads.expand.interact
    tok = rm.tokenizer
    prompt, answer = train[1].prompt, train[1].chosen
    p_ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    r_ids = tok(answer, add_special_tokens=False)["input_ids"]
    from retrain.backbone import end_of_turn_id

    # a left-padded batch as PPO builds it: prompts padded to P, then the response (+ end-of-turn)
    longer = [SYS, {"role": "user", "content": "Describe scene number two in many more words, with detail."}]
    other = tok.apply_chat_template(longer, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    assert len(other) > len(p_ids)
    ids, pmask = pad_left([list(p_ids), list(other)], tok.pad_token_id)
    P, resp = ids.shape[1], r_ids + [end_of_turn_id(tok)]
    full = torch.cat([ids, torch.tensor([resp, resp])], 1)
    fmask = torch.cat([pmask, torch.ones(2, len(resp), dtype=torch.long)], 1)
    feats = rm.rollout_features(full, fmask, P, len(resp) - 1)
    direct = rm.features([(prompt, answer)])
    assert torch.allclose(feats[0, -1], direct[0], atol=1e-4)
    assert torch.allclose(rm.rollout_scores(feats)[0], rm.score([prompt], [answer])[0], atol=1e-4)
    value = rm.as_value_model()
    assert value.parameters() and all(not p.requires_grad for p in rm.heads.parameters())
    v = value.values(feats)
    assert v.shape == (2, len(resp) - 1) and v.requires_grad
    whole = (value.net(feats[:, -1]) - value.norm_mean) / value.norm_std
    assert torch.allclose(whole, rm.rollout_scores(feats), atol=1e-5)


@pytest.mark.timeout(300)
def test_the_prompt_answer_interaction_learns_a_taste_the_answer_alone_cannot(tiny_model_dir, shared, tmp_path):
    """``reward.feature_prompt``: off, the heads see only the answer and stay near chance on an
    on-topic taste; on, they learn it; auto trains both and keeps the interaction."""
    train, held = topic_pairs(64, seed=7), topic_pairs(60, seed=8, offset=1000)
    acc = {}
    for mode in ("off", "on", "auto"):
        rm, metrics = fit(tiny_model_dir, shared, train, feature_prompt=mode)
        acc[mode] = accuracy_of(rm.pair_margins(held), held)["accuracy"]
        assert metrics.norm["interaction"] == (mode != "off")
    assert acc["on"] >= 0.8 and acc["off"] <= 0.65 and acc["auto"] == acc["on"], acc
    assert set(metrics.norm["selection"]) == {"answer", "interaction"}
    assert metrics.norm["selection"]["interaction"] < metrics.norm["selection"]["answer"]
    rm.save(str(tmp_path / "rm"))  # the interaction's centres travel with the heads
    again = FeatureRewardModel.load(str(tmp_path / "rm"))
    items = [(p.prompt, p.chosen) for p in held[:6]]
    # a saved and reloaded model scores alike (up to float reordering in batched matmuls)
    assert torch.allclose(again.score(*map(list, zip(*items))), rm.score(*map(list, zip(*items))), atol=5e-3)


def test_feature_spec_is_clipped_to_the_model_and_kept():
    spec = FeatureSpec(layers=(24, 8, 16, 99), last=True).clipped(30)
    assert spec.layers == (8, 16, 24, 30)
    assert FeatureSpec.from_dict(spec.as_dict()) == spec
    assert spec.dim(576) == 576 * 5 + 1
    with_prompt = FeatureSpec(layers=(8, 16), prompt=True)
    assert with_prompt.dim(576) == 576 * 4 + 1 and with_prompt.answer_dim(576) == 576 * 2 + 1
    assert FeatureSpec.from_dict(with_prompt.as_dict()) == with_prompt
    assert FeatureSpec.from_dict({"layers": [8]}) == FeatureSpec(layers=(8,))  # a model saved before
    with pytest.raises(ValueError, match="feature_prompt"):
        RewardConfig(feature_prompt="sometimes").feature_spec()
    with pytest.raises(ValueError, match="at least one layer"):
        RewardConfig(feature_layers="").feature_spec()
