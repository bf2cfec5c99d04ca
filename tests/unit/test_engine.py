"""The batched decoding engine: exact greedy decoding, batching, sampling, stop/cancel,
failures, retirement and hot swap through the holder.

Most tests use the tiny 2-layer model (random weights, real tokenizer); one checks the
embedded SmolLM2 against Hugging Face ``generate``.  Batching is asserted structurally
(the engine's step counters), never by timing.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from assistant import models
from assistant.engine import ContextTooLong, Engine, LoopDecoder, SamplingParams, SlotDecoder, TextStream, sample_batch
from assistant.holder import ModelHolder
from tests.factories import build_tiny_model

GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
PROMPTS = ["Hello there", "What is the capital of France?", "Tell me a story about a very small cat",
           "2 + 2 ="]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    return models.load(str(tiny_model_dir), tmp_path_factory.mktemp("models"))


@pytest.fixture
def make_engine(tiny):
    engines: list[Engine] = []

    def make(loaded=None, **kw) -> Engine:
        loaded = loaded or tiny
        engine = Engine(loaded.model, loaded.tokenizer, **kw)
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.close(timeout=10)


def chat_ids(engine: Engine, text: str) -> list[int]:
    return engine.encode_chat([{"role": "user", "content": text}])


def hf_greedy(loaded, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def gate_prefill(engine: Engine) -> threading.Event:
    """Holds the engine thread inside its next prefill until the returned event is set, so
    requests submitted meanwhile are all waiting when it admits the next ones."""
    gate = threading.Event()
    prefill = engine.decoder.prefill

    def held(slot, ids, start=0):
        gate.wait(10)
        return prefill(slot, ids, start)

    engine.decoder.prefill = held
    return gate


def slow_decode(engine: Engine, delay: float = 0.01) -> None:
    decode = engine.decoder.decode

    def slow(tokens):
        time.sleep(delay)
        return decode(tokens)

    engine.decoder.decode = slow


def test_greedy_matches_hf_generate(tiny, make_engine):
    engine = make_engine()
    assert isinstance(engine.decoder, SlotDecoder)
    for text in PROMPTS[:2]:
        ids = chat_ids(engine, text)
        req = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=16))
        got = list(req)
        ref = hf_greedy(tiny, ids, 16)
        assert got == ref[:len(got)] and got
        if req.finish_reason == "stop":  # ended on an end-of-turn id that HF does not stop at
            assert ref[len(got)] in engine.stop_ids
        else:
            assert req.finish_reason == "length" and len(got) == 16


def test_batched_equals_single_and_is_batched(make_engine):
    engine = make_engine(stop_ids=set())
    prompts = [chat_ids(engine, p) for p in PROMPTS]
    singles = [list(engine.submit(ids, GREEDY)) for ids in prompts]
    assert engine.stats.peak_batch == 1
    before = engine.stats.steps, engine.stats.decoded_tokens
    gate = gate_prefill(engine)
    reqs = [engine.submit(ids, GREEDY) for ids in prompts]
    gate.set()
    assert [list(r) for r in reqs] == singles
    steps, decoded = engine.stats.steps - before[0], engine.stats.decoded_tokens - before[1]
    assert engine.stats.peak_batch == 4
    # one step advanced all four: 11 decode steps for 4 x 11 decoded tokens
    assert decoded == 4 * (GREEDY.max_new_tokens - 1) and steps == GREEDY.max_new_tokens - 1


def test_stops_at_end_of_turn(tiny, make_engine):
    free = make_engine(stop_ids=set())
    ids = chat_ids(free, PROMPTS[2])
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=7)  # varied, reproducible
    seq = list(free.submit(ids, params))
    k = next(i for i in range(1, len(seq)) if seq[i] not in seq[:i])
    engine = make_engine(stop_ids={seq[k]})
    req = engine.submit(ids, params)
    assert list(req) == seq[:k]  # the stop id itself is not streamed
    assert req.finish_reason == "stop"
    # ignore_eos (benchmarks) runs through it
    req = engine.submit(ids, SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=12, seed=7, ignore_eos=True))
    assert list(req) == seq and req.finish_reason == "length"


def test_max_new_tokens(make_engine):
    engine = make_engine(stop_ids=set())
    for n in (1, 5):
        req = engine.submit(chat_ids(engine, "hi"), SamplingParams(temperature=0.8, max_new_tokens=n))
        assert len(list(req)) == n and req.finish_reason == "length" and len(req.tokens) == n
        assert req.ttft_ms is not None and req.latency_ms >= req.ttft_ms
    with pytest.raises(ValueError):
        engine.submit(chat_ids(engine, "hi"), SamplingParams(max_new_tokens=0))


def test_seed_reproducible_alone_and_in_a_batch(make_engine):
    engine = make_engine(stop_ids=set())
    ids = chat_ids(engine, PROMPTS[1])
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=123)
    first = list(engine.submit(ids, params))
    assert list(engine.submit(ids, params)) == first
    other = list(engine.submit(ids, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=124)))
    assert other != first
    gate = gate_prefill(engine)
    noise = [engine.submit(chat_ids(engine, p), SamplingParams(temperature=1.0, max_new_tokens=10))
             for p in PROMPTS[:2]]
    req = engine.submit(ids, params)
    gate.set()
    assert list(req) == first  # the other rows of the batch do not shift its random stream
    for r in noise:
        list(r)
    assert engine.stats.peak_batch == 3


def test_sample_batch_greedy_topp_and_wide_nucleus():
    gen = torch.Generator().manual_seed(0)
    probs = torch.zeros(1000)
    probs[[7, 3, 9, 4]] = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = torch.log(probs)  # -inf outside the four
    greedy = SamplingParams(temperature=0)
    nucleus = SamplingParams(temperature=1.0, top_p=0.9)
    rows = logits[None].repeat(2, 1)
    counts = {}
    for _ in range(3000):
        g, t = sample_batch(rows, [greedy, nucleus], [None, gen])
        assert g == 7
        counts[t] = counts.get(t, 0) + 1
    assert set(counts) == {7, 3, 9}  # 4 is outside the 0.9 nucleus
    assert abs(counts[7] / 3000 - 0.5 / 0.95) < 0.04
    # a nucleus wider than the top-k shortcut: a slowly decreasing distribution
    wide = -torch.arange(1000, dtype=torch.float32) * 1e-3
    ranks = sample_batch(wide[None].repeat(64, 1), [SamplingParams(temperature=1.0, top_p=0.5)] * 64, [gen] * 64)
    keep = torch.cumsum(torch.softmax(wide, -1), -1) - torch.softmax(wide, -1) < 0.5
    assert all(keep[r] for r in ranks) and max(ranks) > 128  # sampled beyond the first 128
    # no top-p: the whole distribution
    assert set(sample_batch(logits[None].repeat(400, 1), [SamplingParams(temperature=1.0, top_p=1.0)] * 400,
                            [gen] * 400)) == {7, 3, 9, 4}


def test_a_seeded_draw_survives_float_noise_in_the_logits():
    """llama.cpp's batched kernels move logits by ~1e-7 (its seeded answers once changed with
    what else was in the batch).  Here every token has a twin of equal logit, and the noise
    breaks each tie the other way: a draw by sorted CDF moves to the twin, one in vocabulary
    order with a slack at the nucleus's edge does not."""
    for seed in range(4):
        base = (torch.randn(4096, generator=torch.Generator().manual_seed(seed)) * 0.3).repeat_interleave(2)
        noisy = base.clone()
        noisy[1::2] += 1e-7
        for top_p in (0.9, 1.0):
            params = [SamplingParams(temperature=1.0, top_p=top_p)] * 200
            draws = [sample_batch(x[None].repeat(200, 1), params,
                                  [torch.Generator().manual_seed(s) for s in range(200)]) for x in (base, noisy)]
            assert draws[0] == draws[1]
            assert len(set(draws[0])) > 150  # and they are draws, not one token


