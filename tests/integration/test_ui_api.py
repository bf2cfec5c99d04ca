"""The public chat API, driven through a real Gradio server with gradio_client, and the
SQLite rows each call leaves (checked field by field)."""

from __future__ import annotations

import inspect
import json
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from assistant.chat import STYLE_HINTS
from assistant.client import message_text as text_of
from tests.factories import app_settings, launch_app

PUBLIC = {"/chat", "/regenerate", "/vote", "/compare_more", "/rank", "/rate", "/edit", "/edit_message", "/opt_out",
          "/new_chat", "/stop", "/conversations", "/open_conversation", "/rename_conversation",
          "/delete_conversation", "/delete_my_data"}


@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    settings = app_settings(tmp_path_factory.mktemp("app-data"), tiny_model_dir, max_message_chars=12000,
                            regenerate_style_hints=True,
                            system_prompt="You are a test assistant.")
    url, ctx, close = launch_app(settings)
    yield url, ctx
    close()


@pytest.fixture
def client(app):
    return Client(app[0], verbose=False)


def chat(client: Client, message: str, **kw):
    args = dict(system_prompt=kw.get("system_prompt", "You are a test assistant."),
                temperature=kw.get("temperature", 0.7), top_p=kw.get("top_p", 0.9),
                max_new_tokens=kw.get("max_new_tokens", 12), seed=kw.get("seed", -1))
    job = client.submit(message, *args.values(), api_name="/chat")
    history, version, status = job.result()
    return history, version, status, job


def conversation_of(store, message: str) -> dict:
    rows = store.query("SELECT c.* FROM conversations c JOIN messages m ON m.conversation_id = c.id "
                       "WHERE m.role = 'user' AND m.content = ?", (message,))
    assert len(rows) == 1, rows
    return rows[0]


def counts(store) -> dict:
    c = store.counts()
    c["messages"] = store.db["messages"].count
    return c


def test_public_api_is_exactly_the_chat_endpoints(client):
    named = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert named == PUBLIC


def test_chat_streams_and_stores_the_turn(app, client):
    url, ctx = app
    store = ctx.store
    history, version, status, job = chat(client, "hello unique-1", temperature=0.5, top_p=0.8, seed=7)
    assert len(job.outputs()) > 2  # streamed: several partial answers before the final one
    assert [m["role"] for m in history] == ["user", "assistant"]
    assert text_of(history[0]) == "hello unique-1"
    answer = text_of(history[1])
    assert answer
    assert version == "Answering: **the original assistant** (`sft`)"

    conv = conversation_of(store, "hello unique-1")
    assert conv["system_prompt"] == "You are a test assistant."
    session = store.session(conv["session_id"])
    assert session["opt_out"] == 0 and session["client"]
    msgs = store.conversation_messages(conv["id"])
    assert [(m["turn"], m["role"]) for m in msgs] == [(0, "user"), (1, "assistant")]
    assert msgs[1]["content"] == answer
    gen = store.generation(msgs[1]["generation_id"])
    assert gen["session_id"] == conv["session_id"] and gen["conversation_id"] == conv["id"]
    assert gen["turn"] == 1 and gen["content"] == answer and gen["model_version"] == "sft"
    assert json.loads(gen["sampling"]) == {"temperature": 0.5, "top_p": 0.8, "max_new_tokens": 12, "seed": 7}
    assert json.loads(gen["context"]) == [{"role": "system", "content": "You are a test assistant."},
                                          {"role": "user", "content": "hello unique-1"}]
    assert gen["prompt_tokens"] > 5 and 1 <= gen["completion_tokens"] <= 12
    assert gen["finish_reason"] in ("stop", "length")
    assert gen["ttft_ms"] > 0 and gen["latency_ms"] >= gen["ttft_ms"]

    # multi-turn: the second answer's context holds the first exchange
    history, *_ = chat(client, "second unique-1")
    assert len(history) == 4
    gen2 = store.generation(store.conversation_messages(conv["id"])[3]["generation_id"])
    assert json.loads(gen2["context"])[1:] == [{"role": "user", "content": "hello unique-1"},
                                               {"role": "assistant", "content": answer},
                                               {"role": "user", "content": "second unique-1"}]


