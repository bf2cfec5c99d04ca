"""The console's service without a browser or a server: a real SQLite store, the service's
methods called as the console's handlers call them, and what they return or refuse."""

from __future__ import annotations

import csv
import html
import json
import re
import sqlite3
from datetime import datetime, timedelta

import pytest

from assistant.console_service import (
    FEEDBACK_COLUMNS,
    PAGE_SIZE,
    PREVIEW,
    RUN_COLUMNS,
    ConsoleError,
    ConsoleService,
    describe_filters,
    kind_choices,
    make_filters,
    parse_ref,
    preview,
    took,
    when,
)
from feedback import auth, review
from feedback.registry import Registry
from feedback.store import NotFound, StoreError
from tests.factories import app_settings, populate, seed_votes

HUMAN_TIME = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}")


@pytest.fixture
def console(store, tmp_path, tiny_model_dir):
    """(service, store, registry, ids): ``populate``'s judgements, the SFT model served."""
    registry = Registry(store)
    registry.register_base("sft", str(tiny_model_dir), str(tiny_model_dir))
    registry.set_served("sft", "serve", reason="first start")
    ids = populate(store, registry, str(tiny_model_dir))
    service = ConsoleService(app_settings(tmp_path, tiny_model_dir), store, registry)
    return service, store, registry, ids


def keys(service, **filters) -> set[str]:
    return set(service.page(make_filters(**filters)).keys)


# ----------------------------------------------------------------------------- the Feedback tab
def test_filters_select_the_matching_judgements(console):
    service, _, _, ids = console
    assert keys(service, kinds=["down"], reason="inaccurate") == {f"rating:{ids['rating0']}"}
    assert keys(service, kinds=["a", "b", "both_bad"], session="alice") == {
        f"comparison:{ids['comparison0']}", f"comparison:{ids['comparison2']}"}
    assert keys(service, has_comment="with comment") == {f"rating:{ids['rating0']}"}
    assert keys(service, search="haiku") == {f"comparison:{ids['comparison1']}", f"comparison:{ids['edit']}",
                                             f"rating:{ids['rating1']}"}
    assert keys(service, kinds=["edit"], version="v2") == set()  # the edit's B is the user's, A is sft
    assert len(keys(service)) == 7
    with pytest.raises(StoreError, match="unknown kinds"):
        make_filters(kinds=["sideways"])


def test_feedback_table_is_readable(console):
    service, store, _, ids = console
    page = service.page(make_filters(kinds=["down"], reason="inaccurate"))
    assert list(page.table.columns) == FEEDBACK_COLUMNS and FEEDBACK_COLUMNS[-1] == "record"
    row = page.table.iloc[0]
    stored = store.query("SELECT created_at FROM ratings WHERE id = ?", (ids["rating0"],))[0]["created_at"]
    assert HUMAN_TIME.fullmatch(row["time"]) and row["time"] == stored[:16].replace("T", " ")
    assert (row["kind"], row["user"], row["version"], row["reasons"], row["comment"], row["status"]) == (
        "Thumbs down", "alice", "sft", "inaccurate", "wrong city", "included")
    assert row["prompt"] == "What is the capital of France?"
    assert row["record"] == f"rating:{ids['rating0']}" and page.keys == [row["record"]]
    assert page.info == "1–1 of 1 judgements"


def test_long_text_is_cut_to_a_preview_in_the_table_but_whole_in_the_record(console):
    service, store, _, _ = console
    question = "Tell me everything about the history of the Roman empire " * 5
    comment = "This answer misses the point entirely and " * 6 + "THE-END"
    sid = "sess-carol"
    store.ensure_session(sid, user="carol")
    conv = store.start_conversation(sid, "You are a helpful AI assistant.")
    context = [{"role": "user", "content": question}]
    gen = store.record_generation(session_id=sid, conversation_id=conv, turn=1, context=context, content="Rome.",
                                  model_version="sft", sampling={}, prompt_tokens=5, completion_tokens=2,
                                  ttft_ms=1.0, latency_ms=2.0, finish_reason="stop")
    rid = store.record_rating(session_id=sid, generation_id=gen, thumb="down", reasons=[], comment=comment)
    row = service.page(make_filters(session="carol")).table.iloc[0]
    for cell, full in ((row["comment"], comment), (row["prompt"], question)):
        assert len(cell) <= PREVIEW and cell.endswith("…")
        assert full.startswith(cell[:-1])
    assert "THE-END" not in row["comment"]
    assert "THE&#45;END" in service.record_view(f"rating:{rid}")  # the record view has it all (escaped)
    assert preview("short  text\non lines") == "short text on lines"