def test_cancel_stops_promptly_and_frees_the_slot(make_engine):
    engine = make_engine(stop_ids=set())
    slow_decode(engine)
    req = engine.submit(chat_ids(engine, "a long answer"), SamplingParams(max_new_tokens=1000))
    it = iter(req)
    for _ in range(3):
        next(it)
    req.cancel()
    rest = list(it)
    assert req.finish_reason == "cancelled"
    assert len(rest) <= 1 and len(req.tokens) < 10  # at most the token already in flight
    assert engine.load == 0 and not any(engine.decoder.lengths)  # the slot is free
    # a request cancelled before it is admitted never runs
    gate = gate_prefill(engine)
    blocker = engine.submit(chat_ids(engine, "x"), SamplingParams(max_new_tokens=2))
    queued = engine.submit(chat_ids(engine, "y"), SamplingParams(max_new_tokens=2))
    queued.cancel()
    gate.set()
    assert list(queued) == [] and queued.finish_reason == "cancelled"
    assert len(list(blocker)) == 2
    assert engine.load == 0


def test_context_too_long(make_engine):
    engine = make_engine(max_context=64)
    ids = chat_ids(engine, "hi")
    with pytest.raises(ContextTooLong):
        engine.submit(ids, SamplingParams(max_new_tokens=64 - len(ids) + 1))
    with pytest.raises(ContextTooLong):
        engine.check_fits(list(range(60)), SamplingParams(max_new_tokens=8))
    req = engine.submit(ids, SamplingParams(temperature=0, max_new_tokens=64 - len(ids)))
    list(req)  # exactly at the limit: fits
    assert req.error is None and req.finish_reason in ("stop", "length")


