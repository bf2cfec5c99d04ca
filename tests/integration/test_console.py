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
import html
import json
import os
import re
import sqlite3
import tempfile
import uuid
from pathlib import Path

import gradio as gr
import httpx
import pytest

from assistant import console
from feedback import auth, review
from tests.factories import PASSWORD, RawConsole, app_settings, launch_app, populate, wait_for

NO_FILTERS = ["", "", [], "", "", "", "any", "all", ""]
REFUSED_LINE = "**Login refused:** wrong user name or password."


def refs(table: dict) -> list[str]:
    """The record column of a Feedback table as the browser gets it."""
    column = table["headers"].index("record")
    return [row[column] for row in table["data"]]


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
        if d["api_name"] == "console_login_refused":  # the line under the login form: no data, no change
            assert anon.ok("login_refused") == [REFUSED_LINE, ""]
            continue
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
    assert "admin" in out[1]

    # filter: thumbs down with the "inaccurate" tag -> exactly rating0
    table = c.ok("list", "", "", ["down"], "inaccurate", "", "", "any", "all", "")[0]
    assert refs(table) == [f"rating:{ids['rating0']}"]
    # user filter + kind
    table = c.ok("list", "", "", ["a", "b", "both_bad"], "", "", "alice", "any", "all", "")[0]
    assert set(refs(table)) == {f"comparison:{ids['comparison0']}", f"comparison:{ids['comparison2']}"}
    # free text
    table = c.ok("list", "", "", [], "", "", "", "any", "all", "haiku")[0]
    assert {ref.split(":")[0] for ref in refs(table)} == {"comparison", "rating"}

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
    assert refs(table) == [ref]

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
    plot, board = c.ok("leaderboard")[:2]
    assert {row[0] for row in board["data"]} == {"sft", "v2"} and plot["type"] == "matplotlib"
    assert "No reward model has been trained yet" in c.ok("quality")[0]
    c.ok("charts")

    # log out: the session's token no longer works
    c.ok("logout")
    assert not c.call("list", *NO_FILTERS)[0]


# ----------------------------------------------------------------------------- hostile input and revocation
EVIL_IMAGE = "![](https://evil.example/p.png)"


def hostile_record(store) -> dict:
    """A judged turn whose user text carries Markdown that would fetch or link elsewhere."""
    sid = "sess-mallory"
    store.ensure_session(sid, user="mallory")
    conv = store.start_conversation(sid, "You are a helpful AI assistant.")
    question = f"Describe this {EVIL_IMAGE} please"
    ctx = [{"role": "system", "content": "You are a helpful AI assistant."}, {"role": "user", "content": question}]
    store.set_message(conv, 1, "user", question)
    gens = [store.record_generation(session_id=sid, conversation_id=conv, turn=2, context=ctx, content=text,
                                    model_version="sft", sampling={"seed": n}, prompt_tokens=5,
                                    completion_tokens=5, ttft_ms=1.0, latency_ms=2.0, finish_reason="stop")
            for n, text in enumerate(["[click me](https://evil.example/go) *bold* `code`",
                                      "<img src=https://evil.example/q.png> # not a heading"])]
    comp = store.open_comparison(session_id=sid, conversation_id=conv, turn=2, a_generation_id=gens[0],
                                 b_generation_id=gens[1])
    store.decide_comparison(comp, "a", sid)
    rating = store.record_rating(session_id=sid, generation_id=gens[0], thumb="down", reasons=["inaccurate"],
                                 comment=f"see {EVIL_IMAGE}")
    return {"comparison": comp, "rating": rating}


