"""Ranking four answers ("compare more") and edit in place, at the service level (a real
SQLite file and the tiny model, no web server) and through the public API (a real Gradio
server driven by gradio_client).

What must hold: a ranking is ONE comparison row (verdict ``rank``, the extra answers and the
order) whose extra answers are recorded generations; every refusal stores nothing; the best
answer continues the chat; "delete my data", opt-out, exclusion, exports and the console see
a ranking as the comparison record it is.  An edited latest answer is a rewrite; an edited
earlier message branches the chat into a new conversation, leaving the original intact, and
the branch's new answer is stored with the context the model saw."""

from __future__ import annotations

import html
import inspect
import json

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from assistant.chat import ChatError, ChatService, ChatSession, new_key
from assistant.client import message_text as text_of
from assistant.console_service import record_markdown
from assistant.engine import SamplingParams
from assistant.holder import ModelHolder
from feedback import export, leaderboard, review
from feedback.store import FeedbackStore, owner_hash
from retrain.data import build_snapshot
from tests.factories import app_settings, launch_app

SYSTEM = "You are a helpful AI assistant."


def params(seed: int, max_new_tokens: int = 6) -> SamplingParams:
    # sampled, so that the answers differ and make usable pairs
    return SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed)


def page(service: ChatService) -> ChatSession:
    return service.attach(None, new_key())


def say(service: ChatService, sess: ChatSession, message: str, seed: int = 1) -> None:
    list(service.chat(sess, message, params(seed)))


def four_answers(service: ChatService, sess: ChatSession, message: str, seed: int = 10) -> list[tuple[str, str]]:
    """A turn, its regenerate (B) and "compare more" (C, D); returns what compare_more streamed."""
    say(service, sess, message, seed)
    list(service.regenerate(sess, params(seed + 1)))
    return list(service.compare_more(sess, params(seed + 2)))


def rows(store: FeedbackStore) -> dict[str, list[dict]]:
    return {t: store.query(f"SELECT * FROM {t} ORDER BY rowid") for t in
            ("sessions", "conversations", "messages", "generations", "comparisons", "ratings")}


class SlowDecode:
    """Slows the engine down so a long answer is still being written when a test acts."""

    def __init__(self, holder: ModelHolder):
        import time

        self.engine = holder.current()[1]
        self.original = self.engine.decoder.decode

        def decode(tokens):
            time.sleep(0.02)
            return self.original(tokens)

        self.engine.decoder.decode = decode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.engine.decoder.decode = self.original


# ----------------------------------------------------------------------------- compare more + rank
def test_compare_more_and_rank_store_one_judgement_and_the_best_continues(service):
    store = service.store
    sess = page(service)
    streamed = four_answers(service, sess, "Rank four answers about tea")
    comp = sess.comparison
    assert len(streamed) >= 2 and streamed[0][1] == ""  # C is streamed first, D after it
    assert tuple(t.strip() for t in streamed[-1]) == (comp.extras[0]["text"], comp.extras[1]["text"])
    assert [e["label"] for e in comp.extras] == ["C", "D"]

    row = store.comparison(comp.id)
    assert row["verdict"] is None and row["ranking"] is None  # open until ranked
    extras = json.loads(row["extra_answers"])
    assert [e["label"] for e in extras] == ["C", "D"]
    for extra, seed in zip(extras, (12, 13)):  # recorded like B: same turn and context, version, sampling
        gen = store.generation(extra["generation_id"])
        assert gen["content"] == extra["text"] and gen["session_id"] == sess.session_id
        assert (gen["conversation_id"], gen["turn"], gen["context"]) == (row["conversation_id"], 1, row["context"])
        assert gen["model_version"] == "v-test" and gen["finish_reason"] in ("stop", "length")
        # with a fixed seed, D takes the next one, so C and D are two samples
        assert json.loads(gen["sampling"]) == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 6, "seed": seed}
    assert store.db["comparisons"].count_where("conversation_id = ?", [row["conversation_id"]]) == 1

    note = service.rank(sess, "c > a = d > b")
    assert note == "Recorded: your ranking C > A = D > B; answer C continues the chat."
    row = store.comparison(comp.id)
    assert row["verdict"] == "rank" and row["decided_at"]
    assert json.loads(row["ranking"]) == [["C"], ["A", "D"], ["B"]]
    assert store.db["comparisons"].count_where("conversation_id = ?", [row["conversation_id"]]) == 1  # ONE judgement
    kept = store.conversation_messages(row["conversation_id"])[1]
    assert (kept["content"], kept["generation_id"]) == (extras[0]["text"], extras[0]["generation_id"])
    assert sess.messages[1]["content"] == extras[0]["text"]

    # rank 1 continues the chat: the next answer's context holds C
    say(service, sess, "And with milk?", seed=20)
    gen = store.generation(store.conversation_messages(row["conversation_id"])[3]["generation_id"])
    assert json.loads(gen["context"])[2] == {"role": "assistant", "content": extras[0]["text"]}
    # and every ordering reaches the retrain, as its six pairs
    snap = build_snapshot(store, heldout_fraction=0.0)
    assert snap.judgements["rank"] == {"seen": 1, "used": 1, "dropped": {}}
    assert comp.id in snap.record_ids and store.count_new_preferences() == 1


