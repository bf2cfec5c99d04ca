"""Atomic checkpoints and the version lifecycle: publish, promote, roll back.

A version directory is written under ``versions/.tmp-<id>``, given a manifest (size and
SHA-256 of every file, written last), fsynced and renamed to ``versions/<id>``.  A rename
within one filesystem is atomic, so the server either sees no directory or a complete one;
the manifest is checked again before anything serves the version (``check_servable`` here,
``assistant.models.verify_version`` in the server), so a checkpoint truncated or added to
*after* publishing, or a directory without a manifest, is refused and the served model
stays as it was.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from assistant import models
from feedback.registry import Registry
from feedback.store import NotFound, StoreError


def _fsync_tree(directory: Path) -> None:
    for p in directory.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(final: Path | str, *, replace: bool = True) -> Iterator[Path]:
    """Yields an empty temporary directory beside ``final`` to write into; when the block
    ends without error it is fsynced and renamed to ``final`` (an existing ``final`` is moved
    aside first and removed, or, with ``replace=False``, is an error); on an error it is
    removed.  Readers see no directory or a complete one, never a half-written one."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not replace:
        raise FileExistsError(f"{final} already exists")
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}-{time.time_ns()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish(src: Path | str, versions_dir: Path | str, version_id: str, extra: dict | None = None) -> Path:
    """Copies a finished checkpoint into the versions directory atomically, with a manifest
    written last; returns its path."""
    final = Path(versions_dir) / version_id
    with atomic_dir(final, replace=False) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
        (tmp / models.MANIFEST).unlink(missing_ok=True)
        models.write_manifest(tmp, {"version": version_id})
    return final


def clean_partial(versions_dir: Path | str) -> list[Path]:
    """Removes ``.tmp-*`` leftovers of publishes that were killed half-way."""
    removed = []
    for p in Path(versions_dir).glob(".tmp-*"):
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


class NotServable(StoreError):
    """A version that must not be served: unknown, its files gone, or its manifest missing
    or not matching.  A StoreError, so the console shows the message as it is."""


def check_servable(registry: Registry, version_id: str) -> dict:
    """Raises NotServable unless ``version_id`` can be loaded as it was published: its
    directory exists and, for anything but the base model, carries a manifest that verifies
    (every listed file intact, nothing unlisted).  Returns the version's row."""
    try:
        info = registry.version(version_id)
    except NotFound as exc:
        raise NotServable(str(exc)) from None
    try:
        models.verify_version(info["path"], info["kind"])
    except models.CorruptCheckpoint as exc:
        raise NotServable(f"version {version_id} cannot be served: {exc}") from None
    return info


def serve_version(registry: Registry, version_id: str, action: str, *, actor: str, reason: str = "") -> None:
    """The one way a person (console, ``retrain rollback``) changes what is served: checks
    the version (``check_servable``), then appends it to ``serving_log``, which the app
    follows.  A run's promotion makes the same check, then ``Registry.promote_run`` (or
    ``start_canary``), which also require the run's parent to still be served."""
    check_servable(registry, version_id)
    registry.set_served(version_id, action, actor=actor, reason=reason)


def rollback(registry: Registry, version_id: str, actor: str = "cli", reason: str = "") -> None:
    """Serves an earlier version again; recorded in serving_log like any other change."""
    serve_version(registry, version_id, "rollback", actor=actor, reason=reason or "rollback")
