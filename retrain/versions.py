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


def publish(src: Path | str, versions_dir: Path | str, version_id: str, extra: dict | None = None) -> Path:
    """Copies a finished checkpoint into the versions directory atomically; returns its path."""
    src, versions_dir = Path(src), Path(versions_dir)
    versions_dir.mkdir(parents=True, exist_ok=True)
    final = versions_dir / version_id
    if final.exists():
        raise FileExistsError(f"version {version_id} already exists at {final}")
    tmp = versions_dir / f".tmp-{version_id}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    (tmp / models.MANIFEST).unlink(missing_ok=True)
    models.write_manifest(tmp, {"version": version_id})
    _fsync_tree(tmp)
    os.replace(tmp, final)
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