@pytest.mark.parametrize("verdict", ["a", "b", "tie", "both_bad"])
def test_regenerate_and_each_verdict(app, client, verdict):
    store = app[1].store
    message = f"compare me {verdict}"
    history, *_ = chat(client, message, seed=1)
    a_first = text_of(history[1])
    a_text, b_text, version, status = client.predict(0.9, 0.9, 12, 2, api_name="/regenerate")
    assert inspect.cleandoc(a_text) == a_first and b_text and "Which answer is better?" in status  # Chatbot: cleandoc
    conv = conversation_of(store, message)
    comp = store.query("SELECT * FROM comparisons WHERE conversation_id = ?", (conv["id"],))
    assert len(comp) == 1
    comp = comp[0]
    assert comp["verdict"] is None and comp["source"] == "regenerate" and comp["turn"] == 1
    shown = inspect.cleandoc  # A and B are Markdown views, which dedent (as the Chatbot does)
    assert (shown(comp["a_text"]), shown(comp["b_text"])) == (a_text, b_text)
    kept_gen = store.conversation_messages(conv["id"])[1]["generation_id"]
    assert comp["a_generation_id"] == kept_gen
    b_gen = store.generation(comp["b_generation_id"])
    assert shown(b_gen["content"]) == b_text and b_gen["turn"] == 1 and b_gen["context"] == comp["context"]
    b_sampling = json.loads(b_gen["sampling"])
    assert b_sampling.pop("style_hint") in STYLE_HINTS  # B is written in another style (hidden hint)
    assert b_sampling == {"temperature": 0.9, "top_p": 0.9, "max_new_tokens": 12, "seed": 2}

    history, status = client.predict(verdict, api_name="/vote")
    expected = {"a": "A is better", "b": "B is better", "tie": "tie", "both_bad": "both are bad"}[verdict]
    assert status.startswith(f"Recorded: {expected}")
    row = store.comparison(comp["id"])
    assert row["verdict"] == verdict and row["decided_at"]
    kept = comp["b_text"] if verdict == "b" else comp["a_text"]
    assert text_of(history[-1]) == shown(kept)  # as the Chatbot shows it
    msg = store.conversation_messages(conv["id"])[1]
    assert msg["content"] == kept
    assert msg["generation_id"] == (comp["b_generation_id"] if verdict == "b" else kept_gen)

    # the kept answer continues the conversation ...
    chat(client, f"follow-up {verdict}", seed=5)
    follow = store.conversation_messages(conv["id"])[3]
    assert json.loads(store.generation(follow["generation_id"])["context"])[2] == {"role": "assistant",
                                                                                   "content": kept}
    # ... and regenerating after a verdict compares the next answer with the kept one
    a2, b2, _, _ = client.predict(0.9, 0.9, 12, 3, api_name="/regenerate")
    assert a2 == shown(follow["content"])
    client.predict("a", api_name="/vote")


def test_invalid_votes_change_nothing(app, client):
    store = app[1].store
    with pytest.raises(AppError, match="no comparison"):
        client.predict("a", api_name="/vote")
    chat(client, "vote twice")
    client.predict(0.7, 0.9, 12, -1, api_name="/regenerate")
    with pytest.raises(AppError, match="verdict must be"):
        client.predict("maybe", api_name="/vote")
    client.predict("tie", api_name="/vote")
    conv = conversation_of(store, "vote twice")
    before = store.query("SELECT * FROM comparisons WHERE conversation_id = ?", (conv["id"],))
    msgs_before = store.conversation_messages(conv["id"])
    with pytest.raises(AppError, match="already decided"):
        client.predict("b", api_name="/vote")
    assert store.query("SELECT * FROM comparisons WHERE conversation_id = ?", (conv["id"],)) == before
    assert store.conversation_messages(conv["id"]) == msgs_before
    assert before[0]["verdict"] == "tie"


def test_thumbs_with_reasons_and_comment(app, client):
    store = app[1].store
    chat(client, "rate me 1")
    chat(client, "rate me 2")
    conv = conversation_of(store, "rate me 1")
    msgs = store.conversation_messages(conv["id"])
    status = client.predict(1, "down", ["inaccurate", "too long"], "wrong year", api_name="/rate")
    assert status == "Recorded: 👎 for answer 1 (inaccurate, too long)."
    client.predict(0, "up", [], "", api_name="/rate")
    rows = store.query("SELECT * FROM ratings WHERE conversation_id = ? ORDER BY created_at", (conv["id"],))
    assert len(rows) == 2
    down, up = rows
    gen1 = store.generation(msgs[1]["generation_id"])
    assert (down["generation_id"], down["turn"], down["thumb"]) == (gen1["id"], 1, "down")
    assert json.loads(down["reasons"]) == ["inaccurate", "too long"] and down["comment"] == "wrong year"
    assert down["answer_text"] == gen1["content"] and down["context"] == gen1["context"]
    assert down["session_id"] == conv["session_id"]
    assert (up["generation_id"], up["turn"], up["thumb"], json.loads(up["reasons"]), up["comment"]) == (
        msgs[3]["generation_id"], 3, "up", [], "")
    with pytest.raises(AppError, match="no answer 3"):
        client.predict(3, "up", [], "", api_name="/rate")
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict(0, "down", ["boring"], "", api_name="/rate")
    assert store.db["ratings"].count_where("conversation_id = ?", [conv["id"]]) == 2