def test_loop_decoder_fallback(make_engine):
    fast = make_engine(stop_ids=set())
    slow = make_engine(stop_ids=set(), fast=False)
    assert isinstance(slow.decoder, LoopDecoder)
    prompts = [chat_ids(fast, p) for p in PROMPTS[:3]]
    expected = [list(fast.submit(ids, GREEDY)) for ids in prompts]
    gate = gate_prefill(slow)
    reqs = [slow.submit(ids, GREEDY) for ids in prompts]
    gate.set()
    assert [list(r) for r in reqs] == expected
    assert slow.stats.peak_batch == 3


def test_retire_finishes_in_flight_requests(make_engine):
    engine = make_engine(stop_ids=set())
    slow_decode(engine)
    req = engine.submit(chat_ids(engine, "hi"), SamplingParams(max_new_tokens=20))
    next(iter(req))
    engine.retire()
    with pytest.raises(RuntimeError, match="retired"):
        engine.submit(chat_ids(engine, "hi"), SamplingParams(max_new_tokens=2))
    list(req)
    assert req.finish_reason == "length" and len(req.tokens) == 20
    deadline = time.time() + 10
    while not engine.finished and time.time() < deadline:
        time.sleep(0.02)
    assert engine.finished


def test_engine_error_fails_the_request_not_the_engine(make_engine):
    engine = make_engine(stop_ids=set())
    decode = engine.decoder.decode

    def broken(tokens):
        raise RuntimeError("boom")

    engine.decoder.decode = broken
    req = engine.submit(chat_ids(engine, "hi"), SamplingParams(max_new_tokens=5))
    with pytest.raises(RuntimeError, match="generation failed: boom"):
        list(req)
    assert req.finish_reason == "error" and engine.load == 0
    engine.decoder.decode = decode
    prefill = engine.decoder.prefill
    engine.decoder.prefill = lambda slot, ids, start=0: (_ for _ in ()).throw(ValueError("bad prompt"))
    req = engine.submit(chat_ids(engine, "hi"), SamplingParams(max_new_tokens=5))
    with pytest.raises(RuntimeError, match="bad prompt"):
        list(req)
    engine.decoder.prefill = prefill
    req = engine.submit(chat_ids(engine, "hi"), SamplingParams(max_new_tokens=5))
    assert len(list(req)) == 5 and req.finish_reason == "length"  # still serving


