"""Snapshot building: verdicts -> pairs, ties/both_bad/edits/thumbs, splits, rollout prompts."""

from __future__ import annotations

import json

import pytest

from retrain.data import LabelConfig, build_snapshot, fold_of, load_seed_prompts

SYS = "You are a helpful AI assistant."


def _turn(store, sid, prompt, a, b):
    conv = store.start_conversation(sid, SYS)
    ctx = [{"role": "system", "content": SYS}, {"role": "user", "content": prompt}]
    common = dict(session_id=sid, conversation_id=conv, turn=1, context=ctx, model_version="v0",
                  sampling={}, prompt_tokens=1, completion_tokens=1, ttft_ms=None, latency_ms=None,
                  finish_reason="stop")
    ga = store.record_generation(content=a, **common)
    gb = store.record_generation(content=b, **common) if b is not None else None
    return conv, ga, gb


def _vote(store, sid, prompt, a, b, verdict):
    conv, ga, gb = _turn(store, sid, prompt, a, b)
    comp = store.open_comparison(session_id=sid, conversation_id=conv, turn=1, a_generation_id=ga, b_generation_id=gb)
    store.decide_comparison(comp, verdict, sid)
    return conv, ga, comp


def test_seed_prompts_shipped():
    seeds = load_seed_prompts()
    assert 100 <= len(seeds) <= 200
    assert len(set(seeds)) == len(seeds)


def test_every_kind_of_judgement_contributes(store):
    _vote(store, "s1", "p1", "A1", "B1", "a")
    _vote(store, "s1", "p2", "A2", "B2", "b")
    _vote(store, "s1", "p3", "A3", "B3", "tie")
    _vote(store, "s1", "p4", "A4", "B4", "both_bad")  # no rewrite: two bad labels
    conv, ga, _ = _vote(store, "s2", "p5", "A5", "B5", "both_bad")
    store.record_edit(session_id="s2", conversation_id=conv, turn=1, generation_id=ga, rewrite="R5")
    _vote(store, "s2", "p7", "same", "same", "a")  # identical answers: dropped, with the reason
    _, g_up, g_down = _turn(store, "s4", "p8", "good", "bad")
    store.record_rating(session_id="s4", generation_id=g_up, thumb="up")
    store.record_rating(session_id="s4", generation_id=g_down, thumb="down", reasons=["inaccurate", "too long"])
    _vote(store, "s3", "p6", "A6", "B6", "a")
    store.set_opt_out("s3", True)  # opted out: never used, not even counted
    snap = build_snapshot(store, heldout_fraction=0.0)
    got = sorted((p.prompt[-1]["content"], p.chosen, p.rejected, p.source, p.label, p.weight) for p in snap.train)
    rw = LabelConfig().rewrite_weight
    assert got == [("p1", "A1", "B1", "regenerate", 1.0, 1.0), ("p2", "B2", "A2", "regenerate", 1.0, 1.0),
                   ("p3", "B3", "A3", "tie", 0.5, 1.0),
                   ("p5", "R5", "A5", "edit", 1.0, rw), ("p5", "R5", "B5", "both_bad+edit", 1.0, rw),
                   ("p8", "good", "bad", "thumbs", 1.0, 1.0)]
    points = sorted((q.prompt[-1]["content"], q.answer, q.label, q.source, q.weight) for q in snap.train_points)
    assert points == [("p4", "A4", 0.0, "both_bad", 1.0), ("p4", "B4", 0.0, "both_bad", 1.0),
                      ("p5", "A5", 0.0, "both_bad", 1.0), ("p5", "B5", 0.0, "both_bad", 1.0),
                      ("p8", "bad", 0.0, "thumb_down", 1.5), ("p8", "good", 1.0, "thumb_up", 1.0)]
    j = snap.judgements
    assert j["preference"] == {"seen": 3, "used": 2, "dropped": {"the two answers are identical or empty": 1}}
    assert j["tie"] == {"seen": 1, "used": 1, "dropped": {}}
    assert j["both_bad"] == {"seen": 2, "used": 2, "dropped": {}}
    assert j["edit"] == {"seen": 1, "used": 1, "dropped": {}}
    assert j["thumb_up"] == {"seen": 1, "used": 1, "dropped": {}}
    assert j["thumb_down"] == {"seen": 1, "used": 1, "dropped": {}}
    # nothing silently dropped: every judgement seen is used or dropped with a reason
    assert all(r["seen"] == r["used"] + sum(r["dropped"].values()) for r in j.values())
    assert len(snap.rating_ids) == 2
    assert all(p.prompt[0]["role"] == "system" for p in snap.train)


