"""PPO pieces by hand (KL rewards, GAE, masking after EOS, clipping, left padding in the
sampler) and a 2-step run on the tiny model that saves a loadable adapter."""

from __future__ import annotations

import json
import math

import pytest
import torch

from assistant import models
from retrain.backbone import lower_forward, prompt_ids
from retrain.job import run_ppo
from retrain.ppo import (
    AdaptiveKL,
    PPOConfig,
    gae,
    group_mean_sd,
    kl_rewards,
    loo_advantages,
    policy_loss,
    token_logprobs,
    truncation_scores,
    value_loss,
    whiten,
    with_end_of_turn,
)
from retrain.rollout import response_mask, sample
from tests.factories import separable_pairs, tiny_reward_model


def test_mask_after_eos():
    tokens = torch.tensor([[5, 2, 7, 7], [5, 6, 8, 9], [2, 2, 3, 3]])
    mask, ended = response_mask(tokens, {2})
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_kl_penalty_per_token_rewards():
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -3.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    rewards, kl = kl_rewards(logp, ref, mask, torch.tensor([3.0]), beta=0.1)
    assert kl[0].tolist() == pytest.approx([0.5, -1.0, 0.0])
    # -0.1*0.5 ; -0.1*(-1) + score 3 at the last real token ; masked
    assert rewards[0].tolist() == pytest.approx([-0.05, 3.1, 0.0])


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.5, 0.5]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=0.5)
    # t2: 1-0.5=0.5 ; t1: 0+0.5-0.5 + 0.5*0.5 = 0.25 ; t0: 0 + 0.5*0.25 = 0.125
    assert adv[0].tolist() == pytest.approx([0.125, 0.25, 0.5])
    assert ret[0].tolist() == pytest.approx([0.625, 0.75, 1.0])
    # masked tail: the value after the last real token is 0, padding gets nothing
    adv, _ = gae(torch.tensor([[0.0, 1.0, 9.0]]), values, torch.tensor([[1.0, 1.0, 0.0]]), gamma=1.0, lam=0.5)
    assert adv[0].tolist() == pytest.approx([0.25, 0.5, 0.0])
    # lambda = 0.95, gamma = 1: A0 = delta0 + 0.95 * A1 with delta from the values
    adv, _ = gae(torch.tensor([[0.0, 1.0]]), torch.tensor([[0.2, 0.4]]), torch.ones(1, 2), 1.0, 0.95)
    assert adv[0].tolist() == pytest.approx([0.2 + 0.95 * 0.6, 0.6])


def test_leave_one_out_advantages_by_hand():
    """RLOO: each answer's return less the mean return of the other answers to its prompt; a
    level the reward model gives a whole prompt cancels."""
    score = torch.tensor([1.0, 3.0, 2.0, 10.0, 12.0, 11.0])  # prompt 2 sits 9 higher, same spread
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]]).float()
    kl = torch.zeros(6, 3)
    kl[1, :] = 1.0  # the second answer paid 3 nats
    adv = loo_advantages(score, kl, mask, beta=0.5, group_size=3)
    ret1 = [1.0, 3.0 - 1.5, 2.0]
    want = [ret1[0] - (ret1[1] + ret1[2]) / 2, ret1[1] - (ret1[0] + ret1[2]) / 2, ret1[2] - (ret1[0] + ret1[1]) / 2]
    assert torch.allclose(adv[:3, 0], torch.tensor(want))
    assert torch.allclose(adv[3:, 0], torch.tensor([-1.5, 1.5, 0.0]))  # the prompt's level is gone
    assert torch.equal(adv != 0, mask.bool() & (adv[:, :1] != 0))  # the same advantage on every answer token
    n, sd = group_mean_sd(score, 3)
    assert n == 2 and sd == pytest.approx(float(torch.tensor([2.0, 11.0]).std()))
    assert group_mean_sd(score, 1) == (6, pytest.approx(float(score.std())))


