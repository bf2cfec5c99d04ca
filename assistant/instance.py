"""One app per data directory.

Two servers on one data directory would both follow the registry and both write the log,
which SQLite survives, but they would also race on the first-start model conversion and
confuse the retrain lock.  The second one is refused with a clear message instead.  The
lock is an ``flock``: the kernel releases it when the process dies, even by ``kill -9``,
so a crash never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
from typing import IO

LOCK_NAME = "app.lock"


class AlreadyRunning(RuntimeError):
    pass


class InstanceLock:
    def __init__(self, data_dir: Path | str):
        self.path = Path(data_dir) / LOCK_NAME
        self._fh: IO[str] | None = None

    def acquire(self) -> InstanceLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(self.path, "a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise AlreadyRunning(
                f"another app (pid {owner}) is already serving data directory {self.path.parent}; "
                "stop it first or pass a different --data-dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
