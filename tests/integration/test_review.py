"""Console queries (feedback.review), the leaderboard and maintainer auth, without a server."""

from __future__ import annotations

import pytest

from feedback import auth, leaderboard, review
from feedback.registry import Registry
from feedback.store import StoreError
from tests.factories import populate


@pytest.fixture
def filled(store):
    registry = Registry(store)
    registry.register_version(version_id="sft", path="/nowhere", kind="sft")
    return store, registry, populate(store, registry, "/nowhere")


def refs(rows):
    return {f"{r['record_type']}:{r['id']}" for r in rows}


def test_filters(filled):
    store, _, ids = filled
    assert review.count(store) == 7
    assert refs(review.page(store, {"kinds": ["down"], "reason": "inaccurate"})) == {f"rating:{ids['rating0']}"}
    assert refs(review.page(store, {"has_comment": True})) == {f"rating:{ids['rating0']}"}
    assert review.count(store, {"has_comment": False}) == 6
    assert refs(review.page(store, {"kinds": ["edit"]})) == {f"comparison:{ids['edit']}"}
    assert review.count(store, {"session": "bob"}) == 3
    assert review.count(store, {"session": "sess-bob"}) == 3
    assert review.count(store, {"model_version": "v2"}) == 3  # comparisons with a v2 answer
    assert review.count(store, {"search": "haiku"}) == 3
    assert review.count(store, {"search": "100%_"}) == 0  # LIKE wildcards are escaped
    assert review.count(store, {"since": "2999-01-01"}) == 0
    store.set_excluded("rating", [ids["rating1"]], True, "spam", "tester")
    assert refs(review.page(store, {"status": "excluded"})) == {f"rating:{ids['rating1']}"}
    assert review.count(store, {"status": "included"}) == 6
    with pytest.raises(StoreError):
        review.page(store, {"kinds": ["nope"]})


def test_keyset_paging_visits_every_record_once(filled):
    store, _, _ = filled
    seen, after = [], None
    while True:
        rows = review.page(store, {}, limit=2, after=after)
        if not rows:
            break
        seen += rows
        after = (rows[-1]["created_at"], rows[-1]["id"])
    assert len(seen) == 7 and len(refs(seen)) == 7
    keys = [(r["created_at"], r["id"]) for r in seen]
    assert keys == sorted(keys, reverse=True)


def test_record_and_bulk_exclusion(filled):
    store, _, ids = filled
    rec = review.record(store, "comparison", ids["comparison0"])
    assert rec["context"][-1]["content"] == "What is the capital of France?"
    assert [a["generation"]["model_version"] for a in rec["answers"]] == ["sft", "v2"]
    assert rec["answers"][1]["generation"]["sampling"]["seed"] == 10
    edit = review.record(store, "comparison", ids["edit"])
    assert edit["answers"][1]["generation"] is None and edit["answers"][1]["text"] == "Rain on the window"
    n = review.set_excluded_matching(store, {"session": "alice"}, True, "bad session", "tester")
    assert n == 4
    assert {r["id"] for r in store.usable_comparisons()} == {ids["comparison1"], ids["edit"]}
    assert review.record(store, "rating", ids["rating0"])["review_log"][0]["actor"] == "tester"


def test_charts_and_runs(filled):
    store, registry, _ = filled
    assert sum(r["n"] for r in review.per_day(store)) == 7
    shares = {r["version"]: r for r in review.per_version(store)}
    assert shares["v2"]["both_bad_share"] == pytest.approx(1 / 3)
    assert shares["sft"]["down_share"] == pytest.approx(2 / 3)
    run = registry.create_run("manual", {"lr": 1e-5})
    registry.update_run(run, status="rejected", decision={"promote": False}, reason="KL too high", kl=0.4)
    registry.log_metrics(run, "ppo", 1, {"score": 0.1, "kl": 0.01})
    registry.log_metrics(run, "ppo", 2, {"score": 0.2, "kl": 0.02})
    assert review.runs(store)[0]["status"] == "rejected"
    detail = review.run_detail(store, run)
    assert detail["series"]["ppo"]["score"] == [(1, 0.1), (2, 0.2)] and detail["config"] == {"lr": 1e-5}


def test_leaderboard(store):
    store.ensure_session("s")
    conv = store.start_conversation("s", "sys")

    def play(va, vb, verdict):
        gens = [store.record_generation(session_id="s", conversation_id=conv, turn=1, context=[], content="x",
                                        model_version=v, sampling={}, prompt_tokens=1, completion_tokens=1,
                                        ttft_ms=None, latency_ms=None, finish_reason="stop") for v in (va, vb)]
        cid = store.open_comparison(session_id="s", conversation_id=conv, turn=1, a_generation_id=gens[0],
                                    b_generation_id=gens[1])
        store.decide_comparison(cid, verdict, "s")

    for _ in range(8):
        play("good", "bad", "a")
    play("bad", "good", "b")
    play("good", "bad", "tie")
    play("good", "bad", "both_bad")   # skipped
    play("good", "good", "a")         # same version: skipped
    rows = leaderboard.leaderboard(store, n_boot=50)
    assert [r["version"] for r in rows] == ["good", "bad"]
    good = rows[0]
    assert good["games"] == 10 and good["wins"] == 9 and good["ties"] == 1 and good["losses"] == 0
    assert good["ci_low"] <= good["rating"] <= good["ci_high"] and good["rating"] > 1000 > rows[1]["rating"]


def test_password_hashing_and_logins(store):
    h = auth.hash_password("correct horse")
    assert h.startswith("scrypt$") and "correct" not in h
    assert auth.verify_password("correct horse", h) and not auth.verify_password("wrong", h)
    assert not auth.verify_password("x", None) and not auth.verify_password("x", "garbage")
    assert auth.hash_password("same") != auth.hash_password("same")  # salted
    auth.add_user(store, "maria", "long enough pw")
    auth.add_user(store, "viewer", "long enough pw", role="viewer")
    with pytest.raises(StoreError):
        auth.add_user(store, "short", "pw")
    t = [1000.0]
    a = auth.ConsoleAuth(store, "admin", "settings-pw", ttl_s=60, clock=lambda: t[0])
    token = a.login("maria", "long enough pw")
    assert a.check(token) == "maria"
    assert a.check(a.login("admin", "settings-pw")) == "admin"
    for user, pw in (("viewer", "long enough pw"), ("maria", "nope"), ("admin", ""), ("ghost", "x")):
        with pytest.raises(auth.AuthError):
            a.login(user, pw)
    t[0] += 61
    with pytest.raises(auth.AuthError, match="expired"):
        a.check(token)
    for _ in range(auth.MAX_FAILURES):
        with pytest.raises(auth.AuthError):
            a.login("maria", "bad")
    with pytest.raises(auth.AuthError, match="too many"):
        a.login("maria", "long enough pw")
    no_admin = auth.ConsoleAuth(store, "admin", "")  # an empty settings password disables it
    with pytest.raises(auth.AuthError):
        no_admin.login("admin", "")