def test_a_tie_at_the_top_keeps_a_and_a_list_order_is_taken(service):
    sess = page(service)
    four_answers(service, sess, "Rank with a list", seed=30)
    assert service.rank(sess, ["B", "A", "D", "C"]).endswith("answer B continues the chat.")
    assert (sess.messages[1]["content"], sess.messages[1]["generation_id"]) == (
        sess.comparison.b_text, sess.comparison.b_generation_id)
    other = page(service)
    four_answers(service, other, "A tie on top", seed=40)
    a = dict(other.messages[1])
    assert service.rank(other, "D=A>C>B").endswith("answer A continues the chat.")
    assert other.messages[1] == a
    third = page(service)
    four_answers(service, third, "A tie on top without A", seed=45)
    assert service.rank(third, ["D=C", "A=B"]).endswith("answer C continues the chat.")
    assert json.loads(service.store.comparison(third.comparison.id)["ranking"]) == [["C", "D"], ["A", "B"]]


def test_invalid_rankings_are_refused_and_store_nothing(service):
    store = service.store
    sess = page(service)
    with pytest.raises(ChatError, match="no open comparison"):
        list(service.compare_more(sess, params(1)))
    with pytest.raises(ChatError, match="no comparison to rank"):
        service.rank(sess, "A>B>C>D")
    say(service, sess, "Refusals first", seed=50)
    list(service.regenerate(sess, params(51)))
    with pytest.raises(ChatError, match="only two answers: press Compare more"):
        service.rank(sess, "A>B")
    list(service.compare_more(sess, params(52)))
    before = rows(store)
    for bad, why in [("A>B>C", "answer D is not ranked"), ("A>B>C>D>E", "no answer E"), ("A>A>C>D", "more than once"),
                     ("A>>B>C>D", "empty place"), ("", "give the order"), (None, "give the order"),
                     (42, "give the order"), (["A", 1, "B"], "must be a string"), ("x" * 500, "too long"),
                     ("A>B>C>Z", "no answer Z")]:
        with pytest.raises(ChatError, match=why):
            service.rank(sess, bad)
    with pytest.raises(ChatError, match="four answers are open: rank them"):
        service.vote(sess, "a")
    with pytest.raises(ChatError, match="four answers already"):
        list(service.compare_more(sess, params(53)))
    with pytest.raises(ChatError, match="first rank the four answers"):
        list(service.regenerate(sess, params(54)))
    assert rows(store) == before and sess.comparison.verdict is None

    service.rank(sess, "A>B>C>D")
    decided = rows(store)
    with pytest.raises(ChatError, match="already decided"):
        service.rank(sess, "D>C>B>A")
    with pytest.raises(ChatError, match="already decided"):
        service.vote(sess, "b")
    with pytest.raises(ChatError, match="no open comparison"):
        list(service.compare_more(sess, params(55)))
    assert rows(store) == decided