def test_dead_engine_thread_fails_waiting_requests(make_engine):
    engine = make_engine(stop_ids=set())
    gate = gate_prefill(engine)
    first = engine.submit(chat_ids(engine, "a"), SamplingParams(max_new_tokens=30))
    waiting = engine.submit(chat_ids(engine, "b"), SamplingParams(max_new_tokens=30))

    def fatal(wait):  # something outside the per-request guards breaks
        raise SystemError("thread broke")

    engine._begin_prefill = fatal  # noqa: SLF001 - simulating an engine bug; the thread is inside the old one
    gate.set()
    for req in (first, waiting):  # one is prefilling, one waits; neither may hang
        with pytest.raises(RuntimeError, match="thread broke"):
            list(req)
        assert req.finish_reason == "error"
    deadline = time.time() + 10
    while not engine.finished and time.time() < deadline:
        time.sleep(0.02)
    assert engine.finished
    with pytest.raises(RuntimeError):
        engine.submit(chat_ids(engine, "c"), SamplingParams(max_new_tokens=3))


def test_text_stream_and_generate_text(make_engine):
    engine = make_engine(stop_ids=set())
    ids = chat_ids(engine, "hi")
    req = engine.submit(ids, GREEDY)
    texts = list(TextStream(engine.tokenizer, req))
    assert texts and texts[-1] == engine.tokenizer.decode(req.tokens, skip_special_tokens=True)
    assert engine.generate_text([{"role": "user", "content": "hi"}], GREEDY) == texts[-1]


def test_holder_swap_keeps_streams_on_the_old_engine(tmp_path, tokenizer_dir, tiny, make_engine):
    other = models.load(str(build_tiny_model(tmp_path / "tiny-b", tokenizer_dir, seed=1)), tmp_path)
    old = make_engine(stop_ids=set())
    new = make_engine(other, stop_ids=set())
    ids = chat_ids(old, "hello")
    params = SamplingParams(temperature=1.0, top_p=1.0, max_new_tokens=20, seed=5)  # greedy is degenerate here
    old_answer = list(old.submit(ids, params))
    new_answer = list(new.submit(ids, params))
    assert old_answer != new_answer  # the two versions are distinguishable
    holder = ModelHolder(old, "v1")
    slow_decode(old)
    version, engine, req = holder.submit(ids, params)
    stream = iter(req)
    head = [next(stream) for _ in range(3)]
    assert holder.swap(new, "v2") == "v1"
    assert head + list(stream) == old_answer and version == "v1" and engine is old
    version, engine, req = holder.submit(ids, params)
    assert version == "v2" and engine is new and list(req) == new_answer
    deadline = time.time() + 10
    while not old.finished and time.time() < deadline:
        time.sleep(0.02)
    assert old.finished and not new.finished


@pytest.mark.slow
def test_embedded_model_greedy_matches_hf_and_batches(embedded_model_dir, tmp_path):
    loaded = models.load(str(embedded_model_dir), tmp_path)
    engine = Engine(loaded.model, loaded.tokenizer)
    try:
        prompts = [chat_ids(engine, p) for p in PROMPTS[:3]]
        params = SamplingParams(temperature=0, max_new_tokens=24)
        singles = [list(engine.submit(ids, params)) for ids in prompts]
        for ids, got in zip(prompts, singles):
            ref = hf_greedy(loaded, ids, 24)
            assert got and got == ref[:len(got)]
        assert max(len(got) for got in singles) == 24
        gate = gate_prefill(engine)
        reqs = [engine.submit(ids, params) for ids in prompts]
        gate.set()
        assert [list(r) for r in reqs] == singles
        assert engine.stats.peak_batch == 3
    finally:
        engine.close()