def test_paging_visits_every_judgement_once(store, tmp_path, tiny_model_dir):
    seed_votes(store, PAGE_SIZE * 2 + 7)
    service = ConsoleService(app_settings(tmp_path, tiny_model_dir), store, Registry(store))
    f = make_filters()
    first = service.page(f)
    second = service.next_page(f, first.cursors, first.keys)
    third = service.next_page(f, second.cursors, second.keys)
    assert [p.info for p in (first, second, third)] == [
        f"1–50 of {PAGE_SIZE * 2 + 7} judgements", "51–100 of 107 judgements", "101–107 of 107 judgements"]
    seen = first.keys + second.keys + third.keys
    assert len(seen) == len(set(seen)) == PAGE_SIZE * 2 + 7
    assert service.next_page(f, third.cursors, third.keys).keys == third.keys  # the last page stays
    assert service.previous_page(f, third.cursors).keys == second.keys
    assert service.previous_page(f, first.cursors).keys == first.keys


def test_excluding_one_record_needs_a_reason_and_is_audited(console):
    service, store, _, ids = console
    ref = f"comparison:{ids['comparison0']}"
    with pytest.raises(StoreError, match="reason"):
        service.exclude(ref, "  ", "maria")
    assert not store.comparison(ids["comparison0"])["excluded"]

    assert service.exclude(ref, "test data", "maria") == f"Excluded comparison `{ids['comparison0']}`."
    row = store.comparison(ids["comparison0"])
    assert (row["excluded"], row["excluded_by"], row["exclude_reason"]) == (1, "maria", "test data")
    assert ids["comparison0"] not in {r["id"] for r in store.usable_comparisons()}
    log = store.query("SELECT action, reason, actor FROM review_log WHERE record_id = ?", (ids["comparison0"],))
    assert log == [{"action": "exclude", "reason": "test data", "actor": "maria"}]
    page = service.page(make_filters(status="excluded"))
    assert page.keys == [ref] and page.table.iloc[0]["status"] == "excluded: test data"
    view = service.record_view(ref)
    assert "**EXCLUDED** by maria" in view and "test data" in view and "Review history" in view

    assert service.restore(ref, "", "omar") == f"Restored comparison `{ids['comparison0']}`."
    assert ids["comparison0"] in {r["id"] for r in store.usable_comparisons()}
    log = store.query("SELECT action, actor FROM review_log WHERE record_id = ? ORDER BY id", (ids["comparison0"],))
    assert [(e["action"], e["actor"]) for e in log] == [("exclude", "maria"), ("restore", "omar")]


def test_bad_references_are_refused_with_a_clear_message(console):
    service, _, _, ids = console
    for bad in ("", "comparison", "user:1", f"{ids['comparison0']}"):
        with pytest.raises(ConsoleError, match="comparison:ID or rating:ID"):
            parse_ref(bad)
    with pytest.raises(ConsoleError, match="no rating nope"):
        service.exclude("rating:nope", "why", "maria")
    with pytest.raises(NotFound):
        service.record_view("comparison:nope")
    with pytest.raises(ConsoleError, match="no such row"):
        service.row_ref([f"rating:{ids['rating0']}"], 1)
    assert service.row_ref([f"rating:{ids['rating0']}"], 0) == f"rating:{ids['rating0']}"


