"""Start serving, and follow the version registry.

The retrain job runs in another process and never touches the server: it writes a version
directory, registers it and appends a row to ``serving_log``.  The server follows that log
(``VersionFollower``) and hot-swaps.  A rollback from the CLI or console is the same thing:
one more row, written by ``retrain.versions.serve_version`` after checking the version.
So a crashed retrain can never leave the server half-swapped.  What the server could not
load it writes back to the log, so the log always names what is really served.
"""

from __future__ import annotations

import logging
import threading

from assistant import models
from assistant.engine import Engine, Limits
from assistant.holder import EngineFactory, ModelHolder
from assistant.settings import Settings
from feedback.registry import Registry
from feedback.store import StoreError

log = logging.getLogger(__name__)

BASE_VERSION = "sft"


def engine_factory(settings: Settings) -> EngineFactory:
    def build(version: str, path: str) -> Engine:
        loaded = models.load(path, settings.models_dir, device=settings.device, dtype=settings.dtype,
                             base_model=settings.base_model)
        decoder = llamacpp_decoder(settings, loaded)
        return Engine(loaded.model, loaded.tokenizer, version=version, max_batch=settings.max_batch,
                      threads=settings.threads, limits=engine_limits(settings), prefill_chunk=settings.prefill_chunk,
                      decoder=decoder)
    return build


def llamacpp_decoder(settings: Settings, loaded: models.Loaded):
    """The llama.cpp decoder for a loaded version when ``--backend`` allows it and it can serve
    it (CPU, llama-cpp-python installed, a GGUF of the base model, a plain LoRA adapter if
    any); None for the torch decoders.  ``--backend llamacpp`` refuses what it cannot serve."""
    from assistant.engine import gguf, llamacpp

    if settings.backend not in ("auto", "llamacpp", "torch"):
        raise ValueError(f"--backend must be auto, llamacpp or torch, not {settings.backend!r}")
    if settings.backend == "torch":
        return None
    adapter = loaded.path if models.is_adapter(loaded.path) else None
    base = models.resolve(settings.base_model or models.adapter_base(adapter), settings.models_dir) if adapter \
        else loaded.path
    served, why = gguf.llamacpp_base(base, settings.models_dir / "gguf",
                                     on_cpu=next(loaded.model.parameters()).device.type == "cpu")
    if why:
        if settings.backend == "llamacpp":
            raise ValueError(f"--backend llamacpp cannot serve {loaded.path}: {why}")
        log.info("serving %s with the torch decoder: %s", loaded.path, why)
        return None
    cfg = loaded.model.config
    lora = gguf.cached_lora_gguf(adapter, settings.models_dir / "gguf", cfg.num_attention_heads,
                                 cfg.num_key_value_heads) if adapter else None
    limit = getattr(cfg, "max_position_embeddings", None) or 2048
    log.info("serving %s with llama.cpp (%s%s)", loaded.path, served.name, f" + LoRA {lora.name}" if lora else "")
    return llamacpp.LlamaCppDecoder(served, settings.max_batch, limit, lora=lora, threads=settings.threads,
                                    n_batch=max(512, settings.prefill_chunk))


def engine_limits(settings: Settings) -> Limits:
    """The app's per-client fairness limits, as the engine's scheduler takes them."""
    return Limits(per_client_running=settings.client_max_streams, per_client_waiting=settings.client_max_waiting,
                  max_waiting=settings.max_waiting)


def base_version_id(settings: Settings) -> str:
    return BASE_VERSION


def load_version(registry: Registry, factory: EngineFactory, version: str) -> tuple[Engine, str]:
    """Builds the engine of a registered version after checking it may be loaded (a
    published version needs its files and a manifest that verifies; ``models.verify_version``).
    Returns (engine, path); raises with the reason when it cannot be loaded."""
    info = registry.version(version)
    models.verify_version(info["path"], info["kind"])
    return factory(version, info["path"]), info["path"]