@pytest.fixture(scope="module")
def embedded(embedded_model_dir, tmp_path_factory):
    """The real model, for tests where the answer must depend on the whole context (the tiny
    random model's greedy answers hardly do)."""
    return models.load(str(embedded_model_dir), tmp_path_factory.mktemp("embedded"))


@pytest.mark.parametrize("fast", [True, False])
def test_chunked_prefill_equals_whole_prefill(make_engine, embedded, fast):
    """A prompt fed in chunks of 5 tokens gives exactly the answer of one fed at once."""
    whole = make_engine(embedded, stop_ids=set(), fast=fast)
    chunked = make_engine(embedded, stop_ids=set(), fast=fast, prefill_chunk=5)
    ids = chat_ids(whole, PROMPTS[2] + " and a dog, told slowly")
    assert len(ids) > 15
    expected = list(whole.submit(ids, GREEDY))
    assert whole.stats.prefill_chunks == 1
    assert list(chunked.submit(ids, GREEDY)) == expected
    assert chunked.stats.prefill_chunks == -(-len(ids) // 5)


def test_a_long_prompt_does_not_freeze_the_streams(make_engine):
    """While a long prompt is fed chunk by chunk, the running stream keeps getting a token
    every step: between two chunks of the prompt there is a decode step."""
    engine = make_engine(stop_ids=set(), prefill_chunk=8)
    events: list[str] = []
    prefill, decode = engine.decoder.prefill, engine.decoder.decode

    def logged_prefill(slot, ids, start=0):
        events.append(f"P{slot}")
        return prefill(slot, ids, start)

    def logged_decode(tokens):
        events.append(f"D{len(tokens)}")
        return decode(tokens)

    engine.decoder.prefill, engine.decoder.decode = logged_prefill, logged_decode
    running = engine.submit(chat_ids(engine, "hi"), SamplingParams(temperature=0, max_new_tokens=200))
    stream = iter(running)
    next(stream)
    long_ids = chat_ids(engine, " ".join(["word"] * 60))
    late = engine.submit(long_ids, GREEDY)
    assert len(list(late)) == GREEDY.max_new_tokens
    running.cancel()
    list(stream)
    trace = "".join(e[0] for e in events[events.index("P1"):])  # from the long prompt's first chunk (slot 1)
    chunks = -(-len(long_ids) // 8)
    assert trace.startswith("PD" * chunks)  # each chunk followed by a decode of the running stream
    assert late.finish_reason == "length"


def test_a_request_ending_while_a_prompt_is_fed_keeps_that_prompt_intact(make_engine, embedded):
    """When a decoding request ends mid-prefill, the partly fed prompt moves down a slot with
    its cache; every answer is still exactly the answer it gets alone."""
    engine = make_engine(embedded, stop_ids=set(), prefill_chunk=4)
    enc = engine.tokenizer.encode  # raw text, no chat template: no two prompts share a prefix
    # the first ends (3 tokens) while the second prompt is still being fed, 4 tokens a step
    jobs = [(enc("Hi there, how are you today?"), SamplingParams(temperature=0, max_new_tokens=3)),
            (enc("The three longest rivers in Europe are"), SamplingParams(temperature=0, max_new_tokens=24)),
            (enc("A short poem about the sea at night:"), GREEDY)]
    alone = [list(engine.submit(ids, params)) for ids, params in jobs]
    gate = gate_prefill(engine)
    together = [engine.submit(ids, params) for ids, params in jobs]
    gate.set()
    assert [list(r) for r in together] == alone
    assert all(len(ids) > 4 for ids, _ in jobs)  # every prompt took several steps to feed
