"""Past chats per browser key, "delete my data" and the version-updated notice, at the
service and store level (a real SQLite file and the tiny model, no web server).

What must hold: a key lists only its own chats; another key (or a client naming a chat id
it does not own) sees and changes nothing; reopening restores a chat so it can be
continued (also after an app restart); deleting removes every row so no export or training
snapshot sees it again, and says what earlier training had already used."""

from __future__ import annotations

import json

import pytest

from assistant.chat import ChatError, ChatService, ChatSession, new_key, valid_key
from assistant.engine import SamplingParams
from assistant.settings import Settings
from feedback import export
from feedback.registry import Registry
from feedback.store import FeedbackStore, NotFound, owner_hash
from retrain.data import build_snapshot


def params(seed: int) -> SamplingParams:
    # sampled, so that answers A and B differ and make a usable pair
    return SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=6, seed=seed)


def say(service: ChatService, sess: ChatSession, message: str, seed: int = 1) -> None:
    list(service.chat(sess, message, params(seed)))


def page(service: ChatService, key: str | None) -> ChatSession:
    """What a page load does: a session bound to the key its browser keeps."""
    return service.attach(None, key)


def compare_and_vote(service: ChatService, sess: ChatSession, verdict: str, seed: int = 2) -> str:
    list(service.regenerate(sess, params(seed)))
    comp_id = sess.comparison.id
    service.vote(sess, verdict)
    return comp_id


def table_rows(store: FeedbackStore) -> dict[str, int]:
    return {t: store.db[t].count for t in ("sessions", "conversations", "messages", "generations",
                                           "comparisons", "ratings", "review_log")}


# ----------------------------------------------------------------------------- keys
def test_keys_are_random_and_only_well_formed_ones_are_kept(service):
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50 and all(valid_key(k) for k in keys)
    key = new_key()
    assert page(service, key).key == key  # the browser's key is kept ...
    for bad in (None, "", "abc", "x" * 43 + "=", key + "a", " " + key[1:], 42, ["k"]):
        sess = page(service, bad)  # ... anything else is replaced by a new random one
        assert valid_key(sess.key) and sess.key not in (bad, key)
    # a session bound to another key is replaced, so one session's rows have one owner
    sess = page(service, key)
    other = service.attach(sess, new_key())
    assert other is not sess and other.session_id != sess.session_id
    assert service.attach(other, other.key) is other


def test_the_store_keeps_only_a_hash_of_the_key(service):
    key = new_key()
    sess = page(service, key)
    say(service, sess, "where is my key")
    row = service.store.session(sess.session_id)
    assert row["owner"] == owner_hash(key) != key
    dumped = json.dumps(service.store.query("SELECT * FROM sessions"))
    assert key not in dumped


# ----------------------------------------------------------------------------- listing and isolation
def test_my_chats_are_listed_by_key_newest_first(service):
    key = new_key()
    sess = page(service, key)
    say(service, sess, "First chat about tea")
    service.new_chat(sess)
    say(service, sess, "Second chat about coffee " + "and more " * 20)
    chats = service.conversations(sess)
    assert [c["title"][:24] for c in chats] == ["Second chat about coffee", "First chat about tea"]
    assert len(chats[0]["title"]) <= 60 and chats[0]["title"].endswith("…")
    assert [c["messages"] for c in chats] == [2, 2]
    # another page of the same browser (a reload) lists the same chats
    assert [c["id"] for c in service.conversations(page(service, key))] == [c["id"] for c in chats]
    # a new chat with no message yet is not listed
    service.new_chat(sess)
    assert len(service.conversations(sess)) == 2