def _rendered(markdown_text: str) -> str:
    """HTML as a CommonMark renderer (raw HTML allowed, as in gr.Markdown) makes of it."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark").render(markdown_text)


def test_record_view_renders_user_text_inert(app):
    url, ctx, _ = app
    ids = hostile_record(ctx.store)
    c = RawConsole(url)
    c.ok("login", "admin", PASSWORD)
    texts = {}
    for ref in (f"comparison:{ids['comparison']}", f"rating:{ids['rating']}"):
        html_out = _rendered(c.ok("open", ref)[0])
        assert "<img" not in html_out and "<a " not in html_out
        assert "<em>bold" not in html_out and "<code>code" not in html_out and "<h1" not in html_out
        texts[ref.split(":")[0]] = html.unescape(re.sub(r"<[^>]+>", "", html_out))
    # shown literally, as the user typed it
    assert EVIL_IMAGE in texts["comparison"] and f"see {EVIL_IMAGE}" in texts["rating"]
    assert "[click me](https://evil.example/go) *bold* `code`" in texts["comparison"]
    assert "<img src=https://evil.example/q.png> # not a heading" in texts["comparison"]


@pytest.mark.skipif(not Path(os.environ.get("CHROMIUM", "/usr/bin/chromium")).exists(), reason="no chromium")
def test_record_view_fetches_nothing_in_a_real_browser(app):
    sync_api = pytest.importorskip("playwright.sync_api")
    url, ctx, _ = app
    ids = hostile_record(ctx.store)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=os.environ.get("CHROMIUM", "/usr/bin/chromium"), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1800})
            page.set_default_timeout(30_000)
            fetched: list[str] = []
            page.on("request", lambda r: fetched.append(r.url))
            page.goto(url.rstrip("/") + "/console")
            page.locator("#console-user input, #console-user textarea").first.fill("admin")
            page.locator("#console-password input").first.fill(PASSWORD)
            page.locator("#console-login").click()
            page.get_by_role("tab", name="Feedback").click()
            sync_api.expect(page.locator("#console-table")).to_contain_text("comparison:", timeout=30_000)
            page.locator("#console-ref textarea, #console-ref input").first.fill(f"comparison:{ids['comparison']}")
            page.locator("#console-open").click()
            detail = page.locator("#console-detail")
            sync_api.expect(detail).to_contain_text("Describe this")
            page.wait_for_timeout(500)
            assert detail.locator("img").count() == 0 and detail.locator("a").count() == 0
            assert EVIL_IMAGE in detail.inner_text()
            assert not [u for u in fetched if "evil.example" in u]
        finally:
            browser.close()


def test_logout_and_user_removal_revoke_tokens(app):
    _, ctx, _ = app
    h = ctx.extras["console_handlers"]
    token = h["login"]("admin", PASSWORD)[0]
    h["list_first"](token, *NO_FILTERS)
    h["logout"](token)
    with pytest.raises(gr.Error, match="log in"):
        h["list_first"](token, *NO_FILTERS)
    auth.add_user(ctx.store, "maria", "long enough pw")
    token = h["login"]("maria", "long enough pw")[0]
    h["list_first"](token, *NO_FILTERS)
    auth.remove_user(ctx.store, "maria")
    with pytest.raises(gr.Error, match="log in"):
        h["list_first"](token, *NO_FILTERS)


def test_console_lockout_is_per_client_address(app):
    """Guesses over HTTP (from 127.0.0.1) lock that address out for the name, not the name
    everywhere: the same login from another address (here a direct call, no address) works."""
    url, ctx, _ = app
    auth.add_user(ctx.store, "lena", "long enough pw")
    c = RawConsole(url)
    for i in range(auth.MAX_FAILURES):
        assert not c.call("login", "lena", f"guess {i}")[0]
    ok, error = c.call("login", "lena", "long enough pw")
    assert not ok and "too many" in error
    # the page's line under the form gives this browser session its own reason, and no other's
    assert "too many failed logins" in c.ok("login_refused")[0]
    assert RawConsole(url).ok("login_refused")[0] == REFUSED_LINE
    token = ctx.extras["console_handlers"]["login"]("lena", "long enough pw")[0]
    assert console.get_auth(ctx).check(token) == "lena"
    auth.remove_user(ctx.store, "lena")


def _export_files() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("console-export-*/**/feedback-*"))


def test_exports_expire_and_leave_nothing_behind(app, monkeypatch):
    url, ctx, _ = app
    monkeypatch.setattr(console, "EXPORT_TTL_S", 3.0)
    before = _export_files()
    c = RawConsole(url)
    c.ok("login", "admin", PASSWORD)
    links = []
    for name, args in (("export_csv", (False, *NO_FILTERS)), ("export_trl", (False, *NO_FILTERS)),
                       ("export_db", ())):
        links.append(c.ok(name, *args)[0]["url"])
        assert httpx.get(links[-1]).status_code == 200  # downloadable at first
    assert _export_files() <= before  # no working copy left outside what Gradio serves
    assert wait_for(lambda: all(httpx.get(link).status_code in (403, 404) for link in links), timeout_s=30)
    assert not [link for link in links if Path(link.split("file=", 1)[1]).exists()]  # deleted, not just hidden


def test_database_copy_has_no_password_hashes_or_opted_out_sessions(app, tmp_path):
    url, ctx, ids = app
    auth.add_user(ctx.store, "omar", "long enough pw")
    digest = auth.user_row(ctx.store, "omar")["password_hash"].rsplit("$", 1)[-1]
    ctx.store.ensure_session("sess-olga", user="olga")
    conv = ctx.store.start_conversation("sess-olga", "You are a helpful AI assistant.")
    ctx.store.set_message(conv, 1, "user", "olga's private question about tulips")
    ctx.store.set_opt_out("sess-olga", True)
    c = RawConsole(url)
    c.ok("login", "admin", PASSWORD)
    copy = tmp_path / "copy.sqlite"
    copy.write_bytes(httpx.get(c.ok("export_db")[0]["url"]).content)
    raw = copy.read_bytes()
    assert digest.encode() not in raw and b"tulips" not in raw and b"sess-olga" not in raw
    with sqlite3.connect(copy) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT COUNT(*) FROM users").fetchone() == (0,)
        assert conn.execute("SELECT COUNT(*) FROM comparisons WHERE id = ?", (ids["comparison1"],)).fetchone() == (1,)
    auth.remove_user(ctx.store, "omar")


@pytest.mark.parametrize("module", ["console.py", "console_service.py"])
def test_console_has_no_sql(module):
    """SQL lives in feedback/ behind named functions (the console and its service call those)."""
    source = (Path(__file__).resolve().parents[2] / "assistant" / module).read_text()
    sql = re.compile(r"\b(SELECT|UPDATE|INSERT|DELETE)\b.*\b(FROM|SET|INTO)\b|\.query\(|\.execute\(")
    assert [line for line in source.splitlines() if sql.search(line)] == []


# ----------------------------------------------------------------------------- the first screen
def _visible(update) -> bool:
    """Whether a show/hide update the browser gets shows its component."""
    assert isinstance(update, dict) and "visible" in update, update
    return bool(update["visible"])


def test_first_screen_with_data_over_http(app):
    url, ctx, _ = app
    c = RawConsole(url)
    assert not c.call("enter")[0] and not c.call("overview")[0]  # logged out: refused
    c.ok("login", "admin", PASSWORD)
    login_box, main, password, line, todo, *cards = c.ok("enter")
    assert (_visible(login_box), _visible(main), password, line) == (False, True, "", "")
    assert todo.startswith("#### Look at first") and cards == c.ok("overview")[1:]
    total = review.count(ctx.store)
    assert total >= 7 and f"{total} in all" in cards[0] and "today" in cards[0]
    assert "ratings in the last 7 days" in cards[1] and "%" in cards[1]
    assert cards[2].startswith("**Last training run**") and cards[3].startswith("**Label quality**")


def test_first_screen_and_empty_tabs_without_data_over_http(tmp_path, tiny_model_dir):
    url, ctx, close = launch_app(app_settings(tmp_path, tiny_model_dir, admin_password=PASSWORD))
    try:
        c = RawConsole(url)
        c.ok("login", "admin", PASSWORD)
        todo, *cards = c.ok("overview")
        assert "No judgements yet" in todo
        assert cards == ["**Judgements**\n\nNone yet.", "**Thumbs down**\n\nNo thumbs in the last 7 days.",
                         "**Last training run**\n\nNo run yet.",
                         "**Label quality**\n\nNo queue yet: it fills after the first retrain."]
        table, _, _, info, table_box, bar = c.ok("list", *NO_FILTERS)
        assert info.startswith("No judgements yet") and not _visible(table_box) and table["data"] in ([], [[]])
        assert bar["label"] == "Filters · none (every judgement)"
        schedule, _, _, _, runs_info, runs_box = c.ok("training_tab")
        assert runs_info.startswith("No training run yet") and not _visible(runs_box)
        served, _, _, _, serve_info, serve_row, history_box = c.ok("versions_tab")
        assert "Serving **sft**" in served and serve_info.startswith("Only one version exists")
        assert not _visible(serve_row) and _visible(history_box)
        *_, board_info, board_box = c.ok("leaderboard")
        assert board_info.startswith("No A/B votes") and not _visible(board_box)
        *_, charts_info, charts_box = c.ok("charts")
        assert charts_info.startswith("No judgements yet") and not _visible(charts_box)
    finally:
        close()