def start(settings: Settings, registry: Registry) -> ModelHolder:
    """Serves the version the registry last chose.  The SFT model given by ``--model`` is
    (re-)registered as the base version on every start, and served on a first start.  If the
    recorded version cannot be loaded (deleted directory, corrupt weights, no manifest), the
    newest earlier version that loads is served instead, and serving_log says so."""
    base = base_version_id(settings)
    base_path = models.resolve(settings.model, settings.models_dir)
    if registry.register_base(base, base_path, settings.model, note="the SFT model the app was started with"):
        log.info("base version %s is %s (%s)", base, settings.model, base_path)
    if registry.served_version() is None:
        registry.set_served(base, "serve", reason="first start")
    factory = engine_factory(settings)
    wanted = registry.served_version()
    failures: list[str] = []
    for version in dict.fromkeys([*registry.last_good_versions(), base]):
        try:
            engine, path = load_version(registry, factory, version)
        except Exception as exc:  # noqa: BLE001 - a broken checkpoint must not stop the app
            log.error("cannot load version %s (%s)", version, exc)
            failures.append(f"{version}: {exc}")
            continue
        if version != wanted:
            log.error("serving %s instead of %s, which failed to load", version, wanted)
            registry.set_served(version, "rollback", actor="server",
                                reason=f"at start, could not load {'; '.join(failures)}; "
                                       f"serving the last version that loads")
        return ModelHolder(engine, version, path)
    raise RuntimeError(f"no model version can be loaded: {'; '.join(failures)}")


class VersionFollower:
    """Polls the registry and swaps the holder when the served version changes.

    A version that fails to load is written back: a row in serving_log serving again what
    the holder serves (actor ``server``), so the log never names a version nobody serves,
    and choosing the version again later (after a repair) is a new row that is tried anew.
    A candidate on trial that fails to load ends its trial (rejected)."""

    def __init__(self, holder: ModelHolder, registry: Registry, factory: EngineFactory,
                 interval_s: float = 2.0):
        self.holder = holder
        self.registry = registry
        self.factory = factory
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="version-follower", daemon=True)
        self.failed: dict[str, str] = {}  # version -> why it last failed to load (for the logs and tests)
        self._failed_rows: set[int] = set()  # serving_log rows already tried and failed
        self._failed_trials: set[str] = set()  # runs whose candidate failed to load

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
        row = self.registry.served()
        wanted = row["version_id"] if row else None
        if not wanted or wanted == self.holder.version or row["id"] in self._failed_rows:
            return False
        if wanted == self.holder.canary_version:  # promoted by its trial: already loaded
            self.holder.promote_canary()
            return True
        try:
            engine, path = load_version(self.registry, self.factory, wanted)
        except Exception as exc:  # noqa: BLE001 - keep serving the current version
            self._write_back(row, exc)
            return False
        self.holder.swap(engine, wanted, path)
        return True

    def _write_back(self, row: dict, exc: Exception) -> None:
        """Records that ``row``'s version could not be loaded by serving the current one
        again, unless a newer row was written meanwhile (that one is followed next)."""
        current = self.holder.version
        log.error("could not load version %s: %s; still serving %s", row["version_id"], exc, current)
        self.failed[row["version_id"]] = str(exc)
        self._failed_rows.add(row["id"])
        self.registry.set_served(current, "rollback", actor="server", only_if_row=row["id"],
                                 reason=f"could not load {row['version_id']}: {exc}"[:2000])

    def _follow_canary(self) -> None:
        state = self.registry.canary()
        wanted = state["version_id"] if state else None
        if wanted == self.holder.canary_version or (state and state["run_id"] in self._failed_trials):
            return
        if wanted is None:
            self.holder.set_canary(None, None)
            return
        try:
            engine, path = load_version(self.registry, self.factory, wanted)
        except Exception as exc:  # noqa: BLE001 - no trial rather than no chat
            log.error("could not load the canary %s: %s; ending its trial", wanted, exc)
            self.failed[wanted] = str(exc)
            self._failed_trials.add(state["run_id"])
            try:
                self.registry.end_canary(state["run_id"], promote=False, decision={"load_error": str(exc)},
                                         reason=f"the candidate could not be loaded by the app: {exc}"[:2000])
            except StoreError:  # the trial ended meanwhile
                pass
            return
        self.holder.set_canary(engine, wanted, path)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - a database hiccup must not kill the follower
                log.exception("version follower poll failed")