def test_another_key_sees_and_changes_nothing(service):
    alice = page(service, new_key())
    say(service, alice, "alice secret plans")
    compare_and_vote(service, alice, "b")
    alice_chat = service.conversations(alice)[0]["id"]
    mallory = page(service, new_key())
    assert service.conversations(mallory) == []
    for forged in (alice_chat, alice_chat.upper(), "' OR 1=1 --", "", None, 7, "x" * 1000):
        with pytest.raises(ChatError, match="no such chat among yours|choose one of your chats"):
            service.open_conversation(mallory, forged)
    assert mallory.messages == [] and mallory.conversation_id is None
    before = table_rows(service.store)
    assert "nothing to delete" in service.delete_my_data(mallory, True)
    assert table_rows(service.store) == before
    # the store refuses too: another owner's chat is not found, whatever its id
    with pytest.raises(NotFound):
        service.store.owner_conversation(owner_hash(mallory.key), alice_chat)
    with pytest.raises(NotFound):
        service.store.owner_conversation("", alice_chat)
    assert service.store.owner_conversations("") == []
    assert [c["id"] for c in service.conversations(alice)] == [alice_chat]


# ----------------------------------------------------------------------------- reopening
def test_reopening_restores_the_chat_and_continues_it(service):
    key = new_key()
    first = page(service, key)
    say(service, first, "Plan a trip to Lisbon", seed=3)
    compare_and_vote(service, first, "b", seed=4)  # the kept answer is B
    kept = [dict(m) for m in first.messages]
    conv_id = first.conversation_id

    later = page(service, key)  # a reload: a new session on the same key
    assert later.session_id != first.session_id
    note = service.open_conversation(later, conv_id)
    assert note.startswith("Reopened")
    assert later.history() == [{"role": m["role"], "content": m["content"]} for m in kept]
    assert later.conversation_id == conv_id and later.session_id == first.session_id
    assert later.messages[1]["generation_id"] == kept[1]["generation_id"]
    assert later.messages[1]["context"] == kept[1]["context"]
    assert later.model_version == "v-test"

    # it continues: the next turn is stored in the same conversation, with the kept context
    say(service, later, "And what about Porto?", seed=5)
    stored = service.store.conversation_messages(conv_id)
    assert [(m["turn"], m["role"]) for m in stored] == [(0, "user"), (1, "assistant"), (2, "user"), (3, "assistant")]
    gen = service.store.generation(stored[3]["generation_id"])
    assert json.loads(gen["context"])[-3:] == [{"role": "user", "content": "Plan a trip to Lisbon"},
                                               {"role": "assistant", "content": kept[1]["content"]},
                                               {"role": "user", "content": "And what about Porto?"}]
    # and every judgement works on the reopened chat
    compare_and_vote(service, later, "a", seed=6)
    assert service.rate(later, 1, "up").startswith("Recorded")
    assert len(service.conversations(later)) == 1


def test_opting_out_covers_all_my_chats_and_survives_a_reload(service):
    store, key = service.store, new_key()
    owner = owner_hash(key)
    first = page(service, key)
    say(service, first, "an early chat", seed=40)
    compare_and_vote(service, first, "b", seed=41)
    second = page(service, key)  # another page of the same browser: another session
    say(service, second, "a later chat", seed=42)
    stranger = page(service, new_key())
    say(service, stranger, "a stranger's chat", seed=43)
    mine = {first.comparison.id}
    assert mine <= {c["id"] for c in store.usable_comparisons()}

    assert "will not be used" in service.set_opt_out(second, True)
    assert [r["opt_out"] for r in store.query("SELECT opt_out FROM sessions WHERE owner = ?", (owner,))] == [1, 1]
    assert not mine & {c["id"] for c in store.usable_comparisons()}
    assert store.session(stranger.session_id)["opt_out"] == 0
    third = page(service, key)  # a reload keeps the choice, in the database too
    assert third.opt_out is True and store.session(third.session_id)["opt_out"] == 1
    service.open_conversation(third, first.conversation_id)
    assert third.opt_out is True
    service.set_opt_out(third, False)
    assert {r["opt_out"] for r in store.query("SELECT opt_out FROM sessions WHERE owner = ?", (owner,))} == {0}
    assert page(service, key).opt_out is False
    assert page(service, new_key()).opt_out is False