def test_a_rating_posted_twice_is_stored_once(app, client):
    """A double submit, or a retry of a rating that was stored, is refused as a duplicate;
    another thumb, reason or comment on the same answer is a new rating."""
    store = app[1].store
    chat(client, "rate me twice")
    conv = conversation_of(store, "rate me twice")
    assert client.predict(0, "down", ["too long"], "meh", api_name="/rate").startswith("Recorded")
    with pytest.raises(AppError, match="this rating was already saved"):
        client.predict(0, "down", ["too long"], "meh", api_name="/rate")
    with pytest.raises(AppError, match="already saved"):  # the same reasons, repeated and reordered
        client.predict(1, "down", ["too long", "too long"], "meh", api_name="/rate")
    assert client.predict(0, "down", ["too long"], "", api_name="/rate").startswith("Recorded")
    assert client.predict(0, "up", [], "", api_name="/rate").startswith("Recorded")
    rows = store.query("SELECT thumb, reasons, comment FROM ratings WHERE conversation_id = ? ORDER BY created_at",
                       (conv["id"],))
    assert [(r["thumb"], json.loads(r["reasons"]), r["comment"]) for r in rows] == [
        ("down", ["too long"], "meh"), ("down", ["too long"], ""), ("up", [], "")]


def test_a_rating_sent_while_an_answer_is_written_is_stored_once(app, client):
    """A 👎 sent mid-stream is stored (and says so); its retry is refused, not stored twice."""
    store = app[1].store
    chat(client, "rate during the next answer")
    conv = conversation_of(store, "rate during the next answer")
    job = client.submit("the next question", "You are a test assistant.", 0.7, 0.9, 48, -1, api_name="/chat")
    # the same session: its ratings are taken while its answer is written
    assert client.predict(1, "down", [], "", api_name="/rate") == "Recorded: 👎 for answer 1."
    with pytest.raises(AppError, match="already saved"):
        client.predict(1, "down", [], "", api_name="/rate")
    job.result()
    assert store.db["ratings"].count_where("conversation_id = ?", [conv["id"]]) == 1


def test_edit_is_preferred_and_continues(app, client):
    store = app[1].store
    history, *_ = chat(client, "edit me")
    shown = text_of(history[1])  # Gradio's Chatbot shows it through inspect.cleandoc (indentation dropped)
    history, status = client.predict("A better answer, written by me.", api_name="/edit")
    assert status.startswith("Recorded:")
    assert text_of(history[-1]) == "A better answer, written by me."
    conv = conversation_of(store, "edit me")
    msgs = store.conversation_messages(conv["id"])
    edit = store.query("SELECT * FROM comparisons WHERE conversation_id = ?", (conv["id"],))[0]
    assert (edit["source"], edit["verdict"], edit["turn"]) == ("edit", "edit", 1)
    model_answer = edit["a_text"]
    assert inspect.cleandoc(model_answer) == shown and edit["b_text"] == "A better answer, written by me."
    assert edit["a_generation_id"] == store.generation(edit["a_generation_id"])["id"]
    assert store.generation(edit["a_generation_id"])["content"] == model_answer
    assert msgs[1]["content"] == "A better answer, written by me." and msgs[1]["generation_id"] is None
    chat(client, "after edit")
    gen = store.generation(store.conversation_messages(conv["id"])[3]["generation_id"])
    assert json.loads(gen["context"])[2]["content"] == "A better answer, written by me."
    with pytest.raises(AppError, match="empty"):
        client.predict("   ", api_name="/edit")


def test_opt_out_is_stored_and_honoured(app, client):
    store = app[1].store
    chat(client, "opt out me")
    client.predict(0.7, 0.9, 12, -1, api_name="/regenerate")
    client.predict("a", api_name="/vote")
    conv = conversation_of(store, "opt out me")
    comp_id = store.query("SELECT id FROM comparisons WHERE conversation_id = ?", (conv["id"],))[0]["id"]
    assert comp_id in {c["id"] for c in store.usable_comparisons()}
    status = client.predict(True, api_name="/opt_out")
    assert "will not be used" in status
    assert store.session(conv["session_id"])["opt_out"] == 1
    assert comp_id not in {c["id"] for c in store.usable_comparisons()}
    client.predict(False, api_name="/opt_out")
    assert store.session(conv["session_id"])["opt_out"] == 0


