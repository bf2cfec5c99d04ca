"""The served version: which model answers new requests, and an atomic swap to another.

A stream binds to the engine that was current when it started and stays on it; ``swap``
only changes where *new* requests go, then retires the old engine, which finishes its
streams in flight and frees its weights.  So a hot swap cuts no chat and no request ever
sees a half-loaded model: the new engine is fully built before the pointer moves.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from assistant.engine import Engine, Request, SamplingParams

log = logging.getLogger(__name__)

EngineFactory = Callable[[str, str], Engine]  # (version_id, path) -> Engine


class ModelHolder:
    def __init__(self, engine: Engine, version: str, path: str = ""):
        engine.version = version
        self._engine = engine
        self._version = version
        self._path = path
        self._lock = threading.Lock()
        self._retired: list[Engine] = []

    def current(self) -> tuple[str, Engine]:
        with self._lock:
            return self._version, self._engine

    @property
    def version(self) -> str:
        return self.current()[0]

    @property
    def path(self) -> str:
        return self._path

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[str, Engine, Request]:
        """Submits to the current engine under the lock, so a swap cannot retire the engine
        between choosing it and handing it the request."""
        with self._lock:
            request = self._engine.submit(prompt_ids, params)
            return self._version, self._engine, request

    def swap(self, engine: Engine, version: str, path: str = "") -> str:
        """Makes ``engine`` serve new requests; returns the version it replaced."""
        engine.version = version
        with self._lock:
            old, old_version = self._engine, self._version
            self._engine, self._version, self._path = engine, version, path
        if old is not engine:
            old.retire()  # streams in flight finish on the old weights
            self._retired = [e for e in self._retired if not e.finished] + [old]
        log.info("now serving version %s (was %s)", version, old_version)
        return old_version

    def load_and_swap(self, version: str, path: str, factory: EngineFactory) -> str:
        """Builds the new engine first (slow, outside the lock), then swaps (instant).
        If loading fails, what is served does not change."""
        engine = factory(version, path)
        return self.swap(engine, version, path)

    def close(self) -> None:
        with self._lock:
            engines = [self._engine, *self._retired]
        for engine in engines:
            engine.close()