def test_a_chat_changed_in_another_window_is_not_continued_from_a_stale_copy(service):
    key = new_key()
    one = page(service, key)
    say(service, one, "two windows", seed=7)
    two = page(service, key)
    service.open_conversation(two, one.conversation_id)
    say(service, two, "continued in window two", seed=8)
    before = service.store.conversation_messages(one.conversation_id)
    with pytest.raises(ChatError, match="changed or deleted in another window"):
        say(service, one, "continued in window one", seed=9)
    assert service.store.conversation_messages(one.conversation_id) == before
    service.open_conversation(one, one.conversation_id)  # reopening brings it up to date
    say(service, one, "continued in window one", seed=9)
    assert len(service.store.conversation_messages(one.conversation_id)) == 6


def test_chats_survive_an_app_restart(service, holder):
    key = new_key()
    sess = page(service, key)
    say(service, sess, "Remember me after a restart", seed=10)
    text = sess.messages[1]["content"]
    path = service.store.path
    service.store.close()
    reopened = FeedbackStore(path)  # what a restart does: a new store and service on the same file
    try:
        again = ChatService(Settings(), reopened, holder)
        later = again.attach(None, key)
        chats = again.conversations(later)
        assert [c["title"] for c in chats] == ["Remember me after a restart"]
        again.open_conversation(later, chats[0]["id"])
        assert later.history()[1]["content"] == text
        list(again.chat(later, "Still here?", params(11)))
        assert reopened.conversation_length(chats[0]["id"]) == 4
    finally:
        reopened.close()


# ----------------------------------------------------------------------------- delete my data
def test_delete_my_data_removes_every_row_and_no_export_or_snapshot_sees_it(service):
    store = service.store
    me, other = page(service, new_key()), page(service, new_key())
    say(service, me, "my private question about cats", seed=12)
    mine_b = compare_and_vote(service, me, "b", seed=13)
    service.rate(me, 0, "down", ["too long"], "meh")
    service.new_chat(me)
    say(service, me, "my second private question", seed=14)
    service.edit(me, "my own better answer")
    say(service, other, "someone else's question about dogs", seed=15)
    theirs = compare_and_vote(service, other, "a", seed=16)
    store.set_excluded("comparison", [mine_b], True, "noise", "maintainer")  # a review-log row of mine
    owner = owner_hash(me.key)

    def mine_in_exports() -> bool:
        trl = json.dumps(list(export.trl_records(store)))
        csv = json.dumps(list(export.csv_rows(store, include_excluded=True)))
        return "my private question" in trl + csv or "my own better answer" in trl + csv

    def mine_in_snapshot() -> bool:
        snap = build_snapshot(store, min_seed_prompts=0, min_heldout_prompts=0)
        used = set(snap.record_ids) | set(snap.rating_ids)
        prompts = json.dumps(snap.rollout_prompts + snap.heldout_prompts)
        mine = {r["id"] for r in store.query("SELECT c.id FROM comparisons c JOIN sessions s ON s.id = c.session_id "
                                             "WHERE s.owner = ? UNION SELECT r.id FROM ratings r JOIN sessions s "
                                             "ON s.id = r.session_id WHERE s.owner = ?", (owner, owner))}
        return bool(used & mine) or "my private question" in prompts or "my second private" in prompts

    store.set_excluded("comparison", [mine_b], False, "", "maintainer")
    assert mine_in_exports() and mine_in_snapshot()  # the checks below can fail
    my_sessions = [r["id"] for r in store.query("SELECT id FROM sessions WHERE owner = ?", (owner,))]
    my_chats = [r["id"] for r in store.query("SELECT id FROM conversations WHERE session_id IN (?, ?)",
                                             (my_sessions[0], my_sessions[-1]))]
    assert len(my_sessions) == 1 and len(my_chats) == 2
    others_before = store.query("SELECT * FROM comparisons WHERE id = ?", (theirs,))

    with pytest.raises(ChatError, match="confirm"):
        service.delete_my_data(me, False)
    with pytest.raises(ChatError, match="confirm"):
        service.delete_my_data(me, "yes")
    assert mine_in_snapshot()

    note = service.delete_my_data(me, True)
    assert note.startswith("Deleted for good: 2 chats (4 messages) and 3 votes.")
    assert "None of it had been used for training yet" in note
    assert me.messages == [] and me.conversation_id is None and me.comparison is None
    for table in ("sessions", "conversations", "generations", "comparisons", "ratings"):
        column = "id" if table == "sessions" else "session_id"
        assert store.query(f"SELECT * FROM {table} WHERE {column} = ?", (my_sessions[0],)) == [], table
    for table in ("messages", "generations", "comparisons", "ratings"):
        assert store.query(f"SELECT * FROM {table} WHERE conversation_id IN (?, ?)", tuple(my_chats)) == [], table
    assert store.query("SELECT * FROM review_log WHERE record_id = ?", (mine_b,)) == []
    dumped = json.dumps({t: store.query(f"SELECT * FROM {t}") for t in
                         ("conversations", "messages", "generations", "comparisons", "ratings", "review_log")})
    assert "my private question" not in dumped and "my own better answer" not in dumped and mine_b not in dumped
    assert not mine_in_exports() and not mine_in_snapshot()
    assert service.conversations(me) == []
    # someone else's data is untouched, and my key goes on working
    assert store.query("SELECT * FROM comparisons WHERE id = ?", (theirs,)) == others_before
    assert len(service.conversations(other)) == 1
    say(service, me, "a fresh start", seed=17)
    assert [c["title"] for c in service.conversations(me)] == ["a fresh start"]


