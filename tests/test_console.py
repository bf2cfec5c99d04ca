"""The maintainers' console driven through the real server (HTTP, like the browser does).

Console events are ``api_visibility="private"``: ``gradio_client`` cannot see or call them,
but Gradio still runs them when posted to ``/gradio_api/run/<api_name>`` or
``/gradio_api/queue/join`` with a ``fn_index``.  So the tests (a) prove every console
endpoint refuses an anonymous call on every one of those routes, (b) call each handler
function directly with a bad token, and (c) drive the logged-in flows over raw HTTP with a
session hash, exactly as the browser does.
"""

from __future__ import annotations

import csv
import json
import sqlite3
import uuid

import gradio as gr
import httpx
import pytest

from tests.apphelpers import app_settings, launch_app

PASSWORD = "console-test-pw"


def populate(store, registry, model_path: str) -> dict:
    """A few judgements through the store API: two versions, comparisons, an edit, ratings."""
    registry.register_version(version_id="v2", path=model_path, kind="ppo", parent_id="sft", note="test")
    ids: dict[str, str] = {}
    store.ensure_session("sess-alice", user="alice")
    store.ensure_session("sess-bob", user="bob")
    for n, (sid, question) in enumerate([("sess-alice", "What is the capital of France?"),
                                         ("sess-bob", "Write a haiku about rain"),
                                         ("sess-alice", "Explain recursion briefly")]):
        conv = store.start_conversation(sid, "You are a helpful AI assistant.")
        ctx = [{"role": "system", "content": "You are a helpful AI assistant."}, {"role": "user", "content": question}]
        store.set_message(conv, 1, "user", question)
        ga = store.record_generation(session_id=sid, conversation_id=conv, turn=2, context=ctx,
                                     content=f"answer A{n}", model_version="sft",
                                     sampling={"temperature": 0.7, "top_p": 0.9, "seed": n}, prompt_tokens=20,
                                     completion_tokens=8, ttft_ms=12.0, latency_ms=80.0, finish_reason="stop")
        gb = store.record_generation(session_id=sid, conversation_id=conv, turn=2, context=ctx,
                                     content=f"answer B{n}", model_version="v2",
                                     sampling={"temperature": 0.7, "top_p": 0.9, "seed": n + 10}, prompt_tokens=20,
                                     completion_tokens=9, ttft_ms=11.0, latency_ms=70.0, finish_reason="stop")
        comp = store.open_comparison(session_id=sid, conversation_id=conv, turn=2, a_generation_id=ga,
                                     b_generation_id=gb)
        store.decide_comparison(comp, ["b", "a", "both_bad"][n], sid)
        ids[f"comparison{n}"] = comp
        ids[f"rating{n}"] = store.record_rating(session_id=sid, generation_id=ga, thumb=["down", "up", "down"][n],
                                                reasons=[["inaccurate"], [], ["too long"]][n],
                                                comment=["wrong city", "", ""][n])
        if n == 1:
            ids["edit"] = store.record_edit(session_id=sid, conversation_id=conv, turn=2, generation_id=ga,
                                            rewrite="Rain on the window")
    return ids


