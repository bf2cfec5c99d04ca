"""The chat service without a web server: limits, validation, session rules."""

from __future__ import annotations

import json
import threading

import pytest

from assistant.chat import ChatError, ChatService, ChatSession, RateLimited, RateLimiter, sampling
from assistant.engine import Engine, SamplingParams
from assistant.holder import ModelHolder
from assistant.models import load
from assistant.settings import Settings


class FakeClock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_rate_limiter_is_a_sliding_window_per_key():
    clock = FakeClock()
    limiter = RateLimiter(3, window_s=60, clock=clock)
    for _ in range(3):
        limiter.hit("s1", "messages")
        clock.t += 10
    with pytest.raises(RateLimited, match="at most 3 per minute; try again in 30 s"):
        limiter.hit("s1", "messages")
    limiter.hit("s2", "messages")  # another session has its own window
    clock.t += 31  # the first hit (at 1000) leaves the window at 1060
    limiter.hit("s1", "messages")
    with pytest.raises(RateLimited):
        limiter.hit("s1", "messages")


def test_rate_limit_zero_means_unlimited():
    limiter = RateLimiter(0, clock=FakeClock())
    for _ in range(1000):
        limiter.hit("s", "votes")


def test_sampling_validation():
    defaults = Settings()
    assert sampling(None, None, None, None, defaults).as_dict() == {
        "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256, "seed": None}
    assert sampling(0, 1, 5, 42, defaults).seed == 42
    assert sampling(0.5, 0.5, 5, -1, defaults).seed is None
    for bad in [(-0.1, 0.9, 10), (2.5, 0.9, 10), (0.7, 0, 10), (0.7, 1.1, 10), (0.7, 0.9, 0), (0.7, 0.9, 10**6)]:
        with pytest.raises(ChatError):
            sampling(*bad, None, defaults)


def test_seed_is_refused_beyond_64_bits():
    """torch seeds are unsigned 64-bit; a larger one used to fail deep in the engine."""
    defaults = Settings()
    assert sampling(0, 1, 5, 2**64 - 1, defaults).seed == 2**64 - 1
    assert sampling(0, 1, 5, -5, defaults).seed is None  # any negative seed: random
    for seed in (2**64, 10**30, 1e30):
        with pytest.raises(ChatError, match=r"the seed must be at most 2\^64 - 1 \(-1 = random\)"):
            sampling(0, 1, 5, seed, defaults)


def test_answer_numbers():
    sess = ChatSession("s", messages=[{"role": r, "content": str(i)} for i, r in
                                      enumerate(["user", "assistant", "user", "assistant"])])
    assert sess.answer_turn(0) == 3 and sess.answer_turn(1) == 1 and sess.answer_turn(2) == 3
    assert sess.answer_number(1) == 1 and sess.answer_number(3) == 2
    with pytest.raises(ChatError, match="no answer 3"):
        sess.answer_turn(3)
    with pytest.raises(ChatError, match="no answer yet"):
        ChatSession("t").answer_turn(0)


@pytest.fixture(scope="module")
def service(tiny_model_dir, tmp_path_factory):
    from feedback.store import FeedbackStore

    loaded = load(str(tiny_model_dir), tmp_path_factory.mktemp("models"))
    engine = Engine(loaded.model, loaded.tokenizer, max_batch=2, max_context=256)
    store = FeedbackStore(tmp_path_factory.mktemp("db") / "f.sqlite")
    svc = ChatService(Settings(max_message_chars=2000), store, ModelHolder(engine, "v-test"))
    yield svc
    engine.close()
    store.close()


def run(gen):
    return list(gen)


def test_context_too_long_stores_nothing_and_keeps_the_conversation(service):
    sess = service.new_session()
    params = sampling(0, 1, 8, None, service.settings)
    run(service.chat(sess, "hi", params))
    before = (service.store.counts(), [dict(m) for m in sess.messages])
    with pytest.raises(ChatError, match="too long for the model"):
        run(service.chat(sess, "word " * 300, params))  # 300+ tokens > 256 context
    assert (service.store.counts(), sess.messages) == before
    run(service.chat(sess, "again", params))
    assert len(sess.messages) == 4


def test_another_sessions_answer_is_refused_by_the_store(service):
    owner = service.new_session()
    run(service.chat(owner, "mine", sampling(0, 1, 4, None, service.settings)))
    forged = ChatSession("intruder", conversation_id=owner.conversation_id,
                         messages=[dict(m) for m in owner.messages])
    with pytest.raises(ChatError, match="no such answer in this session"):
        service.rate(forged, 0, "down")
    with pytest.raises(ChatError, match="no such answer in this session"):
        service.edit(forged, "rewritten")
    assert service.store.db["ratings"].count_where("generation_id = ?", [owner.messages[1]["generation_id"]]) == 0


def test_rewrite_blocks_regenerate_and_rating_of_the_rewrite(service):
    sess = service.new_session()
    params = sampling(0, 1, 4, None, service.settings)
    run(service.chat(sess, "q", params))
    service.edit(sess, "my answer")
    with pytest.raises(ChatError, match="your own rewrite"):
        run(service.regenerate(sess, params))
    with pytest.raises(ChatError, match="your own rewrite"):
        service.rate(sess, 0, "up")


def test_regenerate_writes_b_with_a_hidden_style_hint(service):
    from assistant.chat import STYLE_HINTS, with_style_hint

    assert with_style_hint([{"role": "user", "content": "q"}], "Answer briefly.")[0] == {
        "role": "system", "content": "Answer briefly."}
    assert with_style_hint([{"role": "system", "content": "Be kind."}], "Answer briefly.")[0]["content"] == \
        "Be kind. Answer briefly."
    service.settings = service.settings.replace(regenerate_style_hints=True)
    sess = service.new_session()
    run(service.chat(sess, "Tell me about tea.", SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=1), "You are nice."))
    seen = []
    original = service.holder.submit
    service.holder.submit = lambda ids, *a, **k: (seen.append(ids), original(ids, *a, **k))[1]
    try:
        run(service.regenerate(sess, SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=2)))
    finally:
        del service.holder.submit
    b = service.store.generation(sess.comparison.b_generation_id)
    hint = json.loads(b["sampling"])["style_hint"]
    assert hint in STYLE_HINTS
    # the model saw the hint; the stored context is what the user saw (no hint), the same as A's
    assert hint in service.holder.current()[1].tokenizer.decode(seen[0])
    a = service.store.generation(sess.comparison.a_generation_id)
    assert b["context"] == a["context"] and hint not in b["context"]
    assert "style_hint" not in json.loads(a["sampling"])
    service.settings = service.settings.replace(regenerate_style_hints=False)  # the default: no hint
    run(service.chat(sess, "And coffee?", SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=3)))
    run(service.regenerate(sess, SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=8, seed=4)))
    assert "style_hint" not in json.loads(service.store.generation(sess.comparison.b_generation_id)["sampling"])