def test_delete_keeps_an_opt_out_in_force(service):
    sess = page(service, new_key())
    service.set_opt_out(sess, True)
    say(service, sess, "opted out and deleting")
    service.delete_my_data(sess, True)
    say(service, sess, "after the deletion")
    assert service.store.session(sess.session_id)["opt_out"] == 1


def _finished_run(registry: Registry, status: str, comparisons: list[str], ratings: list[str],
                  version: str | None = None, reward_model: str | None = "rm-1") -> str:
    run_id = registry.create_run("test")
    registry.update_run(run_id, status=status, reward_model_id=reward_model, finished_at="2099-01-01",
                        data={"record_ids": comparisons, "rating_ids": ratings}, candidate_version=version)
    if version:
        registry.register_version(version_id=version, path="/nowhere", kind="ppo", parent_id="sft", run_id=run_id,
                                  feedback={"comparisons": comparisons, "ratings": ratings})
    return run_id


def test_delete_says_how_much_earlier_training_had_used(service):
    store, registry = service.store, Registry(service.store)
    sess = page(service, new_key())
    say(service, sess, "used question one", seed=20)
    c1 = compare_and_vote(service, sess, "b", seed=21)
    r1 = store.record_rating(session_id=sess.session_id, generation_id=sess.messages[1]["generation_id"], thumb="up")
    say(service, sess, "not used question two", seed=22)
    c2 = compare_and_vote(service, sess, "a", seed=23)  # in no run that trained on it
    _finished_run(registry, "promoted", [c1], [r1], version="v-7")
    _finished_run(registry, "rejected", [c1, c2], [], reward_model=None)  # too little data: trained nothing
    _finished_run(registry, "failed", [c2], [r1])  # crashed: not a finished run
    _finished_run(registry, "running", [c2], [])
    note = service.delete_my_data(sess, True)
    assert note.startswith("Deleted for good: 1 chat (4 messages) and 3 votes. 2 of 3 votes had already been "
                           "used to train version v-7;")
    assert "nothing of yours will be used again" in note