def test_bulk_exclusion_changes_exactly_what_the_filters_select(console):
    service, store, _, ids = console
    alice = make_filters(session="alice")
    assert service.exclude_matching(alice, "bad session", "maria") == "Excluded 4 records."
    excluded = keys(service, status="excluded")
    assert excluded == {f"comparison:{ids['comparison0']}", f"comparison:{ids['comparison2']}",
                        f"rating:{ids['rating0']}", f"rating:{ids['rating2']}"}
    assert keys(service, status="included") == {f"comparison:{ids['comparison1']}", f"comparison:{ids['edit']}",
                                                f"rating:{ids['rating1']}"}
    log = store.query("SELECT record_type, record_id, actor, reason FROM review_log WHERE action = 'exclude'")
    assert {f"{r['record_type']}:{r['record_id']}" for r in log} == excluded and len(log) == 4  # one row each
    assert {(r["actor"], r["reason"]) for r in log} == {("maria", "bad session")}
    assert service.restore_matching(alice, "", "maria") == "Restored 4 records."
    assert keys(service, status="excluded") == set()


# ----------------------------------------------------------------------------- Training, Versions, Leaderboard
def rejected_run(registry, reasons: list[str], reason: str | None = None) -> str:
    """A run the gate rejected, recorded as ``retrain/job.py`` records it."""
    run = registry.create_run("manual")
    registry.update_run(run, status="running", started_at="2026-11-22T11:05:33.123+00:00", n_preferences=212)
    decision = {"passed": False, "reasons": reasons,
                "checks": [{"name": "rm_ci_low", "value": 0.44, "threshold": 0.5, "passed": False}]}
    registry.update_run(run, status="rejected", finished_at="2026-11-22T11:17:40.000+00:00", kl=3.25,
                        rm_accuracy=0.8137, decision=decision,
                        reason="; ".join(reasons) if reason is None else reason)
    return run


def test_training_table_gives_each_runs_status_and_reason_in_words(console):
    service, _, registry, _ = console
    words = "reward model accuracy lower bound 0.44 is not above 0.50"
    rejected = rejected_run(registry, [words])
    unexplained = rejected_run(registry, ["judge prefers the served model"], reason="")
    failed = registry.create_run("schedule")
    registry.fail_runs([failed], "RuntimeError: out of memory while training the reward model")

    training = service.training()
    table = training.table
    assert list(table.columns) == RUN_COLUMNS and RUN_COLUMNS[-1] == "run"
    rows = {row["run"]: row for row in table.to_dict("records")}
    assert set(training.run_ids) == set(rows) == {rejected, unexplained, failed}
    assert (rows[rejected]["status"], rows[rejected]["reason"]) == ("rejected", words)
    assert rows[unexplained]["reason"] == "judge prefers the served model"  # from the gate's decision
    assert (rows[failed]["status"], rows[failed]["reason"]) == (
        "failed", "RuntimeError: out of memory while training the reward model")
    assert (rows[rejected]["started"], rows[rejected]["took"], rows[rejected]["prefs"]) == (
        "2026-11-22 11:05", "12 min", 212)
    assert (rows[rejected]["RM acc"], rows[rejected]["KL"]) == ("0.814", "3.25")
    assert not [v for row in rows.values() for v in row.values() if "{" in str(v)]  # no raw JSON

    page = service.run_detail(rejected)
    text = html.unescape(page.text)
    assert f"**Why:** {words}" in text and "**Gate:** not passed" in text and "started 2026-11-22 11:05" in text
    assert page.checks.to_dict("records") == [
        {"check": "rm ci low", "result": "FAIL", "value": "0.44", "needs": "", "threshold": "0.5"}]
    assert page.canary.empty and page.canary_text == ""


def test_time_helpers():
    assert when("2026-11-22T11:05:33.123+00:00") == "2026-11-22 11:05"
    assert when("2026-11-22T13:05:00+02:00") == "2026-11-22 11:05"  # shown in UTC
    assert when(None) == "" and when("not a time") == "not a time"
    assert took("2026-11-22T11:05:00+00:00", "2026-11-22T11:05:45+00:00") == "45 s"
    assert took("2026-11-22T11:05:00+00:00", "2026-11-22T13:10:00+00:00") == "2 h 5 min"
    assert took("2026-11-22T11:05:00+00:00", "") == ""


