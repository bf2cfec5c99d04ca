"""One generation request as the engine and its caller share it, and how it ends."""

from __future__ import annotations

import enum
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from assistant.engine.sampling import SamplingParams


class FinishReason(enum.StrEnum):
    """Why a request stopped (a ``str``: stored and compared as its value)."""

    STOP = "stop"  # the model wrote an end-of-turn token
    LENGTH = "length"  # it reached its ``max_new_tokens``
    CANCELLED = "cancelled"  # its caller asked it to stop
    ERROR = "error"  # generation failed (``Request.error`` says why)


class ContextTooLong(ValueError):
    """The prompt plus the answer budget does not fit the model's context."""


class Busy(RuntimeError):
    """Refused at once: the queue (or this client's share of it) is full.  ``retry_after_s``
    estimates when a slot frees up."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


_DONE = object()


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    client: str = ""  # whom fairness counts this request against ("" = anonymous, one client)
    output: queue.Queue[object] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Asks the engine to stop this request; takes effect before its next token."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[int]:
        """Yields token ids as the engine produces them; raises if generation failed."""
        while True:
            item = self.output.get()
            if item is _DONE:
                if self.error is not None:
                    raise RuntimeError(f"generation failed: {self.error}") from self.error
                return
            yield item  # type: ignore[misc]

    @property
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else 1000 * (self.first_token_at - self.submitted_at)

    @property
    def latency_ms(self) -> float | None:
        return None if self.finished_at is None else 1000 * (self.finished_at - self.submitted_at)

    def emit(self, token: int, stop_ids: set[int]) -> bool:
        """Records one sampled token; returns True when the request is over."""
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
        if token in stop_ids and not self.params.ignore_eos:
            self.finish_reason = FinishReason.STOP
            return True
        self.tokens.append(token)
        self.output.put(token)
        if len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = FinishReason.LENGTH
            return True
        return False

    def close(self, reason: FinishReason, error: BaseException | None = None) -> None:
        """Ends the stream; a reason set earlier (stop, length) wins over ``reason``."""
        if error is not None:
            self.error = error
        self.finish_reason = self.finish_reason or reason
        self.finished_at = time.perf_counter()
        self.output.put(_DONE)


class TextStream:
    """Turns a request's token ids into growing text, holding back half a UTF-8 character."""

    def __init__(self, tokenizer, request: Request):
        self.tokenizer = tokenizer
        self.request = request
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        ids: list[int] = []
        for tok in self.request:
            ids.append(tok)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            self.text = text
            yield text
        final = self.tokenizer.decode(ids, skip_special_tokens=True)
        if final != self.text:
            self.text = final
            yield final
