"""The live canary: the decision by hand, and on the tiny model a candidate that passed the
offline gate served as answer B, then promoted or rejected by users' own votes."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta, timezone

import pytest

from assistant import serve
from assistant.chat import ChatService
from assistant.engine import SamplingParams
from assistant.settings import Settings
from feedback.registry import Registry, canary_tally
from feedback.store import FeedbackStore
from retrain.canary import CanaryConfig, check, decide, status
from retrain.scheduler import RetrainScheduler
from tests.factories import seed_votes, write_config

CFG = CanaryConfig(min_votes=10, max_votes=40, max_minutes=60)


def test_decision_by_hand():
    # 9 of 10 decisive: Wilson z=1.645 den 1.2706, centre 1.0353/den = 0.8148,
    # half 1.645 * sqrt(0.009 + 0.006765) / den = 0.1626 -> bounds 0.652-0.977: promote
    d = decide(9, 1, 5, 3.0, CFG)
    assert d.action == "promote" and d.ci_low == pytest.approx(0.652, abs=1e-3) and d.votes == 15
    assert d.win_rate == pytest.approx(0.9) and d.win_rate_ties_half == pytest.approx((9 + 2.5) / 15)
    d = decide(1, 9, 0, 3.0, CFG)  # the mirror image: users prefer what is served
    assert d.action == "reject" and d.ci_high == pytest.approx(1 - 0.652, abs=1e-3) and "prefer the served" in d.reason
    assert decide(6, 4, 10, 3.0, CFG).action == "continue"  # 6 of 10 is no evidence yet
    assert decide(9, 0, 0, 3.0, CFG).action == "continue"  # too few decisive votes
    inconclusive = decide(12, 10, 18, 3.0, CFG)  # 40 votes, the cap
    assert inconclusive.action == "reject" and "inconclusive" in inconclusive.reason
    assert decide(1, 1, 0, 61.0, CFG).action == "reject"  # out of time


def test_tally_reads_which_side_was_the_candidate():
    votes = [{"verdict": "a", "a_version": "cand", "b_version": "sft"},
             {"verdict": "b", "a_version": "cand", "b_version": "sft"},
             {"verdict": "b", "a_version": "sft", "b_version": "cand"},
             {"verdict": "tie", "a_version": "sft", "b_version": "cand"},
             {"verdict": "both_bad", "a_version": "sft", "b_version": "cand"}]
    assert canary_tally(votes, "cand")[:3] == (2, 1, 2)


@pytest.fixture
def trial(tmp_path, tiny_model_dir):
    """A retrain whose candidate passed the offline gate and is now on trial."""
    config = tmp_path / "retrain.json"
    write_config(config)
    settings = Settings(data_dir=str(tmp_path / "data"), model=str(tiny_model_dir), max_batch=4,
                        retrain_config=str(config), retrain_threads=1, canary_share=1.0,
                        canary_min_votes=6, canary_max_votes=30, max_new_tokens=6)
    store = FeedbackStore(settings.db_path)
    registry = Registry(store)
    holder = serve.start(settings, registry)
    follower = serve.VersionFollower(holder, registry, serve.engine_factory(settings))
    scheduler = RetrainScheduler(settings, store, registry)
    seed_votes(store, 16)
    run = registry.run(scheduler.run_now(wait=True))
    yield settings, store, registry, holder, follower, run
    scheduler.kill()
    holder.close()
    store.close()


def _vote_rounds(settings, store, holder, pick, n: int) -> list[str]:
    """n users each chat, regenerate (B from the candidate: share 1.0) and vote ``pick(a, b)``."""
    chat = ChatService(settings, store, holder)
    b_versions = []
    for i in range(n):
        sess = chat.new_session()
        list(chat.chat(sess, f"Question {i}?", SamplingParams(max_new_tokens=6, seed=i)))
        a_version = sess.model_version
        list(chat.regenerate(sess, SamplingParams(max_new_tokens=6, seed=100 + i)))
        b_versions.append(sess.model_version)
        chat.vote(sess, pick(a_version, sess.model_version))
    return b_versions


@pytest.mark.timeout(600)
def test_users_votes_promote_the_candidate(trial):
    settings, store, registry, holder, follower, run = trial
    assert run["status"] == "canary", run["reason"]
    cand = run["candidate_version"]
    assert registry.served_version() == "sft" and registry.canary()["version_id"] == cand
    assert follower.check() is False and holder.version == "sft" and holder.canary_version == cand
    cfg = CanaryConfig.from_settings(settings)
    assert check(registry, cfg).action == "continue"  # no votes yet
    b = _vote_rounds(settings, store, holder, lambda a, b: "b" if b == cand else "a", 8)
    assert set(b) == {cand}  # every answer B came from the candidate, every A from what is served
    assert status(registry, cfg).wins == 8
    decision = check(registry, cfg)
    assert decision.action == "promote", decision.reason
    run = registry.run(run["id"])
    assert run["status"] == "promoted" and "8 of 8" in run["reason"]
    assert json.loads(run["decision"])["canary"]["wins"] == 8
    assert registry.served_version() == cand and registry.canary() is None
    assert registry.serving_history()[-1]["actor"] == "canary"
    assert follower.check() is True and holder.version == cand and holder.canary_version is None


@pytest.mark.timeout(600)
def test_users_votes_reject_the_candidate(trial):
    settings, store, registry, holder, follower, run = trial
    cand = run["candidate_version"]
    follower.check()
    _vote_rounds(settings, store, holder, lambda a, b: "a" if b == cand else "b", 7)
    decision = check(registry, CanaryConfig.from_settings(settings))
    assert decision.action == "reject" and decision.losses == 7
    run = registry.run(run["id"])
    assert run["status"] == "rejected" and "prefer the served version" in run["reason"]
    assert registry.served_version() == "sft" and registry.canary() is None
    assert follower.check() is False and holder.version == "sft" and holder.canary_version is None


@pytest.mark.timeout(600)
def test_a_rollback_during_the_trial_ends_it_and_time_limits_hold(trial):
    settings, store, registry, holder, follower, run = trial
    cfg = dataclasses.replace(CanaryConfig.from_settings(settings), max_minutes=5)
    later = datetime.now(timezone.utc) + timedelta(minutes=6)
    assert status(registry, cfg, later).action == "reject"  # out of time: inconclusive
    registry.register_version(version_id="other", path=registry.version("sft")["path"], kind="sft")
    registry.set_served("other", "rollback", actor="maintainer")
    decision = check(registry, cfg)
    assert decision.action == "reject" and "served version changed" in decision.reason
    assert registry.run(run["id"])["status"] == "rejected" and registry.served_version() == "other"