def test_the_store_refuses_what_the_service_would(service):
    """The store keeps the invariant by itself: another session, a bad order, a vote on four."""
    store = service.store
    sess = page(service)
    four_answers(service, sess, "Store-level checks", seed=60)
    comp = sess.comparison
    from feedback.store import AlreadyDecided, NotFound, StoreError

    with pytest.raises(NotFound):
        store.rank_comparison(comp.id, "someone-else", "A>B>C>D")
    with pytest.raises(StoreError, match="rank them"):
        store.decide_comparison(comp.id, "a", sess.session_id)
    with pytest.raises(StoreError, match="not ranked"):
        store.rank_comparison(comp.id, sess.session_id, "A>B>C")
    with pytest.raises(StoreError, match="extra answers already"):
        store.add_extra_answers(comp.id, sess.session_id, [comp.extras[0]["generation_id"]])
    assert store.comparison(comp.id)["verdict"] is None
    store.rank_comparison(comp.id, sess.session_id, [["B"], ["A", "C", "D"]])
    with pytest.raises(AlreadyDecided):
        store.rank_comparison(comp.id, sess.session_id, "A>B>C>D")


def test_stop_while_the_extra_answers_are_written_stores_nothing(service, holder):
    store = service.store
    sess = page(service)
    say(service, sess, "Stop the extra answers", seed=70)
    list(service.regenerate(sess, params(71)))
    before = rows(store)
    with SlowDecode(holder):
        stream = service.compare_more(sess, params(72, max_new_tokens=400))
        next(stream)  # C is being written
        assert service.stop(sess)
        with pytest.raises(ChatError, match="stopped"):
            list(stream)
    assert rows(store) == before and not sess.comparison.extras and not service.generating(sess)
    assert service.vote(sess, "b") == "Recorded: B is better."  # the A/B comparison is still open


def test_a_ranking_is_a_comparison_record_for_exports_console_and_exclusion(service):
    store = service.store
    sess = page(service)
    four_answers(service, sess, "Export my ranking", seed=80)
    comp = sess.comparison
    texts = comp.texts()
    service.rank(sess, "C>A=D>B")
    trl = [(r["chosen"][0]["content"], r["rejected"][0]["content"]) for r in export.trl_records(store)]
    expected = [(texts[x], texts[y]) for x, y in [("C", "A"), ("C", "D"), ("C", "B"), ("A", "B"), ("D", "B")]
                if texts[x].strip() != texts[y].strip()]
    assert sorted(trl) == sorted(expected)  # its decisive pairs; A = D has no place in TRL
    csv = [r for r in export.csv_rows(store) if r["id"] == comp.id]
    assert len(csv) == 1 and csv[0]["kind"] == "rank" and csv[0]["ranking"] == "C>A=D>B"
    assert [e["label"] for e in json.loads(csv[0]["extra_answers_json"])] == ["C", "D"]

    listed = review.page(store, {"kinds": ["rank"]})
    assert [r["id"] for r in listed] == [comp.id]
    rec = review.record(store, "comparison", comp.id)
    assert [a["label"] for a in rec["answers"]] == ["A", "B", "C", "D"]
    assert [a["text"] for a in rec["answers"]] == [texts[k] for k in "ABCD"]
    assert rec["answers"][2]["generation"]["model_version"] == "v-test"
    assert rec["order"] == "C>A=D>B" and rec["verdict"] == "rank"
    view = html.unescape(record_markdown(rec))  # the console's record view: the order and all four answers
    assert "**Verdict:** Ranked C>A=D>B" in view and "#### Answer D" in view

    store.set_excluded("comparison", [comp.id], True, "noise", "maintainer")
    assert comp.id not in {c["id"] for c in store.usable_comparisons()}
    assert list(export.trl_records(store)) == []
    assert build_snapshot(store, heldout_fraction=0.0).judgements["rank"]["seen"] == 0
    store.set_excluded("comparison", [comp.id], False, "", "maintainer")
    assert len(build_snapshot(store, heldout_fraction=0.0).train) >= 1


