"""The served version: which model answers new requests, and an atomic swap to another;
plus, during a live canary, the candidate on trial that writes a share of answers B.

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
        self._canary: Engine | None = None
        self._canary_version: str | None = None
        self._canary_path = ""

    def current(self) -> tuple[str, Engine]:
        with self._lock:
            return self._version, self._engine

    @property
    def version(self) -> str:
        return self.current()[0]

    @property
    def path(self) -> str:
        return self._path

    @property
    def canary_version(self) -> str | None:
        with self._lock:
            return self._canary_version

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               canary: bool = False, client: str = "") -> tuple[str, Engine, Request]:
        """Submits to the current engine under the lock, so a swap cannot retire the engine
        between choosing it and handing it the request.  ``canary``: to the candidate on
        trial instead, if there still is one (answers B only).  ``client``: whom the engine's
        fairness counts it against; raises ``Busy`` when that client or the queue is full."""
        with self._lock:
            engine, version = self._engine, self._version
            if canary and self._canary is not None:
                engine, version = self._canary, self._canary_version
            request = engine.submit(prompt_ids, params, client=client)
            return version, engine, request

    def set_canary(self, engine: Engine | None, version: str | None, path: str = "") -> None:
        """Puts ``engine`` on trial (None: ends the trial); a replaced one finishes its streams."""
        if engine is not None:
            engine.version = version
        with self._lock:
            old, self._canary, self._canary_version = self._canary, engine, version if engine else None
            self._canary_path = path if engine else ""
        if old is not None and old is not engine:
            old.retire()
            self._retired = [e for e in self._retired if not e.finished] + [old]
        log.info("canary on trial: %s", version if engine else "none")

    def promote_canary(self) -> str:
        """Serves the engine on trial for every request (no reload); returns the version it replaced."""
        with self._lock:
            engine, version, path = self._canary, self._canary_version, self._canary_path
            self._canary, self._canary_version, self._canary_path = None, None, ""
        if engine is None:
            raise RuntimeError("no canary to promote")
        return self.swap(engine, version, path)

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

    def close(self) -> None:
        with self._lock:
            engines = [self._engine, *self._retired] + ([self._canary] if self._canary is not None else [])
        for engine in engines:
            engine.close()
