"""The feedback store: migrations, concurrency, pragmas, session checks."""

from __future__ import annotations

import json
import threading

import pytest
import sqlite_utils

from feedback import store as store_mod
from feedback.store import AlreadyDecided, FeedbackStore, NotFound


def test_upgrade_from_schema_1_keeps_data(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = store_mod.connect(path)
    db = sqlite_utils.Database(conn)
    store_mod.MIGRATIONS[0](db)
    conn.execute("PRAGMA user_version = 1")
    db["sessions"].insert({"id": "s1", "opt_out": 0, "created_at": "t", "updated_at": "t"})
    db["comparisons"].insert({"id": "c1", "session_id": "s1", "a_text": "A", "b_text": "B", "verdict": "b",
                              "decided_at": "2024-01-01T00:00:00", "created_at": "t"})
    db["ratings"].insert({"id": "r1", "session_id": "s1", "thumb": "up", "created_at": "t"})
    conn.close()

    s = FeedbackStore(path)
    try:
        assert s.conn.execute("PRAGMA user_version").fetchone()[0] == store_mod.SCHEMA_VERSION
        comp = s.comparison("c1")
        assert (comp["a_text"], comp["b_text"], comp["verdict"], comp["excluded"]) == ("A", "B", "b", 0)
        assert s.rating("r1")["excluded"] == 0
        assert [c["id"] for c in s.usable_comparisons()] == ["c1"]
        assert {"model_versions", "serving_log", "training_runs", "app_state"} <= set(s.db.table_names())
    finally:
        s.close()
    again = FeedbackStore(path)  # reopening an up-to-date file changes nothing
    assert again.comparison("c1")["verdict"] == "b"
    again.close()


def test_newer_schema_is_refused(tmp_path):
    path = tmp_path / "new.sqlite"
    FeedbackStore(path).close()
    conn = store_mod.connect(path)
    conn.execute(f"PRAGMA user_version = {store_mod.SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(store_mod.StoreError, match="newer than this app"):
        FeedbackStore(path)


def test_wal_and_busy_timeout(store):
    assert store.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.conn.execute("PRAGMA busy_timeout").fetchone()[0] == 10_000


def _generation(s: FeedbackStore, session: str, conv: str, text: str) -> str:
    return s.record_generation(session_id=session, conversation_id=conv, turn=1,
                               context=[{"role": "user", "content": "q"}], content=text, model_version="v",
                               sampling={"temperature": 0.7}, prompt_tokens=3, completion_tokens=2,
                               ttft_ms=1.0, latency_ms=2.0, finish_reason="stop")


def test_concurrent_writers_lose_nothing(tmp_path):
    path = tmp_path / "busy.sqlite"
    first, second = FeedbackStore(path), FeedbackStore(path)  # second: like another process
    errors: list[BaseException] = []

    def worker(s: FeedbackStore, n: int) -> None:
        try:
            session = f"sess-{n}"
            conv = s.start_conversation(session, "sys")
            for i in range(15):
                a = _generation(s, session, conv, f"a{i}")
                b = _generation(s, session, conv, f"b{i}")
                comp = s.open_comparison(session_id=session, conversation_id=conv, turn=1,
                                         a_generation_id=a, b_generation_id=b)
                s.decide_comparison(comp, "a", session)
                s.record_rating(session_id=session, generation_id=a, thumb="up")
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(first if n % 2 else second, n)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    counts = first.counts()
    assert counts == {"sessions": 6, "conversations": 6, "generations": 180, "comparisons": 90, "ratings": 90}
    assert len(first.usable_comparisons()) == 90
    first.close()
    second.close()


def test_judgements_are_checked_against_the_session(store):
    conv = store.start_conversation("alice", "sys")
    a, b = _generation(store, "alice", conv, "A"), _generation(store, "alice", conv, "B")
    with pytest.raises(NotFound):
        store.open_comparison(session_id="bob", conversation_id=conv, turn=1, a_generation_id=a,
                              b_generation_id=b)
    comp = store.open_comparison(session_id="alice", conversation_id=conv, turn=1, a_generation_id=a,
                                 b_generation_id=b)
    with pytest.raises(NotFound):
        store.decide_comparison(comp, "b", "bob")
    with pytest.raises(NotFound):
        store.decide_comparison("nope", "b", "alice")
    assert store.comparison(comp)["verdict"] is None
    store.decide_comparison(comp, "tie", "alice")
    with pytest.raises(AlreadyDecided):
        store.decide_comparison(comp, "b", "alice")
    assert store.comparison(comp)["verdict"] == "tie"
    with pytest.raises(NotFound):
        store.record_rating(session_id="bob", generation_id=a, thumb="down")
    with pytest.raises(NotFound):
        store.record_edit(session_id="bob", conversation_id=conv, turn=1, generation_id=a, rewrite="x")
    assert store.db["ratings"].count == 0


def test_pii_is_scrubbed_before_storage(store):
    conv = store.start_conversation("s", "sys")
    store.set_message(conv, 0, "user", "mail me: jane@example.org, card 4111 1111 1111 1111")
    assert store.conversation_messages(conv)[0]["content"] == "mail me: [EMAIL], card [CARD]"
    raw = FeedbackStore(store.path.parent / "raw.sqlite", scrub_pii=False)
    c2 = raw.start_conversation("s", "sys")
    raw.set_message(c2, 0, "user", "jane@example.org")
    assert raw.conversation_messages(c2)[0]["content"] == "jane@example.org"
    raw.close()


def _asked(s: FeedbackStore, session: str, question: str) -> tuple[str, list[str]]:
    """A conversation where ``question`` got three answers; returns (conversation, generation ids)."""
    conv = s.start_conversation(session, "sys")
    context = [{"role": "system", "content": "sys"}, {"role": "user", "content": question}]
    gens = [s.record_generation(session_id=session, conversation_id=conv, turn=1, context=context,
                                content=f"{question} answer {i}", model_version="sft",
                                sampling={"temperature": 0.7}, prompt_tokens=3, completion_tokens=2,
                                ttft_ms=1.0, latency_ms=2.0, finish_reason="stop") for i in range(3)]
    return conv, gens


def test_prompts_of_excluded_judgements_never_reach_training(store):
    """An excluded comparison, rewrite or rating takes its prompt out of the rollout and gate
    prompts too (every answer to that context, not only the judged ones)."""
    from retrain.data import build_snapshot

    kept = {}
    for question in ("excluded vote", "excluded rewrite", "excluded thumb", "kept question"):
        kept[question] = _asked(store, "s1", question)
    conv, (a, b, _) = kept["excluded vote"]
    vote = store.open_comparison(session_id="s1", conversation_id=conv, turn=1, a_generation_id=a, b_generation_id=b)
    store.decide_comparison(vote, "a", "s1")
    conv, (a, _, _) = kept["excluded rewrite"]
    edit = store.record_edit(session_id="s1", conversation_id=conv, turn=1, generation_id=a, rewrite="better")
    conv, (a, _, _) = kept["excluded thumb"]
    thumb = store.record_rating(session_id="s1", generation_id=a, thumb="down")
    store.set_excluded("comparison", [vote, edit], True, "spam", "admin")
    store.set_excluded("rating", [thumb], True, "spam", "admin")

    asked = {json.loads(g["context"])[-1]["content"] for g in store.user_prompts()}
    assert asked == {"kept question"}
    snap = build_snapshot(store, min_seed_prompts=0, min_heldout_prompts=0)
    used = {p[-1]["content"] for p in snap.rollout_prompts + snap.heldout_prompts}
    assert used == {"kept question"}
    store.set_excluded("comparison", [vote], False, "", "admin")  # restored: its prompt is usable again
    assert {json.loads(g["context"])[-1]["content"] for g in store.user_prompts()} == {"kept question", "excluded vote"}


def test_a_run_decision_with_a_metric_that_is_not_a_number_is_standard_json(store):
    """Python's json writes NaN, which SQLite's JSON functions call malformed: the registry
    writes null instead, so the maintainers' own SQL (and the console) can read every run."""
    from feedback.registry import Registry

    registry = Registry(store)
    run_id = registry.create_run("manual")
    registry.update_run(run_id, status="rejected", decision={
        "passed": False, "metrics": {"ppo/corr": float("nan"), "ppo/kl": 1.5, "spread": [float("inf"), 2.0]}})
    row = store.conn.execute("SELECT json_valid(decision), json_extract(decision, '$.metrics.\"ppo/kl\"'), "
                             "json_type(decision, '$.metrics.\"ppo/corr\"') FROM training_runs WHERE id = ?",
                             (run_id,)).fetchone()
    assert tuple(row) == (1, 1.5, "null")
    decision = json.loads(store.query("SELECT decision FROM training_runs WHERE id = ?", (run_id,))[0]["decision"])
    assert decision["metrics"] == {"ppo/corr": None, "ppo/kl": 1.5, "spread": [None, 2.0]}