def test_the_leaderboard_counts_a_rankings_a_against_b(service):
    store = service.store
    sess = page(service)
    four_answers(service, sess, "Leaderboard ranking", seed=90)
    comp = sess.comparison
    service.rank(sess, "C>B>D>A")
    store.conn.execute("UPDATE generations SET model_version = 'v-other' WHERE id = ?", (comp.b_generation_id,))
    assert leaderboard.games(store) == [("v-test", "v-other", 0.0)]  # one game: B above A


def test_delete_my_data_deletes_rankings(service):
    store = service.store
    me, other = page(service), page(service)
    four_answers(service, me, "my private ranking question", seed=100)
    mine = me.comparison.id
    extra_ids = [e["generation_id"] for e in me.comparison.extras]
    service.rank(me, "D>C>B>A")
    four_answers(service, other, "someone else's ranking", seed=110)
    service.rank(other, "A>B>C>D")
    theirs = store.query("SELECT * FROM comparisons WHERE id = ?", (other.comparison.id,))
    note = service.delete_my_data(me, True)
    assert note.startswith("Deleted for good: 1 chat (2 messages) and 1 vote.")
    assert store.query("SELECT id FROM comparisons WHERE id = ?", (mine,)) == []
    for gen_id in extra_ids:
        assert store.query("SELECT id FROM generations WHERE id = ?", (gen_id,)) == []
    dumped = json.dumps(rows(store))
    assert "my private ranking question" not in dumped and mine not in dumped
    assert store.query("SELECT * FROM comparisons WHERE id = ?", (other.comparison.id,)) == theirs
    assert store.query("SELECT count(*) AS n FROM sessions WHERE owner = ?", (owner_hash(me.key),))[0]["n"] == 0


def test_opted_out_rankings_are_never_used(service):
    store = service.store
    sess = page(service)
    four_answers(service, sess, "opted-out ranking", seed=120)
    service.rank(sess, "B>A>C>D")
    comp_id = sess.comparison.id
    assert comp_id in {c["id"] for c in store.usable_comparisons()}
    service.set_opt_out(sess, True)
    assert comp_id not in {c["id"] for c in store.usable_comparisons()}
    assert store.count_new_preferences() == 0
    assert list(export.trl_records(store)) == []
    snap = build_snapshot(store, heldout_fraction=0.0)
    assert comp_id not in snap.record_ids and snap.judgements["rank"]["seen"] == 0


# ----------------------------------------------------------------------------- edit in place
def test_editing_the_latest_answer_is_a_rewrite_that_continues(service):
    store = service.store
    sess = page(service)
    say(service, sess, "Edit the answer in place", seed=130)
    model_answer = sess.messages[1]["content"]
    edits = service.edit_message(sess, 1, "My better answer, in place.", params(131))
    with pytest.raises(StopIteration) as done:
        next(edits)  # nothing to stream: the note is the generator's value
    assert done.value.value.startswith("Recorded: your rewrite is stored as better")
    conv = sess.conversation_id
    edit = store.query("SELECT * FROM comparisons WHERE conversation_id = ?", (conv,))
    assert [(e["verdict"], e["a_text"], e["b_text"], e["turn"]) for e in edit] == [
        ("edit", model_answer, "My better answer, in place.", 1)]
    assert store.conversation_messages(conv)[1]["content"] == "My better answer, in place."
    say(service, sess, "go on", seed=132)
    gen = store.generation(store.conversation_messages(conv)[3]["generation_id"])
    assert json.loads(gen["context"])[2] == {"role": "assistant", "content": "My better answer, in place."}
    assert len(service.conversations(sess)) == 1  # no branch