def test_whiten_and_losses():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    w = whiten(x, m)
    assert w[0, :3].tolist() == pytest.approx([-1.2247, 0.0, 1.2247], abs=1e-3) and float(w[0, 3]) == 0.0
    logp = torch.log(torch.tensor([[1.5, 0.5]]))
    loss, clipfrac, _ = policy_loss(logp, torch.zeros(1, 2), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), 0.2)
    # token 0: max(-1.5, -1.2) = -1.2 (clipped) ; token 1: max(-0.5, -0.8) = -0.5
    assert float(loss) == pytest.approx((-1.2 - 0.5) / 2) and float(clipfrac) == pytest.approx(0.5)
    vl = value_loss(torch.tensor([[1.0]]), torch.tensor([[0.0]]), torch.tensor([[1.0]]), torch.ones(1, 1), 0.2)
    assert float(vl) == pytest.approx(0.5 * 0.8 ** 2)  # clipped prediction 0.2 is further: (0.2-1)^2
    ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
    ctl.update(12.0, 10)  # error clipped to +0.2: beta * (1 + 0.2 * 10/100)
    assert ctl.beta == pytest.approx(0.1 * 1.02)


def test_sampler_left_padding_matches_unbatched(tiny_model_dir):
    loaded = models.load(str(tiny_model_dir), tiny_model_dir.parent, device="cpu")
    tok = loaded.tokenizer
    short = prompt_ids(tok, [{"role": "user", "content": "hi"}])
    long = prompt_ids(tok, [{"role": "user", "content": "a much longer question with many more words in it"}])
    pad = tok.pad_token_id
    _, _, alone, _ = sample(loaded.model, [short], max_new_tokens=6, temperature=0, stop_ids={-1}, pad_id=pad)
    _, pmask, both, _ = sample(loaded.model, [short, long], max_new_tokens=6, temperature=0, stop_ids={-1},
                               pad_id=pad)
    assert pmask[0].tolist()[:len(long) - len(short)] == [0] * (len(long) - len(short))
    assert both[0].tolist() == alone[0].tolist()


def test_truncated_answers_are_penalised_relative_to_their_score():
    cfg = PPOConfig(truncation_penalty=1.0, score_clip=5.0)
    rm = torch.tensor([2.0, 2.0, -7.0, 0.5])
    ended = torch.tensor([True, False, True, False])
    # a truncated answer keeps its (clipped) score minus the penalty: no fixed score replaces it
    assert truncation_scores(rm, ended, cfg).tolist() == [2.0, 1.0, -5.0, -0.5]


