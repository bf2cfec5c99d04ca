"""Atomic checkpoints and the version lifecycle: publish, promote, roll back.

A version directory is written under ``versions/.tmp-<id>``, given a manifest (size and
SHA-256 of every file, written last), fsynced and renamed to ``versions/<id>``.  A rename
within one filesystem is atomic, so the server either sees no directory or a complete one;
``assistant.models.load`` re-checks the manifest, so a checkpoint truncated *after*
publishing is refused too and the served model stays as it was.
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


def rollback(registry: Registry, version_id: str, actor: str = "cli", reason: str = "") -> None:
    """Serves an earlier version again; recorded in serving_log like any other change."""
    info = registry.version(version_id)
    models.verify_manifest(info["path"])
    if not Path(info["path"]).exists() and info["kind"] != "sft":
        raise FileNotFoundError(f"version {version_id}'s files are gone: {info['path']}")
    registry.set_served(version_id, "rollback", actor=actor, reason=reason or "rollback")
