"""Launch the real app (store, engine, Gradio server) on a free local port, for tests.

    url, ctx, close = launch_app(settings)
    client = gradio_client.Client(url)
    ...
    close()

Other test modules reuse this; keep it a plain function.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from assistant.client import free_port
from assistant.context import AppContext
from assistant.settings import Settings


def app_settings(data_dir: Path | str, model: Path | str, **changes) -> Settings:
    """Settings for a test app: its own data directory, no scheduled retrain, loopback."""
    base = Settings(data_dir=str(data_dir), model=str(model), host="127.0.0.1", retrain_enabled=False,
                    max_new_tokens=16, threads=1, max_batch=4)
    return base.replace(**changes)


def launch_app(settings: Settings, *, with_scheduler: bool = False) -> tuple[str, AppContext, Callable[[], None]]:
    """Builds the whole app like ``app.py`` does and serves it on a free port without
    blocking.  Returns (url, ctx, close); ``close`` stops the server, the engine and the store."""
    import app
    from assistant import ui

    port = free_port() if settings.port in (0, 7860) else settings.port
    settings = settings.replace(port=port)
    ctx = app.create_context(settings)
    try:
        if with_scheduler:
            app.start_scheduler(ctx)
        demo = ui.build_app(ctx)
        _, url, _ = ui.launch(demo, ctx, prevent_thread_lock=True, quiet=True)
    except BaseException:
        app.close_context(ctx)
        raise

    def close() -> None:
        try:
            demo.close()
        finally:
            app.close_context(ctx)

    return url, ctx, close


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10, interval_s: float = 0.05) -> bool:
    """Polls until ``predicate()`` holds (another process's writes, a swap); False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()
