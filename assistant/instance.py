"""One app per data directory, and the file locks the app and the retrain share.

Two servers on one data directory would both follow the registry and both write the log,
which SQLite survives, but they would also race on the first-start model conversion and
confuse the retrain lock.  The second one is refused with a clear message instead.  The
locks are ``filelock.FileLock`` (an ``flock`` on Unix): the kernel releases one when its
process dies, even by ``kill -9``, so a crash never leaves a stale lock behind.  The owner
writes its pid beside the lock (``<name>.pid``), only for the message the refused one prints.
"""

from __future__ import annotations

import os
from pathlib import Path

from filelock import FileLock, Timeout

LOCK_NAME = "app.lock"


class AlreadyRunning(RuntimeError):
    pass


class HeldLock:
    """A non-reentrant exclusive lock on ``path`` that waits at most ``wait_s`` seconds.

    ``acquire`` raises ``filelock.Timeout`` when another process still holds it after that."""

    def __init__(self, path: Path | str, wait_s: float = 0.0):
        self.path = Path(path)
        self.wait_s = wait_s
        self._lock: FileLock | None = None

    @property
    def pid_path(self) -> Path:
        return self.path.with_name(self.path.name + ".pid")

    def acquire(self) -> HeldLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.path, timeout=self.wait_s)
        lock.acquire()
        self._lock = lock
        self.pid_path.write_text(str(os.getpid()))
        return self

    def release(self) -> None:
        if self._lock is not None:
            self.pid_path.unlink(missing_ok=True)
            self._lock.release()
            self._lock = None

    def owner(self) -> str:
        """The pid the holder wrote, or a description when it cannot be read."""
        try:
            return self.pid_path.read_text().strip() or "unknown"
        except OSError:
            return "unknown"

    def __enter__(self) -> HeldLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def is_held(path: Path | str) -> bool:
    """Whether another holder has the lock on ``path`` right now: one attempt, released at
    once.  Callers that take the lock wait for it (``HeldLock(wait_s=...)``), so this short
    probe can never make them fail."""
    if not Path(path).exists():
        return False
    probe = FileLock(path, timeout=0)
    try:
        probe.acquire()
    except Timeout:
        return True
    probe.release()
    return False


class InstanceLock(HeldLock):
    def __init__(self, data_dir: Path | str):
        super().__init__(Path(data_dir) / LOCK_NAME)

    def acquire(self) -> InstanceLock:
        try:
            super().acquire()
        except Timeout:
            raise AlreadyRunning(
                f"another app (pid {self.owner()}) is already serving data directory {self.path.parent}; "
                "stop it first or pass a different --data-dir") from None
        return self
