"""Which waiting request decodes next, and when to refuse one at once.

Sessions are free, so fairness is counted per *client* (``Request.client``: the connection's
address, or the address a trusted proxy names; see ``Settings.trusted_proxies``):

- each client has its own queue, and the next request comes from the next client in turn
  (round-robin), so one client's burst never stands in front of another client's first
  message;
- at most ``per_client_running`` of one client's requests decode at once, so the batch keeps
  room for everybody else;
- the queue is bounded: beyond ``per_client_waiting`` waiting requests of one client, or
  ``max_waiting`` in all, ``add`` refuses at once with ``Busy`` ("try again in about N s")
  instead of letting the wait grow without end.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from assistant.engine.request import Busy, Request


@dataclass(frozen=True)
class Limits:
    """Per-client and overall limits on requests (None: no limit)."""

    per_client_running: int | None = None
    """most requests of one client decoding at once"""
    per_client_waiting: int | None = None
    """most requests of one client waiting for a slot; more are refused at once"""
    max_waiting: int | None = None
    """most requests waiting in all; more are refused at once"""

    def __post_init__(self):
        if self.per_client_running is not None and self.per_client_running < 1:
            raise ValueError("a client must be allowed at least 1 answer decoding at once")
        for name in ("per_client_waiting", "max_waiting"):
            if (getattr(self, name) or 0) < 0:
                raise ValueError(f"{name} must not be negative")


class Scheduler:
    """Thread-safe: callers ``add``, the engine's thread takes ``next``."""

    def __init__(self, limits: Limits, retry_after_s: Callable[[int], int]):
        self.limits = limits
        self._retry_after_s = retry_after_s  # waiting requests -> seconds until a slot is likely free
        self._queues: OrderedDict[str, deque[Request]] = OrderedDict()  # in turn order
        self._waiting = 0
        self._closed: str | None = None  # why no request is taken any more
        self._cv = threading.Condition()

    def __len__(self) -> int:
        return self._waiting

    def add(self, req: Request) -> None:
        """Queues ``req``; raises ``Busy`` when a limit is reached, RuntimeError once closed."""
        limits = self.limits
        with self._cv:
            if self._closed:
                raise RuntimeError(self._closed)
            mine = self._queues.get(req.client)
            if limits.max_waiting is not None and self._waiting >= limits.max_waiting:
                raise Busy(f"The assistant is busy; try again in about {self._retry_after_s(self._waiting)} s.",
                           self._retry_after_s(self._waiting))
            if mine is not None and limits.per_client_waiting is not None \
                    and len(mine) >= limits.per_client_waiting:
                wait = self._retry_after_s(len(mine))
                raise Busy(f"You already have {len(mine)} answers waiting; try again in about {wait} s.", wait)
            if mine is None:
                mine = self._queues[req.client] = deque()
            mine.append(req)
            self._waiting += 1
            self._cv.notify_all()

    def next(self, running: Counter[str], timeout: float | None = None) -> Request | None:
        """The next request allowed to start, given how many each client has ``running``:
        from the first client in turn under its cap, which then goes to the back of the turn.
        Waits up to ``timeout`` seconds for one (None: returns at once)."""
        with self._cv:
            if timeout:
                self._cv.wait_for(lambda: self._closed or self._pick(running) is not None, timeout)
            client = self._pick(running)
            if client is None:
                return None
            mine = self._queues.pop(client)
            req = mine.popleft()
            if mine:
                self._queues[client] = mine  # back of the turn
            self._waiting -= 1
            return req

    def _pick(self, running: Counter[str]) -> str | None:
        cap = self.limits.per_client_running
        for client in self._queues:
            if cap is None or running[client] < cap:
                return client
        return None

    def close(self, reason: str) -> None:
        """Takes no more requests (those waiting still run); wakes the engine's thread."""
        with self._cv:
            self._closed = self._closed or reason
            self._cv.notify_all()

    def drain(self) -> list[Request]:
        """Removes and returns every waiting request."""
        with self._cv:
            reqs = [r for q in self._queues.values() for r in q]
            self._queues.clear()
            self._waiting = 0
            return reqs
