"""Fair admission (``assistant.engine.scheduler``): round-robin across clients, per-client
caps, a bounded queue that refuses at once, and the engine honouring them.

A flood from one client must not stand in front of another client's first message; the
measured figure (a normal chat's first token while one client floods the app) is in
``benchmarks/load.py --flood``.
"""

from __future__ import annotations

import time
from collections import Counter

import pytest

from assistant import models
from assistant.engine import Busy, Engine, Limits, Request, SamplingParams, Scheduler

PARAMS = SamplingParams(temperature=0, max_new_tokens=4)


def req(client: str, tag: int = 0) -> Request:
    return Request(prompt_ids=[tag], params=PARAMS, client=client)


def take_all(s: Scheduler, running: Counter | None = None) -> list[tuple[str, int]]:
    out = []
    while (r := s.next(running or Counter())) is not None:
        out.append((r.client, r.prompt_ids[0]))
    return out


def test_round_robin_across_clients():
    s = Scheduler(Limits(), lambda waiting: 3)
    for i in range(5):
        s.add(req("flood", i))
    s.add(req("alice", 0))
    s.add(req("bob", 0))
    order = take_all(s)
    # the flood's first request, then alice and bob, then the rest of the flood in order
    assert order == [("flood", 0), ("alice", 0), ("bob", 0), ("flood", 1), ("flood", 2), ("flood", 3), ("flood", 4)]
    assert len(s) == 0


def test_per_client_running_cap():
    s = Scheduler(Limits(per_client_running=2), lambda waiting: 3)
    for i in range(3):
        s.add(req("flood", i))
    assert s.next(Counter({"flood": 2})) is None  # at its cap: waits
    s.add(req("alice"))
    assert s.next(Counter({"flood": 2})).client == "alice"
    assert s.next(Counter({"flood": 1})).prompt_ids == [0]


def test_bounded_queue_refuses_at_once_with_a_wait_estimate():
    s = Scheduler(Limits(per_client_waiting=2, max_waiting=3), lambda waiting: 7 * waiting)
    s.add(req("flood", 0))
    s.add(req("flood", 1))
    with pytest.raises(Busy, match=r"You already have 2 answers waiting; try again in about 14 s") as one:
        s.add(req("flood", 2))
    assert one.value.retry_after_s == 14
    s.add(req("alice"))
    with pytest.raises(Busy, match=r"The assistant is busy; try again in about 21 s"):
        s.add(req("bob"))
    assert len(s) == 3
    assert [c for c, _ in take_all(s)] == ["flood", "alice", "flood"]
    s.add(req("bob"))  # room again


def test_closed_scheduler_refuses_and_drains():
    s = Scheduler(Limits(), lambda waiting: 1)
    s.add(req("a"))
    s.close("retired")
    with pytest.raises(RuntimeError, match="retired"):
        s.add(req("b"))
    assert [r.client for r in s.drain()] == ["a"] and len(s) == 0


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    return models.load(str(tiny_model_dir), tmp_path_factory.mktemp("models"))


def test_engine_keeps_room_for_other_clients(tiny):
    """One client submits 6 long answers into a 4-slot engine capped at 2 per client: two of
    them decode, the rest wait; another client's request starts at once and finishes while
    the flood is still running."""
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=4, stop_ids=set(),
                    limits=Limits(per_client_running=2, per_client_waiting=4))
    ids = engine.encode_chat([{"role": "user", "content": "hi"}])
    flood: list[Request] = []
    try:
        for _ in range(6):
            flood.append(engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=400), client="flood"))
            if len(flood) == 2:  # both decoding before the rest queue up: the counts below are exact
                deadline = time.monotonic() + 20
                while not all(r.first_token_at for r in flood) and time.monotonic() < deadline:
                    time.sleep(0.01)
        assert len(engine.scheduler) == 4
        with pytest.raises(Busy):
            engine.submit(ids, PARAMS, client="flood")
        alice = engine.submit(ids, PARAMS, client="alice")
        assert len(list(alice)) == PARAMS.max_new_tokens
        started = [r for r in flood if r.first_token_at is not None]
        assert len(started) == 2 and not any(r.done for r in flood)
        assert engine.stats.peak_batch <= 3
    finally:
        for r in flood:
            r.cancel()
        engine.close(timeout=20)
    assert all(r.finish_reason == "cancelled" for r in flood)