# ----------------------------------------------------------------------------- one session, two calls at once
RACE_PARAMS = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=6, seed=5)


def assert_consistent(store, sess: ChatSession) -> None:
    """The stored conversation is the session's; every stored answer was written from exactly
    the turns stored before it; an open comparison is about the answer that is kept."""
    stored = store.conversation_messages(sess.conversation_id)
    assert [(m["turn"], m["role"], m["content"]) for m in stored] == [
        (i, m["role"], m["content"]) for i, m in enumerate(sess.messages)]
    for m in stored:
        if m["generation_id"]:
            gen = store.generation(m["generation_id"])
            seen = [c for c in json.loads(gen["context"]) if c["role"] != "system"]
            assert seen == [{"role": p["role"], "content": p["content"]} for p in stored[:m["turn"]]], m["turn"]
            assert (gen["turn"], gen["content"]) == (m["turn"], m["content"])
    comp = sess.comparison
    if comp is not None and comp.verdict is None:
        row, kept = store.comparison(comp.id), stored[comp.turn]
        assert row["verdict"] is None
        assert (row["a_generation_id"], row["a_text"]) == (kept["generation_id"], kept["content"])
        assert (comp.a_generation_id, comp.a_text) == (kept["generation_id"], kept["content"])


def race(first, second, pause_in: tuple[object, str]):
    """Runs ``first`` in a thread; when that thread calls the method ``pause_in`` (object,
    name) it waits there while ``second`` runs in this thread (1 s at most: where the service
    serialises the session, ``second`` waits for ``first`` instead).  Returns both outcomes,
    a value or the ChatError."""
    obj, name = pause_in
    original = getattr(obj, name)
    reached, second_done = threading.Event(), threading.Event()
    outcomes: dict[str, object] = {}

    def paused(*args, **kwargs):
        if threading.current_thread() is worker and not reached.is_set():
            reached.set()
            second_done.wait(1.0)
        return original(*args, **kwargs)

    def call(key, fn):
        try:
            outcomes[key] = fn()
        except ChatError as exc:
            outcomes[key] = exc

    worker = threading.Thread(target=call, args=("first", first))
    setattr(obj, name, paused)
    try:
        worker.start()
        assert reached.wait(30), outcomes
        call("second", second)
        second_done.set()
        worker.join(60)
    finally:
        delattr(obj, name)  # the instance attribute goes; the class's method shows again
    return outcomes["first"], outcomes["second"]


def test_an_edit_racing_a_regenerate_leaves_the_conversation_consistent(service):
    sess = service.new_session()
    run(service.chat(sess, "race question one", RACE_PARAMS))
    regen, edit = race(lambda: run(service.regenerate(sess, RACE_PARAMS)),
                       lambda: service.edit(sess, "my own better answer"),
                       pause_in=(service.holder, "current"))  # regenerate: checked, not yet generating
    assert isinstance(regen, ChatError) or isinstance(edit, ChatError), (regen, edit)
    assert_consistent(service.store, sess)
    assert not service.generating(sess)


def test_an_edit_racing_the_end_of_an_answer_leaves_the_conversation_consistent(service):
    sess = service.new_session()
    run(service.chat(sess, "race question two", RACE_PARAMS))
    race(lambda: run(service.chat(sess, "race question three", RACE_PARAMS)),
         lambda: service.edit(sess, "rewritten while the next answer was being stored"),
         pause_in=(service.store, "transaction"))  # the answer is written, not yet stored
    assert_consistent(service.store, sess)
    assert len(sess.messages) == 4


def test_a_vote_while_an_answer_is_written_is_refused_and_the_conversation_stays_consistent(service):
    sess = service.new_session()
    run(service.chat(sess, "race question four", RACE_PARAMS))
    run(service.regenerate(sess, RACE_PARAMS))
    comp_id = sess.comparison.id
    streaming = service.chat(sess, "race question five", RACE_PARAMS)
    next(streaming)  # the answer is being written
    with pytest.raises(ChatError, match="an answer is still being written"):
        service.vote(sess, "b")
    run(streaming)
    assert_consistent(service.store, sess)
    assert service.store.comparison(comp_id)["verdict"] is None  # left undecided, as the chat moved on
