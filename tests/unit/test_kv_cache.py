"""The engine's KV cache is sized to the chats in it, not to the model's whole context.

One long chat used to grow the cache of *every* batch slot to the next power of two of its
length and keep it for ever (2.8 GiB for one 4,200-token chat on SmolLM2-135M at the
default 8 slots; ``benchmarks/kv_memory.py`` measures it).  These tests use the tiny model
and check the bytes the decoder holds, and that resizing under live requests changes no
token (exact greedy decoding against Hugging Face ``generate``).
"""

from __future__ import annotations

import time

import pytest
import torch

from assistant import models
from assistant.engine import Engine, SamplingParams


@pytest.fixture(scope="module")
def tiny(tiny_model_dir, tmp_path_factory):
    return models.load(str(tiny_model_dir), tmp_path_factory.mktemp("models"))


def kv_bytes(engine: Engine) -> int:
    return sum(t.numel() * t.element_size() for t in engine.decoder.kv)


def position_bytes(engine: Engine) -> int:
    """Bytes of one position of one sequence (k and v, every layer)."""
    d = engine.decoder
    return 2 * d.n_kv * d.head_dim * len(d.layers) * torch.empty((), dtype=d.dtype).element_size()


def long_prompt(n: int, seed: int = 0) -> list[int]:
    return torch.randint(100, 5000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(loaded, ids: list[int], n: int) -> list[int]:
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                    pad_token_id=loaded.tokenizer.pad_token_id)
    return out[0, len(ids):].tolist()


def wait_idle(engine: Engine) -> None:
    deadline = time.monotonic() + 10
    while engine.load and time.monotonic() < deadline:
        time.sleep(0.01)


def test_one_long_chat_sizes_the_cache_to_itself_and_gives_it_back(tiny):
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=4)
    try:
        idle = kv_bytes(engine)
        prompt, answer = long_prompt(700), 20
        request = engine.submit(prompt, SamplingParams(temperature=0, max_new_tokens=answer, ignore_eos=True))
        peak = 0
        for _ in request:
            peak = max(peak, kv_bytes(engine))
        wait_idle(engine)
        # one sequence of prompt + answer, rounded up to one block of 256 positions at most
        assert peak <= position_bytes(engine) * (len(prompt) + answer + 256)
        assert kv_bytes(engine) <= idle  # handed back once the chat ended
    finally:
        engine.close()


def test_resizing_under_live_requests_changes_no_token(tiny):
    """A short chat is decoding when a long one joins (the cache grows, copying the short
    one's keys and values) and is still decoding when the long one ends (it shrinks)."""
    engine = Engine(tiny.model, tiny.tokenizer, max_batch=4)
    try:
        short_ids = engine.encode_chat([{"role": "user", "content": "Tell me a story about a small cat"}])
        long_ids = long_prompt(600, seed=1)
        greedy = dict(temperature=0, ignore_eos=True)
        short = engine.submit(short_ids, SamplingParams(max_new_tokens=60, **greedy))
        stream = iter(short)
        first = [next(stream)]
        grown = engine.submit(long_ids, SamplingParams(max_new_tokens=5, **greedy))
        long_tokens = list(grown)
        short_tokens = first + list(stream)
        assert engine.stats.peak_batch == 2  # they were decoded together
        assert long_tokens == hf_greedy(tiny, long_ids, 5)
        assert short_tokens == hf_greedy(tiny, short_ids, 60)
    finally:
        engine.close()