def test_schedule_and_retrain_now(console):
    service, _, registry, _ = console
    assert "scheduler not running" in service.schedule() and "no candidate on trial" in service.schedule()
    with pytest.raises(ConsoleError, match="scheduler not running"):
        service.retrain_now("maria")

    class Scheduler:
        busy = False

        def next_run_time(self):
            return datetime(2026, 11, 23, 3, 0)

        def run_now(self, trigger):
            if self.busy:
                raise RuntimeError("a retrain run is already in progress")
            self.busy = True
            return registry.create_run(trigger)

    service.scheduler = Scheduler()
    message = service.retrain_now("maria")
    run = registry.runs()[0]
    assert run["trigger"] == "manual" and message.startswith(f"Started run `{run['id']}`.")
    assert "Next scheduled retrain: **2026-11-23T03:00**" in message
    with pytest.raises(ConsoleError, match="already in progress"):
        service.retrain_now("maria")


def test_promote_and_roll_back_need_a_plan_and_are_recorded(console):
    service, _, registry, _ = console
    with pytest.raises(NotFound):
        service.plan_serve("v9", "promote", "")
    with pytest.raises(ConsoleError, match="rollback or promote"):
        service.plan_serve("v2", "delete", "")
    with pytest.raises(ConsoleError, match="nothing to confirm"):
        service.serve(None, "maria")
    plan, question = service.plan_serve("v2", "promote", "try v2")
    assert "Promote to <code>v2</code>?" in question and registry.served_version() == "sft"
    service.serve(plan, "maria")
    served = registry.served()
    assert (served["version_id"], served["action"], served["actor"], served["reason"]) == (
        "v2", "promote", "maria", "try v2")

    view = service.versions()
    assert "Serving **v2**" in view.served and set(view.ids) == {"sft", "v2"}
    rows = {row["version"]: row for row in view.table.to_dict("records")}
    assert rows["v2"]["serving"] == "● serving" and rows["sft"]["serving"] == ""
    assert rows["v2"]["parent"] == "sft" and HUMAN_TIME.fullmatch(rows["v2"]["created"])
    newest = view.history.iloc[0]
    assert (newest["version"], newest["action"], newest["by"], newest["reason"]) == ("v2", "promote", "maria", "try v2")
    assert HUMAN_TIME.fullmatch(newest["time"])


def test_leaderboard_and_charts(console):
    service, _, _, _ = console
    rows, board = service.leaderboard()
    assert [r["version"] for r in rows] == list(board["version"])
    assert list(board["version"]) and set(board["version"]) == {"sft", "v2"}
    assert all(re.fullmatch(r"\d+–\d+", ci) for ci in board["95% CI"])
    charts = service.charts()
    assert sum(r["n"] for r in charts.per_day) == 7
    shares = charts.table.set_index("version")
    assert shares.loc["v2", "both bad %"] == pytest.approx(33.3) and shares.loc["sft", "thumbs down %"] == 66.7