def test_new_chat_starts_a_new_conversation(app, client):
    store = app[1].store
    chat(client, "first conversation")
    history, status = client.predict(api_name="/new_chat")
    assert history == [] and status == "New chat started."
    history, *_ = chat(client, "second conversation")
    assert len(history) == 2
    c1, c2 = conversation_of(store, "first conversation"), conversation_of(store, "second conversation")
    assert c1["id"] != c2["id"] and c1["session_id"] == c2["session_id"]
    assert len(store.conversation_messages(c2["id"])) == 2


def test_bad_messages_are_refused_and_nothing_stored(app, client):
    store = app[1].store
    before = counts(store)
    for bad, why in [("", "type a message"), ("   \n ", "type a message"), ("x" * 12001, "too long"),
                     ("word " * 2400, "too long for the model")]:
        with pytest.raises(AppError, match=why):
            chat(client, bad)
    assert counts(store) == before
    history, *_ = chat(client, "still usable")  # the conversation goes on
    assert len(history) == 2


def test_markup_is_stored_verbatim_and_rendered_sanitized(app, client):
    store = app[1].store
    markup = "<script>alert(1)</script><img src=x onerror=alert(2)> **bold** `code`"
    history, *_ = chat(client, markup)
    assert text_of(history[0]) == markup
    conv = conversation_of(store, markup)
    assert store.conversation_messages(conv["id"])[0]["content"] == markup
    chatbot = next(c for c in client.config["components"] if c.get("props", {}).get("elem_id") == "chatbot")
    assert chatbot["props"]["sanitize_html"] is True and chatbot["props"]["allow_tags"] is False


def test_sessions_cannot_touch_each_other(app):
    store = app[1].store
    alice, mallory = Client(app[0], verbose=False), Client(app[0], verbose=False)
    chat(alice, "alice secret")
    alice.predict(0.7, 0.9, 12, -1, api_name="/regenerate")
    conv = conversation_of(store, "alice secret")
    before = store.query("SELECT * FROM comparisons WHERE session_id = ?", (conv["session_id"],))
    with pytest.raises(AppError, match="no comparison"):
        mallory.predict("b", api_name="/vote")
    with pytest.raises(AppError, match="no answer"):
        mallory.predict(0, "down", [], "", api_name="/rate")
    with pytest.raises(AppError, match="no answer"):
        mallory.predict("hijack", api_name="/edit")
    assert store.query("SELECT * FROM comparisons WHERE session_id = ?", (conv["session_id"],)) == before
    assert store.db["ratings"].count_where("session_id = ?", [conv["session_id"]]) == 0
    history, *_ = chat(mallory, "mallory here")
    assert "alice secret" not in json.dumps(history)
    assert conversation_of(store, "mallory here")["session_id"] != conv["session_id"]
    alice.predict("b", api_name="/vote")  # alice's own comparison is still hers to decide


def test_message_rate_limit(app, client):
    service = app[1].extras["chat_service"]
    old = service.message_limit.limit
    service.message_limit.limit = 2
    try:
        chat(client, "rl 1")
        chat(client, "rl 2")
        before = counts(app[1].store)
        with pytest.raises(AppError, match="too many messages"):
            chat(client, "rl 3")
        assert counts(app[1].store) == before
    finally:
        service.message_limit.limit = old


def test_stop_cancels_the_engine_request(app, client):
    url, ctx = app
    _, engine = ctx.holder.current()
    decode = engine.decoder.decode

    def slow_decode(tokens):  # makes a 1000-token answer long enough to stop for sure
        time.sleep(0.02)
        return decode(tokens)

    engine.decoder.decode = slow_decode
    try:
        job = client.submit("a long answer please", "", 0.7, 0.9, 1000, -1, api_name="/chat")
        while len(job.outputs()) < 3:
            assert not job.done(), job.result()
            time.sleep(0.05)
        assert client.predict(api_name="/stop") == "Stopping…"
        history, _, status = job.result()
    finally:
        engine.decoder.decode = decode
    assert status == "Stopped."
    assert engine.load == 0  # the slot is free, not only the Gradio event
    conv = conversation_of(ctx.store, "a long answer please")
    msgs = ctx.store.conversation_messages(conv["id"])
    gen = ctx.store.generation(msgs[1]["generation_id"])
    assert gen["finish_reason"] == "cancelled" and 1 <= gen["completion_tokens"] < 1000
    assert inspect.cleandoc(gen["content"]) == text_of(history[1])  # as the Chatbot shows it
    assert client.predict(api_name="/stop") == "Nothing to stop."


