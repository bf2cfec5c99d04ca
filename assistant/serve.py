"""Start serving, and follow the version registry.

The retrain job runs in another process and never touches the server: it writes a version
directory, registers it and appends a row to ``serving_log``.  The server follows that log
(``VersionFollower``) and hot-swaps.  A rollback from the CLI or console is the same thing:
one more row.  So a crashed retrain can never leave the server half-swapped.
"""

from __future__ import annotations

import logging
import threading

from assistant import models
from assistant.engine import Engine
from assistant.holder import EngineFactory, ModelHolder
from assistant.settings import Settings
from feedback.registry import Registry

log = logging.getLogger(__name__)

BASE_VERSION = "sft"


def engine_factory(settings: Settings) -> EngineFactory:
    def build(version: str, path: str) -> Engine:
        loaded = models.load(path, settings.models_dir, device=settings.device, dtype=settings.dtype,
                             base_model=settings.base_model)
        return Engine(loaded.model, loaded.tokenizer, version=version, max_batch=settings.max_batch,
                      threads=settings.threads)
    return build


def base_version_id(settings: Settings) -> str:
    return BASE_VERSION


def start(settings: Settings, registry: Registry) -> ModelHolder:
    """Serves the version the registry last chose; on a first start, registers the SFT model
    given by ``--model`` as the base version and serves it.  If the recorded version cannot
    be loaded (deleted directory, corrupt weights), falls back to the base and says so."""
    base_path = models.resolve(settings.model, settings.models_dir)
    registry.register_version(version_id=base_version_id(settings), path=base_path, kind="sft",
                              base_model=settings.model, note="the SFT model the app was started with")
    if registry.served_version() is None:
        registry.set_served(base_version_id(settings), "serve", reason="first start")
    factory = engine_factory(settings)
    version = registry.served_version() or base_version_id(settings)
    path = registry.version(version)["path"]
    try:
        engine = factory(version, path)
    except Exception as exc:  # noqa: BLE001 - a broken checkpoint must not stop the app
        log.error("cannot load served version %s from %s (%s); serving the base model", version, path, exc)
        version, path = base_version_id(settings), base_path
        engine = factory(version, path)
        registry.set_served(version, "rollback", reason=f"served version failed to load: {exc}")
    return ModelHolder(engine, version, path)


class VersionFollower:
    """Polls the registry and swaps the holder when the served version changes."""

    def __init__(self, holder: ModelHolder, registry: Registry, factory: EngineFactory,
                 interval_s: float = 2.0):
        self.holder = holder
        self.registry = registry
        self.factory = factory
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="version-follower", daemon=True)
        self.failed: dict[str, str] = {}  # version -> why it could not be loaded

    def start(self) -> VersionFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def check(self) -> bool:
        """One poll; returns True when it swapped the served version.  Also loads or drops
        the candidate on trial when the registry's canary changes."""
        swapped = self._follow_served()
        self._follow_canary()
        return swapped

    def _follow_served(self) -> bool:
        wanted = self.registry.served_version()
        if not wanted or wanted == self.holder.version or wanted in self.failed:
            return False
        if wanted == self.holder.canary_version:  # promoted by its trial: already loaded
            self.holder.promote_canary()
            return True
        path = self.registry.version(wanted)["path"]
        try:
            self.holder.load_and_swap(wanted, path, self.factory)
        except Exception as exc:  # noqa: BLE001 - keep serving the current version
            log.error("could not load version %s from %s: %s; still serving %s",
                      wanted, path, exc, self.holder.version)
            self.failed[wanted] = str(exc)
            return False
        return True

    def _follow_canary(self) -> None:
        state = self.registry.canary()
        wanted = state["version_id"] if state else None
        if wanted == self.holder.canary_version or (wanted in self.failed):
            return
        if wanted is None:
            self.holder.set_canary(None, None)
            return
        path = self.registry.version(wanted)["path"]
        try:
            self.holder.set_canary(self.factory(wanted, path), wanted)
        except Exception as exc:  # noqa: BLE001 - no trial rather than no chat
            log.error("could not load the canary %s from %s: %s", wanted, path, exc)
            self.failed[wanted] = str(exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the follower
                log.exception("version follower poll failed")
