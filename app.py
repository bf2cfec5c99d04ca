"""Start the assistant: `python app.py --help` lists every setting (each also an env var)."""

from __future__ import annotations

import logging
import sys

from assistant import serve
from assistant import settings as settings_mod
from assistant.context import AppContext
from assistant.settings import Settings
from feedback.registry import Registry
from feedback.store import FeedbackStore
from retrain.job import reap_stale_runs

log = logging.getLogger("assistant.app")


def create_context(settings: Settings) -> AppContext:
    """Opens the store, marks failed the runs whose process is gone, loads the served
    version (or the last one that loads) and follows the registry for hot swaps."""
    store = FeedbackStore(settings.db_path, scrub_pii=settings.scrub_pii)
    registry = Registry(store)
    reap_stale_runs(registry, settings.data_path, app_starting=True)  # runs a dead app left queued
    holder = serve.start(settings, registry)
    follower = serve.VersionFollower(holder, registry, serve.engine_factory(settings)).start()
    ctx = AppContext(settings=settings, store=store, registry=registry, holder=holder)
    ctx.extras["follower"] = follower
    return ctx


def start_scheduler(ctx: AppContext) -> None:
    """The scheduled retrain (retrain/scheduler.py) and the live canary's decisions
    (retrain/canary.py), each when enabled."""
    if ctx.settings.canary_enabled:
        from retrain.canary import CanaryConfig, CanaryWatcher

        ctx.extras["canary"] = CanaryWatcher(ctx.registry, CanaryConfig.from_settings(ctx.settings)).start()
    if not ctx.settings.retrain_enabled:
        return
    from retrain import scheduler

    scheduler.start_scheduler(ctx)


def close_context(ctx: AppContext) -> None:
    if ctx.scheduler is not None:
        ctx.scheduler.shutdown()
    for name in ("canary", "follower"):
        if name in ctx.extras:
            ctx.extras[name].stop()
    ctx.holder.close()
    ctx.store.close()


def main(argv: list[str] | None = None) -> int:
    settings = settings_mod.parse(argv, description=__doc__)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from assistant import ui
    from assistant.instance import AlreadyRunning, InstanceLock

    try:
        lock = InstanceLock(settings.data_path).acquire()
    except AlreadyRunning as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ctx = create_context(settings)
    try:
        start_scheduler(ctx)
        demo = ui.build_app(ctx)
        log.info("serving model version %s on http://%s:%d", ctx.holder.version, settings.host, settings.port)
        ui.launch(demo, ctx)
    finally:
        close_context(ctx)
        lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