def test_the_store_reports_used_judgements_exactly(store):
    registry = Registry(store)
    owner = owner_hash(new_key())
    store.ensure_session("s-mine", owner=owner)
    conv = store.start_conversation("s-mine", "sys")
    ctx = [{"role": "user", "content": "q"}]
    common = dict(session_id="s-mine", conversation_id=conv, turn=1, context=ctx, model_version="sft", sampling={},
                  prompt_tokens=1, completion_tokens=1, ttft_ms=None, latency_ms=None, finish_reason="stop")
    store.set_message(conv, 0, "user", "q")
    a = store.record_generation(content="A", **common)
    store.set_message(conv, 1, "assistant", "A", a)
    b = store.record_generation(content="B", **common)
    used = store.open_comparison(session_id="s-mine", conversation_id=conv, turn=1, a_generation_id=a,
                                 b_generation_id=b)
    store.decide_comparison(used, "b", "s-mine")
    marked = store.record_edit(session_id="s-mine", conversation_id=conv, turn=1, generation_id=a, rewrite="R")
    fresh = store.record_rating(session_id="s-mine", generation_id=a, thumb="down")
    run = _finished_run(registry, "rejected", [used], [])  # the gate said no: reward models were trained
    registry.mark_used(run, [marked])  # ``used_in_run``, the other record runs keep
    registry.register_version(version_id="v-later", path="/x", kind="ppo", run_id="run-other")
    result = store.delete_owner_data(owner)
    assert {k: result[k] for k in ("conversations", "messages", "answers", "judgements", "used")} == {
        "conversations": 1, "messages": 2, "answers": 2, "judgements": 3, "used": 2}
    assert result["used_by_runs"] == [run] and result["used_by_versions"] == []
    assert result["versions_since"] == ["v-later"]
    assert fresh and store.counts() == {"sessions": 0, "conversations": 0, "generations": 0, "comparisons": 0,
                                        "ratings": 0}
    note = ChatService.deleted_note(result)
    assert "2 of 3 votes had already been used in 1 training run (no version came of it)" in note


def test_delete_names_versions_trained_since_when_no_vote_was_used(service):
    sess = page(service, new_key())
    say(service, sess, "only a prompt", seed=30)
    Registry(service.store).register_version(version_id="v-after", path="/x", kind="ppo", run_id="run-x")
    note = service.delete_my_data(sess, True)
    assert note == ("Deleted for good: 1 chat (2 messages). None of your votes had been used for training yet; "
                    "version v-after, trained since your first chat, may have practised on your questions.")


# ----------------------------------------------------------------------------- the update notice
def test_the_update_notice_is_shown_once_when_the_version_changed(service):
    registry = Registry(service.store)
    registry.register_version(version_id="v-test", path="/x", kind="ppo", run_id="run-1",
                              feedback={"comparisons": [f"c{i}" for i in range(200)],
                                        "ratings": [f"r{i}" for i in range(12)]})
    key = new_key()
    sess = page(service, key)
    assert service.take_notice(sess) == ""  # a first visit: nothing to compare with
    say(service, sess, "hello")
    assert service.take_notice(sess) == ""  # the same version all along
    # an answer from an older version in the log: the user last chatted with "v-old"
    service.store.conn.execute("UPDATE generations SET model_version = 'v-old'")
    back = page(service, key)
    assert service.take_notice(back) == "The assistant was updated (v-test), trained on 212 votes from its users."
    assert service.take_notice(back) == ""  # shown once
    say(service, back, "again")
    assert service.take_notice(back) == ""
    # within a session: the served version changes between two answers
    live = page(service, new_key())
    say(service, live, "before the update")
    live.seen_version = "v-previous"
    say(service, live, "after the update")
    assert service.take_notice(live).startswith("The assistant was updated (v-test)")
    live.seen_version = "v-other"
    say(service, live, "and again")
    assert service.take_notice(live) == ""  # once per session


def test_an_answer_b_does_not_count_as_the_version_last_chatted_with(store):
    """Answer B may come from a candidate on trial; the notice compares served versions."""
    owner = owner_hash(new_key())
    store.ensure_session("s", owner=owner)
    conv = store.start_conversation("s", "sys")
    common = dict(session_id="s", conversation_id=conv, turn=1, context=[{"role": "user", "content": "q"}],
                  sampling={}, prompt_tokens=1, completion_tokens=1, ttft_ms=None, latency_ms=None,
                  finish_reason="stop")
    a = store.record_generation(content="A", model_version="v-served", **common)
    assert store.owner_last_version(owner) == "v-served"
    b = store.record_generation(content="B", model_version="v-candidate", **common)
    assert store.owner_last_version(owner) == "v-candidate"
    store.open_comparison(session_id="s", conversation_id=conv, turn=1, a_generation_id=a, b_generation_id=b)
    assert store.owner_last_version(owner) == "v-served"
    assert store.owner_last_version(owner_hash(new_key())) is None