@pytest.mark.slow
def test_embedded_model_end_to_end(tmp_path, embedded_model_dir):
    settings = app_settings(tmp_path / "data", embedded_model_dir, max_new_tokens=64)
    url, ctx, close = launch_app(settings)
    try:
        client = Client(url, verbose=False)
        history, version, status = client.predict("What is the capital of France? Answer in one sentence.",
                                                  "You are a helpful AI assistant.", 0, 1, 64, -1,
                                                  api_name="/chat")
        answer = text_of(history[1])
        conv = conversation_of(ctx.store, "What is the capital of France? Answer in one sentence.")
        gen = ctx.store.generation(ctx.store.conversation_messages(conv["id"])[1]["generation_id"])
    finally:
        close()
    assert "Paris" in answer
    assert gen["finish_reason"] == "stop" and gen["completion_tokens"] < 64  # ended at end-of-turn
    assert status == ""


def test_past_chats_over_the_api_are_the_callers_own(app):
    store = app[1].store
    alice, bob = Client(app[0], verbose=False), Client(app[0], verbose=False)
    chat(alice, "alice api chat one")
    alice.predict(api_name="/new_chat")
    history_two, *_ = chat(alice, "alice api chat two")
    chats = alice.predict(api_name="/conversations")
    assert [c["title"] for c in chats] == ["alice api chat two", "alice api chat one"]
    assert all(c["messages"] == 2 for c in chats)

    assert bob.predict(api_name="/conversations") == []
    for forged in (chats[0]["id"], "", "x" * 500):
        with pytest.raises(AppError, match="no such chat among yours|choose one of your chats"):
            bob.predict(forged, api_name="/open_conversation")
    before = counts(store)
    assert bob.predict(True, api_name="/delete_my_data").startswith("There was nothing to delete")
    with pytest.raises(AppError, match="confirm"):
        alice.predict(False, api_name="/delete_my_data")
    assert counts(store) == before

    # one chat renamed, then deleted, only by its owner
    for endpoint, args in (("/rename_conversation", (chats[0]["id"], "Bob's now")),
                           ("/delete_conversation", (chats[0]["id"], True))):
        with pytest.raises(AppError, match="no such chat among yours"):
            bob.predict(*args, api_name=endpoint)
    assert counts(store) == before
    assert alice.predict(chats[1]["id"], "Chat one", api_name="/rename_conversation") == "Renamed the chat to “Chat one”."
    assert [c["title"] for c in alice.predict(api_name="/conversations")] == ["alice api chat two", "Chat one"]
    with pytest.raises(AppError, match="at most 200 characters"):
        alice.predict(chats[1]["id"], "x" * 201, api_name="/rename_conversation")
    alice.predict(api_name="/new_chat")
    chat(alice, "alice api chat three, to delete")
    doomed = alice.predict(api_name="/conversations")[0]
    with pytest.raises(AppError, match="confirm"):
        alice.predict(doomed["id"], False, api_name="/delete_conversation")
    history, status = alice.predict(doomed["id"], True, api_name="/delete_conversation")
    assert status == "Deleted the chat for good (2 messages)." and history == []  # it was the open chat
    assert store.conversation_messages(doomed["id"]) == []
    assert [c["id"] for c in alice.predict(api_name="/conversations")] == [chats[0]["id"], chats[1]["id"]]

    history, status = alice.predict(chats[1]["id"], api_name="/open_conversation")
    assert status.startswith("Reopened") and text_of(history[0]) == "alice api chat one"
    history, *_ = chat(alice, "alice continues chat one")
    assert [text_of(m) for m in history[::2]] == ["alice api chat one", "alice continues chat one"]
    assert len(store.conversation_messages(chats[1]["id"])) == 4

    status = alice.predict(True, api_name="/delete_my_data")
    assert status.startswith("Deleted for good: 2 chats (6 messages).")
    assert alice.predict(api_name="/conversations") == []
    assert store.conversation_messages(chats[0]["id"]) == [] and store.conversation_messages(chats[1]["id"]) == []
    answer = text_of(history_two[1])
    assert len(answer) < 12 or answer not in json.dumps(store.query("SELECT content FROM generations"))