def test_editing_a_user_message_branches_the_chat(service):
    store = service.store
    sess = page(service)
    say(service, sess, "Plan a trip to Lisbon", seed=140)
    say(service, sess, "What about food?", seed=141)
    original = sess.conversation_id
    list(service.regenerate(sess, params(142)))
    service.vote(sess, "b")
    before = {t: store.query(f"SELECT * FROM {t} WHERE conversation_id = ? ORDER BY rowid", (original,))
              for t in ("messages", "comparisons", "generations")}
    first_answer = sess.messages[1]["content"]

    streamed = list(service.edit_message(sess, 2, "What about museums?", params(143)))
    assert streamed and sess.conversation_id != original
    branch = sess.conversation_id
    msgs = store.conversation_messages(branch)
    assert [(m["turn"], m["role"], m["content"]) for m in msgs[:3]] == [
        (0, "user", "Plan a trip to Lisbon"), (1, "assistant", first_answer), (2, "user", "What about museums?")]
    assert msgs[3]["content"] == streamed[-1].strip() == sess.messages[3]["content"]
    gen = store.generation(msgs[3]["generation_id"])
    assert (gen["conversation_id"], gen["turn"]) == (branch, 3)
    assert json.loads(gen["context"]) == [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": "Plan a trip to Lisbon"},
                                          {"role": "assistant", "content": first_answer},
                                          {"role": "user", "content": "What about museums?"}]
    # the original and its judgements are intact, and both chats are listed
    assert {t: store.query(f"SELECT * FROM {t} WHERE conversation_id = ? ORDER BY rowid", (original,))
            for t in ("messages", "comparisons", "generations")} == before
    chats = service.conversations(sess)
    assert [(c["id"], c["title"], c["branch_of"]) for c in chats] == [
        (branch, "Plan a trip to Lisbon (edited)", original), (original, "Plan a trip to Lisbon", None)]
    assert store.query("SELECT branch_of, branch_turn FROM conversations WHERE id = ?", (branch,)) == [
        {"branch_of": original, "branch_turn": 2}]
    # later votes on the branch carry the context the model saw
    list(service.regenerate(sess, params(144)))
    comp = store.comparison(sess.comparison.id)
    assert comp["conversation_id"] == branch and comp["context"] == gen["context"]
    # the branch reopens and continues like any chat; so does the original
    again = service.attach(None, sess.key)
    service.open_conversation(again, branch)
    assert again.history() == sess.history()
    say(service, again, "And opening hours?", seed=145)
    service.open_conversation(again, original)
    assert [m["content"] for m in again.messages[::2]] == ["Plan a trip to Lisbon", "What about food?"]


def test_editing_the_first_message_and_an_earlier_answer(service):
    store = service.store
    sess = page(service)
    say(service, sess, "First question", seed=150)
    say(service, sess, "Second question", seed=151)
    original = sess.conversation_id
    model_answer, model_gen = sess.messages[1]["content"], sess.messages[1]["generation_id"]

    note = None
    edits = service.edit_message(sess, 1, "A rewritten first answer", params(152))
    try:
        next(edits)
    except StopIteration as done:
        note = done.value
    assert "continues a new chat branched at that answer" in note
    branch = sess.conversation_id
    assert branch != original and sess.history() == [{"role": "user", "content": "First question"},
                                                     {"role": "assistant", "content": "A rewritten first answer"}]
    assert [(m["content"], m["generation_id"]) for m in store.conversation_messages(branch)] == [
        ("First question", None), ("A rewritten first answer", None)]
    # the rewrite names the chat its model answer was written in, so an exclusion reaches that prompt
    edit = store.query("SELECT * FROM comparisons WHERE verdict = 'edit'")
    assert [(e["verdict"], e["conversation_id"], e["a_generation_id"], e["a_text"], e["b_text"], e["turn"])
            for e in edit] == [("edit", original, model_gen, model_answer, "A rewritten first answer", 1)]
    assert len(store.conversation_messages(original)) == 4
    assert store.generation(model_gen)["context"] in [p["context"] for p in store.user_prompts()]
    store.set_excluded("comparison", [edit[0]["id"]], True, "noise", "maintainer")
    judged = store.generation(model_gen)["context"]
    assert judged not in [p["context"] for p in store.user_prompts()]
    store.set_excluded("comparison", [edit[0]["id"]], False, "", "maintainer")
    # editing the branch's rewrite again: another rewrite of the same model answer
    list(service.edit_message(sess, 1, "A rewritten first answer, again", params(152)))
    again = store.query("SELECT conversation_id, a_generation_id FROM comparisons WHERE b_text = ?",
                        ("A rewritten first answer, again",))
    assert again == [{"conversation_id": original, "a_generation_id": model_gen}]
    assert store.conversation_messages(branch)[1]["content"] == "A rewritten first answer, again"

    # the first user message of a chat: the branch keeps only the system prompt
    list(service.edit_message(sess, 0, "A different first question", params(153)))
    gen = store.generation(sess.messages[1]["generation_id"])
    assert json.loads(gen["context"]) == [{"role": "system", "content": SYSTEM},
                                          {"role": "user", "content": "A different first question"}]
    assert len(service.conversations(sess)) == 3