# ----------------------------------------------------------------------------- exports
def test_exports_hold_what_the_filters_select(console, tmp_path):
    service, store, _, ids = console
    service.exclude(f"comparison:{ids['comparison1']}", "noise", "maria")

    trl = tmp_path / "prefs.jsonl"
    assert service.export_trl(make_filters(), trl) == "2 preference pairs exported."
    records = [json.loads(line) for line in trl.read_text().splitlines()]
    # comparison0 (B won) and the edit; comparison1 is excluded, comparison2 ("both bad") has no pair
    assert sorted((r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in records) == [
        ("Rain on the window", "answer A1"), ("answer B0", "answer A0")]
    assert records[0]["prompt"][-1] == {"role": "user", "content": "What is the capital of France?"}
    assert service.export_trl(make_filters(), trl, include_excluded=True) == "3 preference pairs exported."

    table = tmp_path / "down.csv"
    assert service.export_csv(make_filters(kinds=["down"]), table) == "2 judgements exported."
    rows = list(csv.DictReader(table.open(encoding="utf-8")))
    assert {r["id"] for r in rows} == {ids["rating0"], ids["rating2"]} and {r["kind"] for r in rows} == {"down"}

    auth.add_user(store, "omar", "long enough pw")
    copy = tmp_path / "copy.sqlite"
    assert service.export_db(copy).startswith("Consistent copy of the database")
    with sqlite3.connect(copy) as conn:
        assert conn.execute("SELECT COUNT(*) FROM users").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM comparisons").fetchone() == (4,)


# ----------------------------------------------------------------------------- a run's page, the live canary
def _vote(store, sid, a_version, b_version, verdict, question="Which is better?"):
    """One decided comparison between answers of two versions."""
    conv = store.start_conversation(sid, "You are a helpful AI assistant.")
    ctx = [{"role": "user", "content": question}]
    common = dict(session_id=sid, conversation_id=conv, turn=1, context=ctx, sampling={}, prompt_tokens=4,
                  completion_tokens=4, ttft_ms=1.0, latency_ms=2.0, finish_reason="stop")
    ga = store.record_generation(content=f"answer by {a_version}", model_version=a_version, **common)
    gb = store.record_generation(content=f"answer by {b_version}", model_version=b_version, **common)
    cid = store.open_comparison(session_id=sid, conversation_id=conv, turn=1, a_generation_id=ga, b_generation_id=gb)
    store.decide_comparison(cid, verdict, sid)
    return cid


def test_run_page_shows_the_checks_the_data_by_kind_and_the_canarys_votes(console):
    service, store, registry, _ = console
    run = registry.create_run("schedule")
    checks = [{"name": "rm_ci_low", "value": 0.61, "op": ">=", "threshold": 0.5, "passed": True},
              {"name": "judge_win_ci_low", "value": 0.4321, "op": ">", "threshold": 0.5, "passed": False}]
    judgements = {"preference": {"seen": 40, "used": 38, "dropped": {"identical answers": 2}},
                  "tie": {"seen": 12, "used": 12, "dropped": {}}}
    registry.update_run(run, status="running", started_at="2026-11-22T11:00:00+00:00", candidate_version="v2")
    registry.start_canary(run_id=run, version_id="v2", parent_id="sft",
                          decision={"passed": True, "checks": checks, "judgements": judgements})
    store.ensure_session("sess-carol", user="carol")
    for verdict in ("b", "b", "a", "tie"):  # v2 is B: two wins, one loss, one tie
        _vote(store, "sess-carol", "sft", "v2", verdict)

    page = service.run_detail(run)
    assert [c["check"] for c in page.checks.to_dict("records")] == ["judge win ci low", "rm ci low"]  # failed first
    assert page.checks.iloc[0].to_dict() == {"check": "judge win ci low", "result": "FAIL", "value": "0.432",
                                             "needs": ">", "threshold": "0.5"}
    assert page.data.to_dict("records") == [
        {"kind": "preference", "seen": 40, "used": 38, "dropped": 2, "why dropped": "2 identical answers"},
        {"kind": "tie", "seen": 12, "used": 12, "dropped": 0, "why dropped": ""}]
    assert list(page.canary["winner"]) == ["candidate", "candidate", "served", "tie"]
    assert "on trial now" in page.canary_text and "2 of 3 decisive votes" in html.unescape(page.canary_text)

    registry.end_canary(run, promote=False, reason="canary: users prefer the served version", decision={"wins": 2})
    _vote(store, "sess-carol", "sft", "v2", "b")  # after the trial: not one of its votes
    page = service.run_detail(run)
    assert "ended:** canary: users prefer the served version" in html.unescape(page.canary_text)
    assert len(page.canary) == 4  # the trial's votes stay on its page
    assert "**Why:** canary: users prefer the served version" in html.unescape(page.text)


# ----------------------------------------------------------------------------- label quality
def test_disagreement_queue_lists_what_the_reward_models_doubt_strongest_first(console):
    service, store, registry, ids = console
    assert service.disagreements().keys == []
    assert "No reward model has been trained yet" in service.disagreements().info
    run = registry.create_run("manual")
    scores = [{"record": f"comparison:{ids['comparison0']}", "item": ids["comparison0"], "source": "regenerate",
               "label": 1.0, "model": -2.5, "disagreement": 2.5},
              {"record": f"rating:{ids['rating0']}", "item": ids["rating0"], "source": "thumb_down",
               "label": 0.0, "model": 1.1, "disagreement": 1.1},
              {"record": f"comparison:{ids['comparison1']}", "item": ids["comparison1"], "source": "regenerate",
               "label": 1.0, "model": 3.0, "disagreement": -3.0},  # agrees: not listed
              {"record": "comparison:deleted-since", "item": "deleted-since", "source": "regenerate",
               "label": 1.0, "model": -9.0, "disagreement": 9.0}]  # deleted ("delete my data"): not listed
    (service.settings.runs_dir / run).mkdir(parents=True)
    (service.settings.runs_dir / run / "label_scores.json").write_text(json.dumps(scores))

    queue = service.disagreements()
    assert queue.keys == [f"comparison:{ids['comparison0']}", f"rating:{ids['rating0']}"]
    first = queue.table.iloc[0].to_dict()
    assert (first["human said"], first["reward models say"], first["disagreement"], first["user"], first["status"],
            first["prompt"]) == ("chosen better", "rejected better (-2.50)", "2.50", "alice", "included",
                                 "What is the capital of France?")
    assert queue.table.iloc[1]["reward models say"] == "above a typical answer (+1.10)"
    assert run in queue.info
    service.exclude(queue.keys[0], "mislabelled", "maria")
    assert service.disagreements().table.iloc[0]["status"] == "excluded"


def _age(store, comparison_id, seconds):
    """Backdates a comparison's opening, as if the user had read it for ``seconds``."""
    store.conn.execute("UPDATE comparisons SET created_at = strftime('%Y-%m-%dT%H:%M:%f+00:00', "
                       "julianday(decided_at) - ? / 86400.0) WHERE id = ?", (seconds, comparison_id))


def test_consistency_and_speed_flag_the_right_sessions(console):
    service, store, _, _ = console
    store.ensure_session("sess-flip", user="flip")
    store.ensure_session("sess-care", user="care")
    store.ensure_session("sess-bot", user="bot")
    # flip: the same two answers, A over B and then (swapped) B over A again... judged both ways
    for verdict, (a, b) in (("a", ("sft", "v2")), ("a", ("v2", "sft")), ("b", ("sft", "v2")), ("tie", ("sft", "v2"))):
        _age(store, _vote(store, "sess-flip", a, b, verdict), 30)
    # care: always picks v2's answer, wherever it is shown, after reading for 20 s; bot: always A, in milliseconds
    for i in range(4):
        a, b = ("sft", "v2") if i % 2 else ("v2", "sft")
        _age(store, _vote(store, "sess-care", a, b, "b" if b == "v2" else "a", question=f"q{i}"), 20)
        _vote(store, "sess-bot", "sft", "v2", "a", question=f"q{i}")

    consistency = service.consistency()
    rows = {r["session"]: r for r in consistency.table.to_dict("records")}
    assert consistency.keys[0] == "sess-flip" and rows["sess-flip"]["contradictions"] == 2
    assert rows["sess-care"]["contradictions"] == 0 and rows["sess-care"]["A share"] == 50.0
    assert rows["sess-bot"]["most pressed"] == "A better (100%)" and consistency.keys[1] == "sess-bot"
    assert set(consistency.keys) == {"sess-flip", "sess-care", "sess-bot"}  # alice and bob have under 4 votes

    fast = service.fast_voters()
    assert fast.keys == ["sess-bot"]
    assert fast.table.iloc[0]["too fast"] == 4 and float(fast.table.iloc[0]["median s"]) < 1

    with pytest.raises(ConsoleError, match="reason"):
        service.exclude_session("sess-bot", " ", "maria")
    with pytest.raises(ConsoleError, match="pick a session"):
        service.exclude_session("no-such-session", "bot", "maria")
    assert service.exclude_session("sess-bot", "votes in milliseconds", "maria") == \
        "Excluded 4 judgements of session `sess&#45;bot`."
    assert service.fast_voters().table.iloc[0]["excluded"] == 4
    log = store.query("SELECT actor, reason FROM review_log WHERE action = 'exclude'")
    assert log == [{"actor": "maria", "reason": "votes in milliseconds"}] * 4


def test_reason_tags_are_counted_per_day(console):
    service, store, _, ids = console
    rows, table = service.reason_counts()
    day = store.rating(ids["rating0"])["created_at"][:10]
    assert rows == [{"day": day, "reason": "inaccurate", "thumb": "down", "n": 1},
                    {"day": day, "reason": "too long", "thumb": "down", "n": 1}]
    assert list(table.columns) == ["day", "reason", "thumb", "ratings"]


def test_bursts_flag_a_client_that_floods_rewrites_over_many_sessions(console):
    """A flood of rewrites needs no generation, so it is never fast voting; the burst list
    finds the client by its address across sessions, and leaves an ordinary user alone."""
    service, store, _, _ = console
    assert service.bursts().keys == [] and "No client" in service.bursts().info
    flood = store.contributor_of("198.51.100.7")
    for s in range(6):
        store.ensure_session(f"sess-flood{s}", owner=f"key{s}", contributor=flood)
        for k in range(6):
            conv = store.start_conversation(f"sess-flood{s}", "You are a helpful AI assistant.")
            gen = store.record_generation(content="an answer", model_version="sft", session_id=f"sess-flood{s}",
                                          conversation_id=conv, turn=1, context=[{"role": "user", "content": "q"}],
                                          sampling={}, prompt_tokens=1, completion_tokens=1, ttft_ms=1.0,
                                          latency_ms=1.0, finish_reason="stop")
            store.record_edit(session_id=f"sess-flood{s}", conversation_id=conv, turn=1, generation_id=gen,
                              rewrite=f"my rewrite {s}-{k}")
    store.ensure_session("sess-calm", owner="calm", contributor=store.contributor_of("203.0.113.9"))
    for i in range(5):
        _vote(store, "sess-calm", "sft", "v2", "a", question=f"q{i}")
    bursts = service.bursts()
    row = bursts.table.iloc[0]
    assert len(bursts.table) == 1 and row["rewrites"] == 36 and row["most in 10 min"] == 36
    assert row["sessions"] == 6 and row["client"] == flood[:12] and "198.51" not in row["client"]
    assert bursts.keys[0].startswith("sess-flood") and "1 client wrote 30+" in bursts.info


# ----------------------------------------------------------------------------- the first screen and empty states
def test_overview_without_data_says_so_in_sentences(store, tmp_path, tiny_model_dir):
    registry = Registry(store)
    registry.register_base("sft", str(tiny_model_dir), str(tiny_model_dir))
    registry.set_served("sft", "serve", reason="first start")
    service = ConsoleService(app_settings(tmp_path, tiny_model_dir), store, registry)
    o = service.overview()
    assert (o.today, o.week, o.total, o.ratings_week, o.down_share, o.last_run, o.queue) == (0, 0, 0, 0, None, None,
                                                                                            None)
    assert o.cards == ["**Judgements**\n\nNone yet.", "**Thumbs down**\n\nNo thumbs in the last 7 days.",
                       "**Last training run**\n\nNo run yet.",
                       "**Label quality**\n\nNo queue yet: it fills after the first retrain."]
    assert o.todo == ["No judgements yet: votes, rewrites and thumbs appear here as users give them in the chat."]
    # the other tabs' empty states are sentences too, with nothing to serve
    assert service.page(make_filters()).info.startswith("No judgements yet")
    training = service.training()
    assert training.run_ids == [] and training.info.startswith("No training run yet")
    view = service.versions()
    assert not view.can_serve and view.serve_info.startswith("Only one version exists")
    assert service.charts().info.startswith("No judgements yet")
    assert service.leaderboard_info(service.leaderboard()[0]).startswith("No A/B votes")


def test_overview_counts_today_and_the_week_and_says_what_to_look_at(console):
    service, store, registry, ids = console
    now = datetime.fromisoformat(store.rating(ids["rating0"])["created_at"])
    o = service.overview(now)
    assert (o.today, o.week, o.total, o.ratings_week, o.down_week) == (7, 7, 7, 3, 2)
    assert "## 7 today" in o.cards[0] and "7 in the last 7 days, 7 in all" in o.cards[0]
    assert "## 67%" in o.cards[1] and "of 3 ratings" in o.cards[1]
    assert o.todo == ["67% of this week's thumbs are down: read them in **Feedback** (Filters: Thumbs down)."]

    # three days later: nothing today, all of it this week; eight days later: none this week
    later = service.overview(now + timedelta(days=3))
    assert (later.today, later.week, later.total) == (0, 7, 7)
    assert "## 0 today" in later.cards[0]
    gone = service.overview(now + timedelta(days=8))
    assert (gone.today, gone.week, gone.ratings_week, gone.total) == (0, 0, 0, 7)
    assert gone.todo == ["Nothing needs a look right now."]

    # a rejected run whose reward models doubt one vote
    run = rejected_run(registry, ["reward model accuracy lower bound 0.44 is not above 0.50"])
    (service.settings.runs_dir / run).mkdir(parents=True)
    (service.settings.runs_dir / run / "label_scores.json").write_text(json.dumps([
        {"record": f"comparison:{ids['comparison0']}", "item": ids["comparison0"], "source": "regenerate",
         "label": 1.0, "model": -2.5, "disagreement": 2.5}]))
    o = service.overview(now)
    assert o.last_run["id"] == run and "## Rejected" in o.cards[2] and "2026-11-22 11:05 UTC" in o.cards[2]
    assert "lower bound 0.44" in html.unescape(o.cards[2])
    assert (len(o.queue.keys), o.queue_included) == (1, 1) and "## 1 to review" in o.cards[3]
    assert o.todo[:2] == ["The last training run was **rejected**: read why on **Training**.",
                          "1 judgement the reward models doubt is still used for training: review it in "
                          "**Label quality**."]
    service.exclude(f"comparison:{ids['comparison0']}", "mislabel", "maria")
    o = service.overview(now)
    assert o.queue_included == 0 and "## 0 to review" in o.cards[3] and not [t for t in o.todo if "doubt" in t]


def test_verdicts_show_in_words_but_are_stored_and_exported_as_codes(console, tmp_path):
    service, store, _, ids = console
    kinds = list(service.page(make_filters()).table["kind"])
    assert sorted(kinds) == ["A better", "B better", "Both bad", "Rewrite", "Thumbs down", "Thumbs down", "Thumbs up"]
    assert [value for _, value in kind_choices()] == list(review.KINDS)  # the filter sends the stored codes
    assert keys(service, kinds=["both_bad"]) == {f"comparison:{ids['comparison2']}"}
    assert {r["kind"] for r in service.charts().per_day} >= {"A better", "Both bad", "Thumbs down"}
    assert store.comparison(ids["comparison2"])["verdict"] == "both_bad"
    out = tmp_path / "all.csv"
    service.export_csv(make_filters(), out)
    exported = {row["id"]: row for row in csv.DictReader(out.open())}
    assert (exported[ids["comparison2"]]["kind"], exported[ids["rating0"]]["kind"]) == ("both_bad", "down")


def test_the_filter_bar_says_what_the_list_is_narrowed_to():
    assert describe_filters(make_filters()) == "Filters · none (every judgement)"
    assert describe_filters(make_filters(kinds=["down", "both_bad"], reason="inaccurate", status="excluded")) == \
        "Filters · Thumbs down, Both bad · tag inaccurate · excluded"


def test_a_run_page_names_what_the_run_did_not_record(console):
    service, _, registry, _ = console
    failed = registry.create_run("schedule")
    registry.fail_runs([failed], "RuntimeError: out of memory")
    page = service.run_detail(failed)
    assert page.checks.empty and page.data.empty and not page.has_curves
    assert "This run recorded no gate checks, ledger of the judgements it used or PPO curves" in page.text
    assert service.training().info == "1 run, newest first. Click a run to open its page."