def test_folds_are_stable_and_keep_a_prompt_together(store):
    for i in range(40):
        _vote(store, f"s{i % 4}", f"q{i % 20}", f"a{i}", f"b{i}", "a")
    snap = build_snapshot(store, heldout_fraction=0.0)
    by_prompt = {}
    for p in snap.train:
        by_prompt.setdefault(p.prompt[-1]["content"], set()).add(p.fold)
        assert p.fold == fold_of(p.prompt)
    assert all(len(f) == 1 for f in by_prompt.values())  # one prompt, one fold
    assert 0.25 < sum(p.fold for p in snap.train) / len(snap.train) < 0.75  # both halves are used


def test_reference_samples_are_the_reference_models_answers(store):
    _turn(store, "s1", "r1", "sft answer", None)
    conv = store.start_conversation("s1", SYS)
    ctx = [{"role": "system", "content": SYS}, {"role": "user", "content": "r2"}]
    store.record_generation(session_id="s1", conversation_id=conv, turn=1, context=ctx, content="ppo answer",
                            model_version="v-1", sampling={}, prompt_tokens=1, completion_tokens=1, ttft_ms=None,
                            latency_ms=None, finish_reason="stop")
    conv = store.start_conversation("s1", SYS)
    store.record_generation(session_id="s1", conversation_id=conv, turn=1, context=ctx, content="hinted answer",
                            model_version="v0", sampling={"style_hint": "Answer briefly."}, prompt_tokens=1,
                            completion_tokens=1, ttft_ms=None, latency_ms=None, finish_reason="stop")
    _turn(store, "s9", "r3", "opted-out answer", None)
    store.set_opt_out("s9", True)
    snap = build_snapshot(store, heldout_fraction=0.0, reference_version="v0")
    assert [a for _, a in snap.reference] == ["sft answer"]


def test_time_split_and_prompts(store):
    for i in range(10):
        _vote(store, f"s{i % 3}", f"q{i}", f"a{i}", f"b{i}", "a")
    snap = build_snapshot(store, heldout_fraction=0.2, split="time", min_seed_prompts=0, min_heldout_prompts=0)
    assert [p.prompt[-1]["content"] for p in snap.heldout] == ["q8", "q9"]  # the newest
    assert len(snap.train) == 8 and snap.stats["split"] == "time"
    held = {json.dumps(p) for p in snap.heldout_prompts}
    roll = {json.dumps(p) for p in snap.rollout_prompts}
    assert not held & roll
    assert len(roll) == 8 and len(held) == 2  # deduplicated (two generations per context)
    assert all(p[-1]["role"] == "user" for p in snap.rollout_prompts)


def test_session_split_never_mixes_sessions(store):
    for i in range(30):
        _vote(store, f"s{i % 6}", f"q{i}", f"a{i}", f"b{i}", "b")
    snap = build_snapshot(store, heldout_fraction=0.5, split="session")
    assert not {p.session_id for p in snap.train} & {p.session_id for p in snap.heldout}


def test_cap_per_session_and_seed_top_up(store):
    for i in range(5):
        _turn(store, "heavy", f"h{i}", "x", None)
    snap = build_snapshot(store, max_prompts_per_session=2, min_seed_prompts=20, min_heldout_prompts=3)
    users = [p for p in snap.rollout_prompts + snap.heldout_prompts if p[-1]["content"].startswith("h")]
    assert len(users) == 2 and snap.stats["prompts_capped"] == 3
    assert len(snap.rollout_prompts) >= 20 and len(snap.heldout_prompts) >= 3


def test_thumbs_pair(store):
    conv, ga, gb = _turn(store, "t", "tp", "good", "bad")
    store.record_rating(session_id="t", generation_id=ga, thumb="up")
    store.record_rating(session_id="t", generation_id=gb, thumb="down")
    snap = build_snapshot(store, heldout_fraction=0.0)
    assert [(p.chosen, p.rejected, p.source) for p in snap.train] == [("good", "bad", "thumbs")]
    assert sorted(q.label for q in snap.train_points) == [0.0, 1.0]