def test_edit_refusals_store_nothing_and_lose_nothing(service, holder):
    store = service.store
    sess = page(service)
    with pytest.raises(ChatError, match="no message 0"):
        list(service.edit_message(sess, 0, "nothing here", params(1)))
    say(service, sess, "Keep me as I am", seed=160)
    say(service, sess, "And me", seed=161)
    before, kept = rows(store), [dict(m) for m in sess.messages]
    for index, text, why in [(4, "x", "no message 4"), (-1, "x", "no message -1"), (True, "x", "whole number"),
                             ("1", "x", "whole number"), (1.5, "x", "whole number"), (float("inf"), "x", "whole number"),
                             (0, "   ", "empty"), (0, None, "empty"), (0, "x" * 2001, "too long"),
                             (0, "Keep me as I am", "same as before"), (1, kept[1]["content"], "same as before"),
                             (3, kept[3]["content"], "same as the answer"), (0, "bad \ud800", "invalid characters")]:
        with pytest.raises(ChatError, match=why):
            list(service.edit_message(sess, index, text, params(162)))
    assert rows(store) == before and sess.messages == kept
    with SlowDecode(holder):
        streaming = service.chat(sess, "a long one", params(163, max_new_tokens=400))
        next(streaming)
        with pytest.raises(ChatError, match="still being written"):
            list(service.edit_message(sess, 0, "edited meanwhile", params(164)))
        service.stop(sess)
        list(streaming)
    assert sess.messages[:4] == kept  # the chat went on as usual
    assert [m["content"] for m in store.conversation_messages(sess.conversation_id)][:4] == [
        m["content"] for m in kept]
    assert len(service.conversations(sess)) == 1


def test_a_chat_deleted_in_another_window_is_not_branched(service):
    store = service.store
    one = page(service)
    say(service, one, "delete me elsewhere", seed=170)
    other = service.attach(None, one.key)
    service.delete_my_data(other, True)
    with pytest.raises(ChatError, match="changed or deleted in another window"):
        list(service.edit_message(one, 0, "resurrect me", params(171)))
    assert store.query("SELECT * FROM messages") == []


# ----------------------------------------------------------------------------- the public API
@pytest.fixture(scope="module")
def app(tmp_path_factory, tiny_model_dir):
    settings = app_settings(tmp_path_factory.mktemp("app-data"), tiny_model_dir, system_prompt=SYSTEM)
    url, ctx, close = launch_app(settings)
    yield url, ctx
    close()


def api_chat(client: Client, message: str, seed: int = -1):
    return client.predict(message, SYSTEM, 1.0, 1.0, 8, seed, api_name="/chat")