def test_version_notes(service):
    registry = Registry(service.store)
    assert service.version_note("v-unknown") == "The assistant was updated (v-unknown)."
    registry.register_version(version_id="sft-2", path="/x", kind="sft")
    assert service.version_note("sft-2") == "The assistant now runs version sft-2."
    registry.register_version(version_id="v-1", path="/x", kind="ppo", feedback={"comparisons": ["c"], "ratings": []})
    assert service.version_note("v-1") == "The assistant was updated (v-1), trained on 1 vote from its users."


# ----------------------------------------------------------------------------- rename and delete one chat
def test_rename_a_chat_and_name_it_by_its_first_message_again(service):
    me, mallory = page(service, new_key()), page(service, new_key())
    say(service, me, "a question about birds", seed=21)
    chat_id = me.conversation_id
    assert "Renamed the chat to “Birds”" in service.rename_conversation(me, chat_id, "  Birds \n")
    listed = service.conversations(me)[0]
    assert listed["title"] == "Birds" and listed["renamed"] is True
    assert service.store.query("SELECT title FROM conversations WHERE id = ?", (chat_id,))[0]["title"] == "Birds"
    long = "b" * 150  # kept whole, shown shortened like any title
    service.rename_conversation(me, chat_id, long)
    assert service.conversations(me)[0]["title"].endswith("…") and len(service.conversations(me)[0]["title"]) == 60
    for bad in ("x" * 201, None, 5):
        with pytest.raises(ChatError, match="at most 200 characters"):
            service.rename_conversation(me, chat_id, bad)
    for forged in (chat_id, "nope", "", None):  # another key can neither rename nor see it
        with pytest.raises(ChatError, match="no such chat among yours|choose one of your chats"):
            service.rename_conversation(mallory, forged, "Mine now")
    assert "first message again" in service.rename_conversation(me, chat_id, "   ")
    assert service.conversations(me)[0] | {"updated_at": None} == {
        "id": chat_id, "title": "a question about birds", "updated_at": None, "messages": 2, "branch_of": None,
        "renamed": False, "name": "a question about birds"}


def test_delete_one_chat_keeps_the_others_and_another_keys(service):
    store = service.store
    me, other = page(service, new_key()), page(service, new_key())
    say(service, me, "first chat about tea", seed=22)
    compare_and_vote(service, me, "a", seed=23)
    first = me.conversation_id
    service.rate(me, 0, "up", [], "")
    service.new_chat(me)
    say(service, me, "second chat about coffee", seed=24)
    second = me.conversation_id
    say(service, other, "their chat about juice", seed=25)
    theirs = other.conversation_id
    before_theirs = store.query("SELECT * FROM messages WHERE conversation_id = ?", (theirs,))

    with pytest.raises(ChatError, match="confirm"):
        service.delete_conversation(me, first, False)
    with pytest.raises(ChatError, match="no such chat among yours"):
        service.delete_conversation(other, first, True)
    assert len(store.conversation_messages(first)) == 2

    assert service.delete_conversation(me, first, True) == "Deleted the chat for good (2 messages and 2 votes)."
    for table in ("messages", "generations", "comparisons", "ratings", "conversations"):
        column = "id" if table == "conversations" else "conversation_id"
        assert store.query(f"SELECT * FROM {table} WHERE {column} = ?", (first,)) == [], table
    assert "first chat about tea" not in json.dumps(list(export.trl_records(store)))
    assert me.conversation_id == second and len(me.messages) == 2  # the open chat is another: kept open
    assert [c["id"] for c in service.conversations(me)] == [second]
    assert store.query("SELECT * FROM messages WHERE conversation_id = ?", (theirs,)) == before_theirs

    service.delete_conversation(me, second, True)  # the open chat: a new chat takes its place
    assert me.conversation_id is None and me.messages == [] and service.conversations(me) == []
    with pytest.raises(ChatError, match="no such chat among yours"):
        service.delete_conversation(me, second, True)
    say(service, me, "a chat after the deletions", seed=26)
    assert [c["title"] for c in service.conversations(me)] == ["a chat after the deletions"]