def test_truncated_rows_are_scored_at_an_appended_end_of_turn():
    ids = torch.tensor([[0, 5], [6, 7]])
    pmask = torch.tensor([[0, 1], [1, 1]])
    resp = torch.tensor([[8, 2, 0], [9, 9, 9]])  # row 0 ended with 2; row 1 hit the cap
    rmask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    ended = torch.tensor([True, False])
    full, fmask, last = with_end_of_turn(ids, pmask, resp, rmask, ended, eot=2, pad_id=0)
    assert full.tolist() == [[0, 5, 8, 2, 0, 0], [6, 7, 9, 9, 9, 2]]
    assert fmask.tolist() == [[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]
    assert last.tolist() == [3, 5]  # row 0 at its own end-of-turn, row 1 at the appended one


@pytest.mark.timeout(400)
def test_ppo_two_steps_saves_loadable_adapter(tiny_model_dir, tmp_path):
    tiny_reward_model(tiny_model_dir, tmp_path / "rm")
    prompts = [p.prompt for p in separable_pairs(6)]
    logged = []
    plan = {"policy_path": str(tiny_model_dir), "ref_path": str(tiny_model_dir), "reward_path": str(tmp_path / "rm"),
            "prompts": prompts, "out_dir": str(tmp_path / "policy"), "ptx_pairs": None}
    cfg = PPOConfig(steps=2, batch_size=4, minibatch_size=2, ppo_epochs=1, max_new_tokens=8, lora_layers=1,
                    adaptive_kl=True, temperature=0.7)
    res = run_ppo(plan, cfg, log=lambda ph, st, m: logged.append((ph, st, m)))
    assert res.steps == 2 and [s for _, s, _ in logged] == [1, 2]
    for key in ("score", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "response_length", "eos_rate"):
        assert key in res.final and math.isfinite(res.final[key])
    out = tmp_path / "policy"
    cfg_json = json.loads((out / "adapter_config.json").read_text())
    assert cfg_json["base_model_name_or_path"] == str(tiny_model_dir)
    assert (out / "tokenizer_config.json").exists()
    again = models.load(str(out), tmp_path, device="cpu")
    assert again.model is not None
    # continue training from the saved adapter (a served version) and stop early on request
    plan2 = {**plan, "policy_path": str(out), "out_dir": str(tmp_path / "policy2")}
    res2 = run_ppo(plan2, PPOConfig(steps=3, batch_size=2, minibatch_size=2, ppo_epochs=1, max_new_tokens=4,
                                    temperature=0.7),
                   should_stop=lambda: len(logged) >= 3, log=lambda ph, st, m: logged.append((ph, st, m)))
    assert res2.steps == 1
    assert json.loads((tmp_path / "policy2" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(tiny_model_dir)
    with pytest.raises(ValueError, match="must be set"):  # sampling settings come from the app's settings
        run_ppo(plan2, PPOConfig(steps=1, max_new_tokens=None, temperature=0.7))


def test_token_logprobs_and_entropy_are_the_models_at_the_temperature(tiny_model_dir):
    loaded = models.load(str(tiny_model_dir), tiny_model_dir.parent, device="cpu")
    model = loaded.model
    prompt, resp = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), torch.tensor([[20, 21, 22], [23, 24, 25]])
    full = torch.cat([prompt, resp], 1)
    T = 0.7
    lower = lower_forward(model, full, torch.ones_like(full), 1)
    logp, ent = token_logprobs(model, model.lm_head, lower, 4, resp, T, with_entropy=True)
    with torch.no_grad():
        want = torch.log_softmax(model(full).logits[:, 3:6].float() / T, -1)
    assert torch.allclose(logp, want.gather(-1, resp[..., None])[..., 0], atol=1e-5)
    assert torch.allclose(ent, -(want.exp() * want).sum(-1), atol=1e-4)


def test_the_controlled_truncation_penalty_holds_the_end_of_answer_rate():
    """Under ``truncation_control`` the penalty rises while answers end less often than at step
    1, falls while they end more often, and stays within [0, max]; 0 keeps it fixed."""
    from retrain.ppo import EndingControl

    ctl = EndingControl(PPOConfig(truncation_penalty=1.0, truncation_control=2.0, max_truncation_penalty=1.5,
                                  judge_window=1))
    assert ctl.update(0.5, 16) == 1.0  # step 1 sets the target
    assert ctl.update(0.4, 16) == pytest.approx(1.2)
    assert ctl.update(0.1, 16) == 1.5  # the ceiling
    assert ctl.update(0.5, 16) == pytest.approx(1.5)
    assert ctl.update(1.0, 16) == pytest.approx(0.5)
    assert ctl.update(1.0, 16) == 0.0  # never a reward for not ending
    fixed = EndingControl(PPOConfig(truncation_penalty=1.0))
    assert [fixed.update(e, 16) for e in (0.5, 0.0, 1.0)] == [1.0, 1.0, 1.0]
    scores = truncation_scores(torch.tensor([0.5, 0.5]), torch.tensor([True, False]), PPOConfig(), penalty=0.25)
    assert scores.tolist() == [0.5, 0.25]


def test_early_stop_on_a_falling_end_of_answer_rate_says_why():
    from retrain.ppo import EarlyStop

    stop = EarlyStop(PPOConfig(max_eos_drop=0.15, judge_window=2, judge_patience=0))
    assert stop.update(1, 0.0, 0.5, 64) is None and stop.improved  # step 1: the served policy is the first best
    assert stop.update(2, 0.1, 0.45, 64) is None
    why = stop.update(3, 0.2, 0.1, 64)  # window (0.45 + 0.1) / 2 = 0.275 < 0.5 - 0.15, 128 answers
    assert why and why.startswith("end-of-answer rate fell to 28% (128 answers") and "50% at step 1" in why
    assert "p = 0.00" in why


def test_the_end_of_answer_guard_does_not_stop_on_sampling_noise():
    """The rates of a plain_words run that was stopped at KL 0.00 (16 rollouts a step): noise
    for 16 answers a step, a real fall for ten times as many."""
    from retrain.ppo import EarlyStop, proportion_drop_p

    seen = [0.5, 0.375, 0.3125, 0.25]
    for n, stops in ((16, False), (160, True)):
        stop = EarlyStop(PPOConfig(max_eos_drop=0.15, judge_window=3, judge_patience=0))
        whys = [stop.update(i + 1, 0.0, rate, n) for i, rate in enumerate(seen)]
        assert any(whys) == stops, whys
    never = EarlyStop(PPOConfig(max_eos_drop=0.15, judge_window=1, judge_patience=0, eos_confidence=0.0))
    assert never.update(1, 0.0, 0.5, 16) is None and never.update(2, 0.0, 0.3, 16)  # the drop alone decides
    assert proportion_drop_p(8, 16, 8, 16) == pytest.approx(0.5) and proportion_drop_p(8, 16, 16, 16) > 0.99
    assert proportion_drop_p(50, 100, 20, 100) < 1e-4


def test_early_stop_on_a_judge_that_stopped_improving_keeps_the_best_policy():
    from retrain.ppo import EarlyStop

    stop = EarlyStop(PPOConfig(judge_window=1, judge_patience=2, judge_min_delta=0.05, max_eos_drop=1.0))
    assert stop.update(1, 0.0, 0.5, 16) is None
    assert stop.update(2, 0.3, 0.5, 16) is None and stop.improved and stop.best_step == 2
    assert stop.update(3, 0.32, 0.5, 16) is None and not stop.improved  # within min_delta: no progress
    why = stop.update(4, 0.1, 0.5, 16)
    assert why and "best 0.300 at step 2" in why


def test_ppo_with_groups_samples_each_prompt_group_size_times(tiny_model_dir, tmp_path):
    """``group_size`` k: batch_size / k prompts per step, k answers each, no critic trained."""
    from retrain.job import load_policy
    from retrain.reward import RewardModel
    from retrain.rollout import TorchSampler

    tiny_reward_model(tiny_model_dir, tmp_path / "rm")
    cfg = PPOConfig(steps=2, batch_size=4, group_size=2, minibatch_size=2, ppo_epochs=1, max_new_tokens=6,
                    lora_layers=1, temperature=0.7)
    policy, tok, _ = load_policy(str(tiny_model_dir), cfg, "cpu")
    rm = RewardModel.load(str(tmp_path / "rm"))
    value = rm.as_value_model()
    critic = [p.detach().clone() for p in value.parameters()]
    seen = []

    class Recording(TorchSampler):
        def sample(self, prompts, **kw):
            seen.append([tuple(p) for p in prompts])
            return super().sample(prompts, **kw)

    from retrain.backbone import end_of_turn_id
    from retrain.ppo import train_ppo

    prompts = [p.prompt for p in separable_pairs(6)]
    res = train_ppo(policy, tok, rm, value, prompts, cfg, stop_ids={end_of_turn_id(tok)},
                    eot_id=end_of_turn_id(tok), sampler=Recording(policy), judge=RewardModel.load(str(tmp_path / "rm")))
    assert res.steps == 2 and all(math.isfinite(v) for v in res.final.values() if isinstance(v, float))
    for batch in seen:  # two prompts, each twice in a row, the two different
        assert len(batch) == 4 and batch[0] == batch[1] and batch[2] == batch[3] and batch[0] != batch[2]
    assert all(torch.equal(a, b) for a, b in zip(critic, value.parameters()))
    with pytest.raises(ValueError, match="multiple of ppo.group_size"):
        train_ppo(policy, tok, rm, value, prompts, PPOConfig(batch_size=4, group_size=3, max_new_tokens=4,
                                                              temperature=0.7),
                  stop_ids={end_of_turn_id(tok)}, eot_id=end_of_turn_id(tok))


def test_ppo_stopped_by_the_judge_keeps_the_policy_it_started_from(tiny_model_dir, tmp_path):
    """A judge that never sees progress: PPO stops, records why, and leaves the served policy."""
    from retrain.job import load_policy
    from retrain.reward import RewardModel

    tiny_reward_model(tiny_model_dir, tmp_path / "rm")
    cfg = PPOConfig(steps=4, batch_size=2, minibatch_size=2, ppo_epochs=1, max_new_tokens=6, lora_layers=1,
                    temperature=0.7, judge_patience=2, judge_min_delta=1e9, judge_confidence=0.0, max_eos_drop=1.0,
                    lr=5e-2)
    policy, tok, _ = load_policy(str(tiny_model_dir), cfg, "cpu")
    start = {k: v.clone() for k, v in policy.state_dict().items() if "lora_" in k}
    rm = RewardModel.load(str(tmp_path / "rm"))
    judge = RewardModel.load(str(tmp_path / "rm"))
    from retrain.backbone import end_of_turn_id
    from retrain.ppo import train_ppo

    res = train_ppo(policy, tok, rm, rm.as_value_model(), [p.prompt for p in separable_pairs(4)], cfg,
                    stop_ids={end_of_turn_id(tok)}, eot_id=end_of_turn_id(tok), judge=judge)
    assert res.stopped == "judge" and "stopped improving" in res.stop_reason and res.kept_step == 1
    assert res.steps == 2  # two updates were made, then undone
    now = {k: v for k, v in policy.state_dict().items() if "lora_" in k}
    assert all(torch.equal(start[k], now[k]) for k in start)


def test_the_judge_stop_needs_evidence_and_keeps_the_latest_policy_within_noise():
    """The judge's step scores (16 rollouts a step, spread ~1) of two no_hedging runs on the
    same votes.  The first was stopped at step 8 by patience alone and kept step 2, a noise
    peak (KL 0.1, rejected).  With evidence asked for: no stop on noise and, since no window
    beat step 1 beyond noise, the policy PPO started from is kept.  The second ran 16 steps
    and learned: the latest policy within noise of the best is kept.  A real fall stops a run
    and keeps a policy from before it."""
    from retrain.ppo import EarlyStop

    cfg = PPOConfig(judge_window=3, judge_patience=6, judge_min_delta=0.05, max_eos_drop=1.0)
    noise = [0.009, 0.289, -0.079, 0.296, -0.097, 0.177, 0.110, -0.311, 0.25, 0.2]
    old = EarlyStop(PPOConfig(judge_window=3, judge_patience=6, judge_min_delta=0.05, max_eos_drop=1.0,
                              judge_confidence=0.0))
    whys = [old.update(i + 1, j, 0.5, 16, judge_sd=1.0) for i, j in enumerate(noise)]
    assert whys.index(next(w for w in whys if w)) == 7 and old.keep_step == 2  # what the run did
    stop = EarlyStop(cfg)
    assert not any(stop.update(i + 1, j, 0.5, 16, judge_sd=1.0) for i, j in enumerate(noise))
    assert stop.best_step == 2 and stop.keep_step == 1

    learned = [0.026, 0.064, -0.197, 0.207, -0.134, 0.056, 0.065, 0.137, 0.365, 0.573, 0.621, 0.343, 0.349,
               0.333, 0.513, 0.503]
    stop = EarlyStop(cfg)
    keeps = []
    for i, j in enumerate(learned):
        assert stop.update(i + 1, j, 0.5, 16, judge_sd=1.0) is None
        keeps.append(stop.keep_step)
    assert stop.best_step == 11 and keeps[9] == 1 and keeps[10] == 11  # step 11: beyond noise of step 1
    assert stop.keep_step == 16

    fall = EarlyStop(PPOConfig(judge_window=3, judge_patience=3, judge_min_delta=0.05, max_eos_drop=1.0))
    whys = [fall.update(i + 1, j - (1.5 if i >= 12 else 0.0), 0.5, 16, judge_sd=1.0) for i, j in enumerate(learned)]
    why = next(w for w in whys if w)
    assert whys.index(why) == 13 and "stopped improving" in why and "one-sided p = 0.00" in why
    assert fall.keep_step == 12  # the last policy before the fall