def test_time_split_is_exact_when_timestamps_tie():
    from retrain.data import _split_flags

    same = "2026-01-01T00:00:00.000+00:00"
    items = [("s", same)] * 10  # ten judgements in one millisecond
    flags, cut = _split_flags(items, 0.2, "time")
    assert flags == [False] * 8 + [True] * 2 and cut == same  # the last two recorded
    flags, _ = _split_flags([("s", "b"), ("s", "a"), ("s", "c"), ("s", "a")], 0.5, "time")
    assert flags == [True, False, True, False]  # the newest by time, then by recorded order


def _flood_and_crowd(store, flood_key: str):
    """16 ordinary users with 10 votes each, and one client who edits 210 answers over 30
    sessions of its own; ``flood_key``: what the flood's sessions share ('address' or
    'browser', the other rotated)."""
    for u in range(16):
        sid = f"user{u}"
        store.ensure_session(sid, owner=f"owner{u}", contributor=store.contributor_of(f"203.0.113.{u}"))
        for k in range(10):
            _vote(store, sid, f"question {u}-{k}", f"answer a {u}-{k}", f"answer b {u}-{k}", "ab"[k % 2])
    for s in range(30):
        sid = f"flood{s}"
        address = "198.51.100.7" if flood_key == "address" else f"198.51.100.{s}"
        store.ensure_session(sid, owner="flooder" if flood_key == "browser" else f"flood-owner{s}",
                             contributor=store.contributor_of(address))
        for k in range(7):
            conv, ga, _ = _turn(store, sid, f"flood question {s}-{k}", "the model's answer", None)
            store.record_edit(session_id=sid, conversation_id=conv, turn=1, generation_id=ga,
                              rewrite=f"the flooder's rewrite {s}-{k}")


@pytest.mark.parametrize("flood_key", ["address", "browser"])
def test_one_client_cannot_outweigh_sixteen_users(store, flood_key):
    """InstructGPT capped prompts per labeller: here a flood of 210 rewrites (each weighs 2
    votes) from one client, by address or by browser key, keeps less weight in the run than
    16 ordinary users' 160 votes, and the ledger says what was dropped and why."""
    from retrain.data import CAPPED

    _flood_and_crowd(store, flood_key)
    snap = build_snapshot(store, heldout_fraction=0.2)
    items = snap.train + snap.heldout
    flood = sum(p.weight for p in items if p.session_id.startswith("flood"))
    crowd = sum(p.weight for p in items if p.session_id.startswith("user"))
    assert crowd == 160  # nobody in the crowd lost a vote
    assert 0 < flood < crowd
    edits = snap.judgements["edit"]
    assert edits["seen"] == 210 and edits["dropped"] == {CAPPED: 210 - edits["used"]}
    assert snap.stats["capped_clients"] == 1 and snap.stats["capped_judgements"] == 210 - edits["used"]
    # without the cap, the flood outweighs the crowd
    uncapped = build_snapshot(store, heldout_fraction=0.2, max_client_share=1.0)
    assert sum(p.weight for p in uncapped.train + uncapped.heldout if p.session_id.startswith("flood")) > crowd


def test_one_or_two_clients_are_never_capped(store):
    """A household's own assistant: one person who votes a lot is the whole crowd."""
    store.ensure_session("me", owner="me", contributor=store.contributor_of("192.0.2.1"))
    store.ensure_session("partner", owner="partner", contributor=store.contributor_of("192.0.2.2"))
    for k in range(120):
        _vote(store, "me", f"q{k}", f"a{k}", f"b{k}", "a")
    _vote(store, "partner", "hello", "x", "y", "b")
    snap = build_snapshot(store, heldout_fraction=0.0)
    assert len(snap.train) == 121 and snap.stats["capped_judgements"] == 0


def test_the_contributor_is_a_keyed_hash_of_the_address(store, tmp_path):
    from feedback.store import FeedbackStore

    a = store.contributor_of("203.0.113.5")
    assert a == store.contributor_of("203.0.113.5") != store.contributor_of("203.0.113.6")
    assert "203.0.113.5" not in a and store.contributor_of(None) is None
    other = FeedbackStore(tmp_path / "other.sqlite")
    try:
        assert other.contributor_of("203.0.113.5") != a  # a salt of each database's own
    finally:
        other.close()