class RawConsole:
    """What the browser does: POSTs to the private endpoints with one session hash."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.session_hash = uuid.uuid4().hex
        self.http = httpx.Client(timeout=60)
        cfg = self.http.get(self.url + "/config").json()
        states = {c["id"] for c in cfg["components"] if c.get("type") == "state"}
        self.inputs = {d["api_name"]: [i in states for i in d["inputs"]] for d in cfg["dependencies"]}

    def call(self, name: str, *data) -> tuple[bool, list | str]:
        """``data``: the values of the non-State inputs; State inputs are sent as null, as the
        browser does (the server keeps their values per session)."""
        values = iter(data)
        full = [None if is_state else next(values) for is_state in self.inputs[f"console_{name}"]]
        r = self.http.post(f"{self.url}/gradio_api/run/console_{name}",
                           json={"data": full, "session_hash": self.session_hash})
        body = r.json()
        if r.status_code == 200 and "data" in body:
            return True, body["data"]
        return False, str(body.get("error") or body)

    def ok(self, name: str, *data) -> list:
        ok, out = self.call(name, *data)
        assert ok, f"{name} failed: {out}"
        return out


NO_FILTERS = ["", "", [], "", "", "", "any", "all", ""]


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    data = tmp_path_factory.mktemp("console-app")
    url, ctx, close = launch_app(app_settings(data, tiny_model_dir, admin_password=PASSWORD))
    ids = populate(ctx.store, ctx.registry, str(tiny_model_dir))
    yield url, ctx, ids
    close()


def _console_deps(url: str) -> list[dict]:
    cfg = httpx.get(url.rstrip("/") + "/config").json()
    deps = [d for d in cfg["dependencies"] if str(d.get("api_name") or "").startswith("console_")]
    assert len(deps) > 20
    return deps


def test_console_endpoints_hidden_from_public_api(app):
    from gradio_client import Client

    url, _, _ = app
    deps = _console_deps(url)
    assert all(d["api_visibility"] == "private" for d in deps)
    client = Client(url, verbose=False)
    named = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert not [n for n in named if "console" in n]
    for d in deps:
        with pytest.raises(ValueError):
            client.predict("admin", PASSWORD, api_name="/" + d["api_name"])
        with pytest.raises(ValueError):
            client.predict("x", fn_index=d["id"])


def test_every_console_endpoint_refuses_anonymous_raw_calls(app):
    """Hidden is not refused: the private handlers still run over raw HTTP, so each one must
    refuse by itself (here by api_name on /run and by fn_index on the queue)."""
    url, ctx, _ = app
    before = ctx.store.query("SELECT COUNT(*) AS n FROM review_log")[0]["n"]
    served = ctx.registry.served_version()
    for d in _console_deps(url):
        anon = RawConsole(url)
        data = [None] * len(d["inputs"])
        if d["api_name"] == "console_login":
            data = ["admin", "wrong-password"]
        ok, out = anon.call(d["api_name"].removeprefix("console_"), *data[:sum(
            not s for s in anon.inputs[d["api_name"]])] + [None] * len(data))
        assert not ok, f"{d['api_name']} answered an anonymous call: {out}"
        # the queue route, by fn_index
        sh = uuid.uuid4().hex
        r = httpx.post(url.rstrip("/") + "/gradio_api/queue/join",
                       json={"data": data, "fn_index": d["id"], "session_hash": sh, "trigger_id": None})
        assert r.status_code == 200
        with httpx.stream("GET", url.rstrip("/") + f"/gradio_api/queue/data?session_hash={sh}", timeout=60) as s:
            for line in s.iter_lines():
                if line.startswith("data:") and "process_completed" in line:
                    msg = json.loads(line[5:])
                    assert msg["success"] is False, f"{d['api_name']} ran for an anonymous queue call"
                    break
    assert ctx.store.query("SELECT COUNT(*) AS n FROM review_log")[0]["n"] == before
    assert ctx.registry.served_version() == served


def test_every_handler_checks_the_token(app):
    _, ctx, ids = app
    handlers = ctx.extras["console_handlers"]
    assert len(handlers) >= 20
    for name, fn in handlers.items():
        if name == "login":
            with pytest.raises(gr.Error):
                fn("admin", "wrong")
            continue
        for bad in ("", None, "forged-token"):
            with pytest.raises(gr.Error, match="log in"):
                fn(bad, f"comparison:{ids['comparison0']}", "reason", *NO_FILTERS)
    assert not ctx.store.comparison(ids["comparison0"])["excluded"]


def test_login_filter_open_exclude_export_rollback(app, tmp_path):
    url, ctx, ids = app
    c = RawConsole(url)
    assert not c.call("login", "admin", "nope")[0]
    out = c.ok("login", "admin", PASSWORD)
    assert out[0] is None  # the token stays server-side (gr.State is never sent to the browser)
    assert "admin" in out[3]

    # filter: thumbs down with the "inaccurate" tag -> exactly rating0
    table = c.ok("list", "", "", ["down"], "inaccurate", "", "", "any", "all", "")[0]
    refs = [row[0] for row in table["data"]]
    assert refs == [f"rating:{ids['rating0']}"]
    # user filter + kind
    table = c.ok("list", "", "", ["a", "b", "both_bad"], "", "", "alice", "any", "all", "")[0]
    assert {row[0] for row in table["data"]} == {f"comparison:{ids['comparison0']}", f"comparison:{ids['comparison2']}"}
    # free text
    table = c.ok("list", "", "", [], "", "", "", "any", "all", "haiku")[0]
    assert {row[0].split(":")[0] for row in table["data"]} == {"comparison", "rating"}

    # open one record: the conversation, both answers, versions and sampling
    ref = f"comparison:{ids['comparison0']}"
    detail = c.ok("open", ref)[0]
    assert "capital of France" in detail and "answer A0" in detail and "answer B0" in detail
    assert "v2" in detail and "temperature" in detail and "B is better" in detail

    # exclude it with a reason -> the retrain snapshot no longer has it
    assert ids["comparison0"] in {r["id"] for r in ctx.store.usable_comparisons()}
    assert not c.call("exclude", ref, "")[0]  # a reason is required
    out = c.ok("exclude", ref, "test data")
    assert "EXCLUDED" in out[0]
    assert ids["comparison0"] not in {r["id"] for r in ctx.store.usable_comparisons()}
    log = ctx.store.query("SELECT * FROM review_log WHERE record_id = ?", (ids["comparison0"],))
    assert log[-1]["actor"] == "admin" and log[-1]["reason"] == "test data" and log[-1]["action"] == "exclude"
    table = c.ok("list", "", "", [], "", "", "", "any", "excluded", "")[0]
    assert [row[0] for row in table["data"]] == [ref]

    # exports leave the excluded record out
    out = c.ok("export_csv", False, *NO_FILTERS)
    text = httpx.get(out[0]["url"]).text
    rows = list(csv.DictReader(text.splitlines()))
    assert ids["comparison0"] not in {r["id"] for r in rows} and ids["rating0"] in {r["id"] for r in rows}
    out = c.ok("export_trl", False, *NO_FILTERS)
    lines = [json.loads(x) for x in httpx.get(out[0]["url"]).text.splitlines()]
    assert len(lines) == 2  # comparison1 (a) and the edit; comparison2 is both_bad, comparison0 excluded
    assert all(set(x) == {"prompt", "chosen", "rejected"} for x in lines)
    out = c.ok("export_db")
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(httpx.get(out[0]["url"]).content)
    with sqlite3.connect(copy) as conn:
        assert conn.execute("SELECT excluded FROM comparisons WHERE id = ?", (ids["comparison0"],)).fetchone() == (1,)

    # restore
    c.ok("restore", ref, "")
    assert ids["comparison0"] in {r["id"] for r in ctx.store.usable_comparisons()}

    # roll back needs the confirmation step
    assert ctx.registry.served_version() == "sft"
    c.ok("ask_serve", "v2", "promote", "try v2")
    assert ctx.registry.served_version() == "sft"
    c.ok("confirm_serve")
    assert ctx.registry.served_version() == "v2"
    c.ok("ask_serve", "sft", "rollback", "v2 was worse")
    c.ok("confirm_serve")
    served = ctx.registry.served()
    assert (served["version_id"], served["action"], served["actor"], served["reason"]) == (
        "sft", "rollback", "admin", "v2 was worse")

    # the other views answer
    assert "scheduler not running" in c.ok("training_tab")[0]
    assert "no candidate on trial" in c.ok("training_tab")[0]
    run_id = ctx.registry.create_run("manual")  # a candidate on trial: its progress is shown
    ctx.registry.start_canary(run_id=run_id, version_id="v2", parent_id="sft")
    text = c.ok("training_tab")[0]
    assert "**v2** on trial against sft" in text and "0 wins, 0 losses, 0 ties" in text
    ctx.registry.end_canary(run_id, promote=False, reason="test over", decision={})
    assert ctx.registry.run(run_id)["status"] == "rejected" and ctx.registry.served_version() == "sft"
    board = c.ok("leaderboard")[0]
    assert {row[0] for row in board["data"]} == {"sft", "v2"}
    c.ok("charts")

    # log out: the session's token no longer works
    c.ok("logout")
    assert not c.call("list", *NO_FILTERS)[0]