def test_api_compare_more_and_rank(app):
    store = app[1].store
    client = Client(app[0], verbose=False)
    with pytest.raises(AppError, match="no open comparison"):
        client.predict(1.0, 1.0, 8, -1, api_name="/compare_more")
    history, *_ = api_chat(client, "rank over the api", seed=1)
    client.predict(1.0, 1.0, 8, 2, api_name="/regenerate")
    job = client.submit(1.0, 1.0, 8, 3, api_name="/compare_more")
    c_text, d_text, version, status = job.result()
    assert version == "Answering: **the original assistant** (`sft`)" and status.startswith("Rank the four answers")
    conv = store.query("SELECT conversation_id FROM messages WHERE content = ?", ("rank over the api",))[0]
    row = store.query("SELECT * FROM comparisons WHERE conversation_id = ?", (conv["conversation_id"],))[0]
    assert [e["text"] for e in json.loads(row["extra_answers"])] == [c_text, d_text]

    before = rows(store)
    for bad, why in [("A>B>C", "not ranked"), ("A>B>C>D>E", "no answer E"), ("B>B>C>D", "more than once"), ("", "give the order")]:
        with pytest.raises(AppError, match=why):
            client.predict(bad, api_name="/rank")
    with pytest.raises(AppError, match="four answers are open"):
        client.predict("a", api_name="/vote")
    assert rows(store) == before

    history, status = client.predict("d>b>a>c", api_name="/rank")
    assert status == "Recorded: your ranking D > B > A > C; answer D continues the chat."
    assert text_of(history[-1]) == inspect.cleandoc(d_text)  # as the Chatbot shows it
    row = store.comparison(row["id"])
    assert row["verdict"] == "rank" and json.loads(row["ranking"]) == [["D"], ["B"], ["A"], ["C"]]
    with pytest.raises(AppError, match="already decided"):
        client.predict("a>b>c>d", api_name="/rank")
    history, *_ = api_chat(client, "after the ranking")
    gen = store.generation(store.conversation_messages(row["conversation_id"])[3]["generation_id"])
    assert json.loads(gen["context"])[2] == {"role": "assistant", "content": d_text}


def test_api_edit_message_branches_and_rewrites(app):
    store = app[1].store
    client = Client(app[0], verbose=False)
    with pytest.raises(AppError, match="no message 0"):
        client.predict(0, "nothing", 1.0, 1.0, 8, -1, api_name="/edit_message")
    api_chat(client, "api branch one", seed=11)
    history, *_ = api_chat(client, "api branch two", seed=12)
    original = store.query("SELECT conversation_id FROM messages WHERE content = ?",
                           ("api branch one",))[0]["conversation_id"]
    job = client.submit(2, "api branch edited", 1.0, 1.0, 8, 13, api_name="/edit_message")
    history, version, status = job.result()
    assert [text_of(m) for m in history[::2]] == ["api branch one", "api branch edited"] and len(history) == 4
    assert status.startswith("Your edit starts a new chat")
    chats = client.predict(api_name="/conversations")
    assert [c["title"] for c in chats] == ["api branch one (edited)", "api branch one"]
    assert chats[0]["branch_of"] == original == chats[1]["id"]
    assert [m["content"] for m in store.conversation_messages(original)][::2] == ["api branch one", "api branch two"]

    # the latest answer of the branch: a rewrite, in place
    history, version, status = client.predict(3, "my api rewrite", 1.0, 1.0, 8, -1, api_name="/edit_message")
    assert text_of(history[-1]) == "my api rewrite" and status.startswith("Recorded: your rewrite")
    edit = store.query("SELECT * FROM comparisons WHERE verdict = 'edit' AND b_text = ?", ("my api rewrite",))
    assert len(edit) == 1 and edit[0]["conversation_id"] == chats[0]["id"]
    before = rows(store)
    for index, text, why in [(9, "x", "no message 9"), (0, "", "empty"), (3, "my api rewrite", "same as the answer")]:
        with pytest.raises(AppError, match=why):
            client.predict(index, text, 1.0, 1.0, 8, -1, api_name="/edit_message")
    assert rows(store) == before
    # /edit still rewrites the latest answer
    history, status = client.predict("my second api rewrite", api_name="/edit")
    assert text_of(history[-1]) == "my second api rewrite"
