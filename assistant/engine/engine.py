"""The engine: one decoding thread per loaded model that batches concurrent requests.

Why a thread of our own instead of ``model.generate``: several chat users must not wait
for one another.  Every step the thread advances *all* decoding requests by one token in a
single batched forward pass (continuous batching: a request joins after its prefill and
leaves the batch at its end-of-turn token, its stop button or its token limit), and feeds
the next waiting prompt in chunks of ``prefill_chunk`` tokens, one chunk per step, so a long
prompt never freezes the streams already running.  The ``Scheduler`` decides which waiting
request starts next (round-robin across clients, per-client caps, a bounded queue).
``Engine.stats`` counts steps and decoded tokens, which shows whether requests were batched.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass

import torch

from assistant.engine.decoders import Decoder, LoopDecoder, SlotDecoder, fast_path_supported
from assistant.engine.request import ContextTooLong, FinishReason, Request
from assistant.engine.sampling import SamplingParams, sample_batch
from assistant.engine.scheduler import Limits, Scheduler

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    """What the decoding thread did: lets tests and benchmarks see that requests were batched."""

    steps: int = 0  # batched decode steps
    decoded_tokens: int = 0  # tokens produced by decode steps (sum of the batch sizes)
    prefills: int = 0  # prompts fully prefilled
    prefill_chunks: int = 0  # prefill forward passes (a long prompt takes several)
    peak_batch: int = 0  # the largest batch one decode step advanced
    model_s: float = 0.0  # seconds in the decoder's forward passes (prefill and decode)
    busy_s: float = 0.0  # seconds the thread spent working (forward passes, sampling, bookkeeping)

    @property
    def mean_batch(self) -> float:
        return self.decoded_tokens / self.steps if self.steps else 0.0


@dataclass
class Prefill:
    """The request whose prompt is being fed, in the slot just after the decoding batch."""

    request: Request
    done: int = 0  # prompt tokens already in the cache


class Engine:
    """Owns one loaded model and its decoding thread.

    ``submit`` is thread-safe and returns at once; the request's tokens arrive on its queue.
    ``retire`` stops intake and lets requests in flight finish, which is how a hot swap
    keeps streams on the weights they started with.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, version: str = "unversioned",
                 max_batch: int = 8, max_context: int | None = None, stop_ids: set[int] | None = None,
                 fast: bool | None = None, threads: int = 0, limits: Limits | None = None,
                 prefill_chunk: int = 256, decoder: Decoder | None = None):
        from assistant.models import stop_token_ids

        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        if prefill_chunk < 1:
            raise ValueError("prefill_chunk must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.version = version
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_context = min(max_context or limit, limit)
        self.stop_ids = stop_ids if stop_ids is not None else stop_token_ids(model, tokenizer)
        if decoder is None:  # one of the torch decoders (``decoder``: another backend, e.g. llama.cpp)
            use_fast = fast_path_supported(model) if fast is None else fast
            cls = SlotDecoder if use_fast else LoopDecoder
            with torch.inference_mode():
                decoder = cls(model, max_batch, self.max_context)
        self.decoder: Decoder = decoder
        self.threads = threads
        self.stats = EngineStats()
        self.scheduler = Scheduler(limits or Limits(), self.retry_after_s)
        self._slots: list[Request] = []  # decoding, in slots 0..B-1
        self._prefill: Prefill | None = None  # in slot B
        self._mean_latency_s = 10.0  # of finished requests, for "try again in about N s"
        self._retired = threading.Event()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"engine-{version}", daemon=True)
        self._thread.start()

    # -- public API -------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The tokenizer's own chat template with the assistant turn opened."""
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)
        return list(enc["input_ids"])

    def check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        need = len(prompt_ids) + params.max_new_tokens
        if need > self.max_context:
            raise ContextTooLong(
                f"the conversation is too long for the model: {len(prompt_ids)} prompt tokens + "
                f"{params.max_new_tokens} answer tokens exceed its context of {self.max_context} tokens; "
                "start a new chat or shorten the message")

    def submit(self, prompt_ids: list[int], params: SamplingParams, client: str = "") -> Request:
        """Queues a request for ``client``; raises ``Busy`` when the queue or the client's share
        of it is full, RuntimeError when the engine is retired."""
        if not prompt_ids:
            raise ValueError("empty prompt")
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.check_fits(prompt_ids, params)
        req = Request(prompt_ids=list(prompt_ids), params=params, client=client)
        if params.seed is not None:
            req.generator = torch.Generator(device="cpu").manual_seed(int(params.seed))
        self.scheduler.add(req)
        return req

    def generate_text(self, messages: list[dict], params: SamplingParams) -> str:
        req = self.submit(self.encode_chat(messages), params)
        return self.tokenizer.decode(list(req), skip_special_tokens=True)

    @property
    def load(self) -> int:
        return len(self._slots) + (self._prefill is not None) + len(self.scheduler)

    def retry_after_s(self, waiting: int) -> int:
        """Rough seconds until a request behind ``waiting`` others gets a slot."""
        return max(1, math.ceil(self._mean_latency_s * (1 + waiting / self.max_batch)))

    def retire(self) -> None:
        """No new requests; the thread exits once the ones in flight are done."""
        self._retired.set()
        self.scheduler.close(f"engine for version {self.version} is retired")

    def close(self, timeout: float | None = 30) -> None:
        self.retire()
        self._thread.join(timeout)

    @property
    def finished(self) -> bool:
        return self._stopped.is_set()

    # -- decoding thread ------------------------------------------------------------------
    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        fatal: BaseException | None = None
        try:
            with torch.inference_mode():
                while not (self._retired.is_set() and self._idle() and not len(self.scheduler)):
                    self._step()
        except BaseException as exc:  # the thread itself broke: nobody may wait forever
            log.exception("engine %s stopped", self.version)
            fatal = exc
        finally:
            self._stop(fatal)

    def _step(self) -> None:
        """Drop what was cancelled, feed waiting prompts, decode one token for the batch."""
        self._drop_cancelled()
        self._feed_prompts(budget=self.prefill_chunk)
        if self._slots:
            try:
                self._decode()
            except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                log.exception("decode step failed")
                for slot in reversed(range(len(self._slots))):
                    self._finish(slot, FinishReason.ERROR, exc)

    def _idle(self) -> bool:
        return not self._slots and self._prefill is None

    def _feed_prompts(self, budget: int) -> None:
        """Starts waiting requests and feeds their prompts, ``budget`` tokens in all per step:
        short prompts join the batch together, a long one goes on in the next steps."""
        while budget > 0:
            if self._prefill is None and not self._begin_prefill(wait=self._idle()):
                return
            slot = len(self._slots)
            try:
                budget -= self._advance_prefill(budget)
            except Exception as exc:  # noqa: BLE001 - reported to the request, engine lives on
                log.exception("prefill failed")
                self._finish(slot, FinishReason.ERROR, exc)
                return

    def _begin_prefill(self, wait: bool) -> bool:
        """Takes the next request the scheduler allows into the slot after the batch."""
        while len(self._slots) < self.max_batch:
            running = Counter(r.client for r in self._slots)
            req = self.scheduler.next(running, timeout=0.5 if wait else None)
            if req is None:
                return False
            if req.cancelled.is_set():
                req.close(FinishReason.CANCELLED)
                continue
            self._prefill = Prefill(req)
            self._fit()
            return True
        return False

    def _advance_prefill(self, budget: int) -> int:
        """Feeds the prompt's next tokens (at most ``budget``); at its end, samples the first
        token and the request joins the decoding batch.  Returns the tokens fed."""
        p, slot = self._prefill, len(self._slots)
        started = time.perf_counter()
        ids = p.request.prompt_ids
        chunk = ids[p.done:p.done + budget]
        logits = self.decoder.prefill(slot, chunk, p.done)
        self.stats.model_s += time.perf_counter() - started
        self.stats.prefill_chunks += 1
        p.done += len(chunk)
        if p.done == len(ids):
            self._prefill = None
            self._slots.append(p.request)
            self.stats.prefills += 1
            token = sample_batch(logits[None], [p.request.params], [p.request.generator])[0]
            if p.request.emit(token, self.stop_ids):
                self._finish(slot)
        self.stats.busy_s += time.perf_counter() - started
        return len(chunk)

    def _decode(self) -> None:
        batch = list(self._slots)
        started = time.perf_counter()
        logits = self.decoder.decode([r.tokens[-1] for r in batch])
        stats = self.stats
        stats.model_s += time.perf_counter() - started
        tokens = sample_batch(logits, [r.params for r in batch], [r.generator for r in batch])
        stats.steps += 1
        stats.decoded_tokens += len(batch)
        stats.peak_batch = max(stats.peak_batch, len(batch))
        done = [r.emit(tok, self.stop_ids) for r, tok in zip(batch, tokens)]
        for slot in reversed(range(len(done))):
            if done[slot]:
                self._finish(slot)
        stats.busy_s += time.perf_counter() - started

    def _drop_cancelled(self) -> None:
        for slot in reversed(range(len(self._slots))):
            if self._slots[slot].cancelled.is_set():
                self._finish(slot, FinishReason.CANCELLED)
        if self._prefill is not None and self._prefill.request.cancelled.is_set():
            self._finish(len(self._slots), FinishReason.CANCELLED)

    def _finish(self, slot: int, reason: FinishReason | None = None, error: BaseException | None = None) -> None:
        """Ends the request in ``slot`` (the prefill's slot: the one being prefilled) and keeps
        the slots dense: the last decoding one moves in, and the prefill after it."""
        if slot == len(self._slots):
            req, self._prefill = self._prefill.request, None
            self.decoder.release(slot)
        else:
            req = self._slots[slot]
            last = len(self._slots) - 1
            try:
                if slot != last:
                    self.decoder.move(last, slot)
                    self._slots[slot] = self._slots[last]
                self.decoder.release(last)
                if self._prefill is not None:
                    self.decoder.move(last + 1, last)
                    self.decoder.release(last + 1)
            finally:
                self._slots.pop()
        if reason is not None:
            req.finish_reason = reason
        req.close(reason or FinishReason.ERROR, error)
        if req.latency_ms is not None and error is None:
            self._mean_latency_s = 0.8 * self._mean_latency_s + 0.2 * req.latency_ms / 1000
        self._fit()

    def _fit(self) -> None:
        """Sizes the decoder's cache to the requests in the slots (prompt + answer budget)."""
        reqs = self._slots + ([self._prefill.request] if self._prefill else [])
        self.decoder.fit([len(r.prompt_ids) + r.params.max_new_tokens for r in reqs])

    def _stop(self, fatal: BaseException | None) -> None:
        """The thread's end: whatever is still in flight or waiting fails, nobody waits forever."""
        self._retired.set()
        self.scheduler.close(f"engine for version {self.version} stopped")
        self._stopped.set()
        error = fatal or RuntimeError(f"engine for version {self.version} stopped")
        stranded = self._slots + ([self._prefill.request] if self._prefill else []) + self.scheduler.drain()
        self._slots.clear()
        self._prefill = None
        for req in stranded:
            req.close(FinishReason.ERROR, error)
