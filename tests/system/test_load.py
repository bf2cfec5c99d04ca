"""The load benchmark (benchmarks/load.py) in a CI-sized run: 6 users x 2 turns on the tiny
model against a real app process, and a check that its database verification catches
what it claims to catch."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import load
from feedback.store import FeedbackStore


def test_load_six_users_every_acknowledged_judgement_stored_once(tmp_path, tiny_model_dir):
    out = tmp_path / "report.json"
    rc = load.main(["--users", "6", "--turns", "2", "--model", str(tiny_model_dir), "--max-new-tokens", "12",
                    "--max-batch", "4", "--threads", "1", "--data-dir", str(tmp_path / "data"),
                    "--max-seconds", "240", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["errors"] == 0, report["error_samples"]
    assert report["server_errors"] == []
    assert report["db_problems"] == []
    assert report["turns_done"] == 12
    assert report["requests"] == 6 * (1 + 2 * 5)  # connect + (chat, regenerate, vote, rate, edit) per turn
    assert report["acknowledged_votes"] == 12 and report["failed_votes"] == 0
    assert report["acknowledged_ratings"] == 12 and report["acknowledged_edits"] == 12
    assert report["ttft_p50_s"] is not None and report["vote_p95_s"] is not None
    assert rc == 0 and report["ok"]
    # the database holds exactly the judgements of the run, nothing extra
    store = FeedbackStore(Path(tmp_path / "data" / "feedback.sqlite"))
    try:
        assert store.db["comparisons"].count_where("source = 'regenerate' AND verdict IS NOT NULL") == 12
        assert store.db["comparisons"].count_where("source = 'edit'") == 12
        assert store.db["ratings"].count == 12
        assert store.db["sessions"].count == 6
    finally:
        store.close()


def test_verify_reports_missing_duplicated_and_failed_votes(tmp_path):
    store = FeedbackStore(tmp_path / "f.sqlite", scrub_pii=False)
    context = [{"role": "user", "content": "question one"}]
    conv = store.start_conversation("s", "")
    common = dict(session_id="s", conversation_id=conv, turn=1, context=context, model_version="v",
                  sampling={}, prompt_tokens=1, completion_tokens=1, ttft_ms=1.0, latency_ms=1.0,
                  finish_reason="stop")
    a, b = store.record_generation(content="A", **common), store.record_generation(content="B", **common)
    store.decide_comparison(store.open_comparison(session_id="s", conversation_id=conv, turn=1,
                                                  a_generation_id=a, b_generation_id=b), "b", "s")
    store.close()
    db = tmp_path / "f.sqlite"
    good = load.UserResult(0, acked_votes=[("question one", "b")])
    assert load.verify(db, [good]) == []
    wrong = load.UserResult(0, acked_votes=[("question one", "a")])
    missing = load.UserResult(1, acked_votes=[("question two", "a")])
    failed = load.UserResult(2, failed_votes=["question one"])
    unrated = load.UserResult(3, acked_ratings=["comment xyz"])
    problems = load.verify(db, [wrong, missing, failed, unrated])
    assert len(problems) == 4, problems


def test_help_and_loopback_only(capsys):
    import pytest

    with pytest.raises(SystemExit) as exc:
        load.main(["--help"])
    assert exc.value.code == 0 and "--during-retrain" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="only sends traffic to loopback"):
        load.main(["--url", "http://192.0.2.1:7860/", "--data-dir", "x"])


def test_flood_mode_runs_and_the_user_is_served(tmp_path, tiny_model_dir):
    """``--flood``: one client with 6 sessions streams long answers while a normal user does
    2 full turns; the user's every request succeeds and the flood is accounted for (answered
    or refused, never a server error).  Which flood requests are refused depends on timing,
    so the refusal itself is asserted in tests/integration/test_fairness.py.  The flood's
    answers are short enough (64 tokens) that some end within its 4 s head start however
    loaded the machine (with 300 they did not, once, in a whole-suite run)."""
    out = tmp_path / "report.json"
    rc = load.main(["--users", "1", "--turns", "2", "--model", str(tiny_model_dir), "--max-new-tokens", "12",
                    "--max-batch", "4", "--threads", "1", "--data-dir", str(tmp_path / "data"),
                    "--flood", "6", "--flood-tokens", "64", "--flood-head-start", "4", "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["errors"] == 0, report["error_samples"]
    assert report["turns_done"] == 2 and report["server_errors"] == []
    flood = report["flood"]
    assert flood["sessions"] == 6 and flood["fairness"] and flood["failed"] == []
    assert flood["answered"] + flood["refused_busy"] + flood["refused_rate"] >= 1
    assert rc == 0 and report["ok"]
