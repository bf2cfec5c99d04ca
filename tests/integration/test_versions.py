"""Atomic publishing, corrupt checkpoints, the run lock, stale runs and the schedule."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from assistant import models, serve
from assistant.engine import SamplingParams
from assistant.settings import Settings
from feedback.registry import Registry
from retrain import job, versions
from retrain.scheduler import STATE_KEY, RetrainScheduler
from tests.factories import PASSWORD, RawConsole, app_settings, launch_app

ROOT = Path(__file__).resolve().parents[2]


def _settings(tmp_path: Path, model_dir: Path, **kw) -> Settings:
    return Settings(data_dir=str(tmp_path / "data"), model=str(model_dir), max_batch=2, **kw)


def test_publish_is_complete_and_verifiable(tmp_path, tiny_model_dir):
    final = versions.publish(tiny_model_dir, tmp_path / "versions", "v-1")
    assert final == tmp_path / "versions" / "v-1"
    assert not list((tmp_path / "versions").glob(".tmp-*"))
    manifest = (final / models.MANIFEST).read_text()
    assert "model.safetensors" in manifest and "v-1" in manifest
    models.verify_manifest(final)  # no exception
    with pytest.raises(FileExistsError):
        versions.publish(tiny_model_dir, tmp_path / "versions", "v-1")


def test_truncated_checkpoint_is_refused(tmp_path, tiny_model_dir):
    final = versions.publish(tiny_model_dir, tmp_path / "versions", "v-bad")
    weights = final / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    with pytest.raises(models.CorruptCheckpoint, match="model.safetensors"):
        models.verify_manifest(final)
    with pytest.raises(models.CorruptCheckpoint):
        models.load(str(final), tmp_path / "models")


def test_partial_publish_leftovers_are_cleaned(tmp_path):
    leftover = tmp_path / "versions" / ".tmp-v-9"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"half")
    assert versions.clean_partial(tmp_path / "versions") == [leftover]
    assert not leftover.exists()


def test_follower_never_serves_a_corrupt_version_then_swaps_to_a_good_one(tmp_path, tiny_model_dir, store):
    settings = _settings(tmp_path, tiny_model_dir)
    registry = Registry(store)
    holder = serve.start(settings, registry)
    try:
        assert holder.version == "sft"
        bad = versions.publish(tiny_model_dir, settings.versions_dir, "v-bad")
        (bad / "model.safetensors").write_bytes(b"garbage")
        registry.register_version(version_id="v-bad", path=str(bad), kind="ppo", parent_id="sft")
        registry.set_served("v-bad", "promote")
        follower = serve.VersionFollower(holder, registry, serve.engine_factory(settings))
        assert follower.check() is False
        assert holder.version == "sft"
        assert "v-bad" in follower.failed
        # the engine still answers
        engine = holder.current()[1]
        assert engine.generate_text([{"role": "user", "content": "hi"}], SamplingParams(max_new_tokens=3, temperature=0))
        good = versions.publish(tiny_model_dir, settings.versions_dir, "v-good")
        registry.register_version(version_id="v-good", path=str(good), kind="ppo", parent_id="sft")
        registry.set_served("v-good", "promote")
        assert follower.check() is True
        assert holder.version == "v-good"
        versions.rollback(registry, "sft", actor="test", reason="undo")
        assert follower.check() is True
        assert holder.version == "sft"
        actions = [(r["version_id"], r["action"]) for r in registry.serving_history()]
        assert actions == [("sft", "serve"), ("v-bad", "promote"), ("sft", "rollback"),  # v-bad failed: written back
                           ("v-good", "promote"), ("sft", "rollback")]
    finally:
        holder.close()


def _published(settings: Settings, registry: Registry, model_dir: Path, version_id: str, parent: str = "sft") -> Path:
    path = versions.publish(model_dir, settings.versions_dir, version_id)
    registry.register_version(version_id=version_id, path=str(path), kind="ppo", parent_id=parent)
    return path


def test_restart_serves_the_last_good_version(tmp_path, tiny_model_dir, store):
    """The recorded version broke while the app was down: a restart serves the newest
    earlier version that still loads (not the SFT model) and records that it did."""
    settings = _settings(tmp_path, tiny_model_dir)
    registry = Registry(store)
    serve.start(settings, registry).close()
    _published(settings, registry, tiny_model_dir, "v-2")
    registry.set_served("v-2", "promote")
    v3 = _published(settings, registry, tiny_model_dir, "v-3", parent="v-2")
    registry.set_served("v-3", "promote")
    holder = serve.start(settings, registry)
    assert holder.version == "v-3"
    holder.close()
    (v3 / "model.safetensors").write_bytes(b"")  # broken while the app was down
    holder = serve.start(settings, registry)
    try:
        assert (holder.version, holder.path) == ("v-2", registry.version("v-2")["path"])
        last = registry.served()
        assert (last["version_id"], last["action"], last["actor"]) == ("v-2", "rollback", "server")
        assert "v-3" in last["reason"] and "load" in last["reason"]
    finally:
        holder.close()


def test_follower_writes_a_failed_load_back_and_retries_a_repaired_version(tmp_path, tiny_model_dir, store):
    """serving_log never keeps naming a version the server could not load, and a version
    that failed once is loaded when it is chosen again after a repair."""
    settings = _settings(tmp_path, tiny_model_dir)
    registry = Registry(store)
    holder = serve.start(settings, registry)
    try:
        path = _published(settings, registry, tiny_model_dir, "v-fix")
        weights = path / "model.safetensors"
        good = weights.read_bytes()
        weights.write_bytes(b"garbage")
        registry.set_served("v-fix", "promote", actor="maintainer")
        follower = serve.VersionFollower(holder, registry, serve.engine_factory(settings))
        assert follower.check() is False and holder.version == "sft"
        last = registry.served()
        assert (last["version_id"], last["action"], last["actor"]) == ("sft", "rollback", "server")
        assert "v-fix" in last["reason"]
        weights.write_bytes(good)  # repaired
        registry.set_served("v-fix", "promote", actor="maintainer")
        assert follower.check() is True and holder.version == "v-fix"
    finally:
        holder.close()


def test_a_candidate_that_fails_to_load_ends_its_trial(tmp_path, tiny_model_dir, store):
    """The canary's candidate cannot be loaded by the app: the trial ends (rejected, with
    the reason) instead of staying on record as a trial nobody runs."""
    settings = _settings(tmp_path, tiny_model_dir)
    registry = Registry(store)
    holder = serve.start(settings, registry)
    try:
        cand = _published(settings, registry, tiny_model_dir, "v-cand")
        (cand / "model.safetensors").write_bytes(b"garbage")
        run = registry.create_run("test")
        registry.start_canary(run_id=run, version_id="v-cand", parent_id="sft")
        follower = serve.VersionFollower(holder, registry, serve.engine_factory(settings))
        assert follower.check() is False and holder.canary_version is None
        assert registry.canary() is None
        row = registry.run(run)
        assert row["status"] == "rejected" and "could not be loaded" in row["reason"]
        assert registry.served_version() == "sft" and holder.version == "sft"
    finally:
        holder.close()


def test_a_version_without_a_valid_manifest_never_serves(tmp_path, tiny_model_dir, store):
    """A PPO version directory without a manifest, or with a file its manifest does not
    list, is refused by a rollback and never loaded by the server."""
    settings = _settings(tmp_path, tiny_model_dir)
    registry = Registry(store)
    holder = serve.start(settings, registry)
    try:
        bare = settings.versions_dir / "v-bare"
        shutil.copytree(tiny_model_dir, bare)  # no manifest: e.g. copied in by hand
        registry.register_version(version_id="v-bare", path=str(bare), kind="ppo", parent_id="sft")
        extra = _published(settings, registry, tiny_model_dir, "v-extra")
        (extra / "adapter_config.json").write_text("{}")  # not in the manifest: would change what loads
        with pytest.raises(models.CorruptCheckpoint, match="adapter_config.json"):
            models.verify_manifest(extra)
        for version in ("v-bare", "v-extra"):
            with pytest.raises(Exception, match="manifest"):
                versions.rollback(registry, version, actor="test")
        follower = serve.VersionFollower(holder, registry, serve.engine_factory(settings))
        for version in ("v-bare", "v-extra"):
            registry.set_served(version, "promote", actor="old-tool")  # written without the checks
            assert follower.check() is False and holder.version == "sft"
            assert registry.served_version() == "sft"
    finally:
        holder.close()


def test_the_console_promote_checks_the_version_like_the_cli(tmp_path, tiny_model_dir):
    """The console's promote/rollback go through the same checks as ``retrain rollback``:
    a version whose files are gone is refused and nothing is recorded."""

    url, ctx, close = launch_app(app_settings(tmp_path / "data", tiny_model_dir, admin_password=PASSWORD))
    try:
        ctx.registry.register_version(version_id="v-gone", path=str(tmp_path / "deleted"), kind="ppo",
                                      parent_id="sft")
        c = RawConsole(url)
        c.ok("login", "admin", PASSWORD)
        c.ok("ask_serve", "v-gone", "promote", "try it")
        ok, error = c.call("confirm_serve")
        assert not ok and "v-gone" in error
        assert ctx.registry.served_version() == "sft" and len(ctx.registry.serving_history()) == 1
    finally:
        close()


def test_a_decision_of_the_canary_never_undoes_a_rollback(tmp_path, tiny_model_dir, store):
    """Votes said promote, but a maintainer rolled back after the check read the served
    version: the trial ends passed, not promoted, and the rollback stays."""
    settings = _settings(tmp_path, tiny_model_dir)
    registry = Registry(store)
    registry.register_version(version_id="sft", path=str(tiny_model_dir), kind="sft")
    registry.set_served("sft", "serve")
    _published(settings, registry, tiny_model_dir, "v-cand")
    _published(settings, registry, tiny_model_dir, "v-old")
    run = registry.create_run("test")
    registry.start_canary(run_id=run, version_id="v-cand", parent_id="sft")
    registry.set_served("v-old", "rollback", actor="maintainer")
    registry.end_canary(run, promote=True, reason="canary: users preferred the candidate", decision={})
    assert registry.served_version() == "v-old" and registry.canary() is None
    row = registry.run(run)
    assert row["status"] == "passed" and "not promoted" in row["reason"] and "v-old" in row["reason"]
    # a trial never starts against a parent that is no longer served
    run2 = registry.create_run("test")
    assert registry.start_canary(run_id=run2, version_id="v-cand", parent_id="sft") is None
    assert registry.canary() is None and registry.run(run2)["status"] == "passed"


def test_a_promoted_canary_is_served_from_its_own_path(tmp_path, tiny_model_dir, store):
    settings = _settings(tmp_path, tiny_model_dir)
    registry = Registry(store)
    holder = serve.start(settings, registry)
    try:
        cand = _published(settings, registry, tiny_model_dir, "v-cand")
        follower = serve.VersionFollower(holder, registry, serve.engine_factory(settings))
        run = registry.create_run("test")
        registry.start_canary(run_id=run, version_id="v-cand", parent_id="sft")
        follower.check()
        assert holder.canary_version == "v-cand"
        registry.end_canary(run, promote=True, reason="votes", decision={})
        assert follower.check() is True
        assert (holder.version, holder.path) == ("v-cand", str(cand))
    finally:
        holder.close()


def test_the_base_version_follows_the_model_flag(tmp_path, tiny_model_dir, store):
    """``sft`` is the model the app was started with: a restart with another ``--model``
    re-registers it (and serves it where ``sft`` is what is served)."""
    registry = Registry(store)
    serve.start(_settings(tmp_path, tiny_model_dir), registry).close()
    other = shutil.copytree(tiny_model_dir, tmp_path / "other-model")
    holder = serve.start(_settings(tmp_path, other), registry)
    try:
        assert registry.version("sft")["path"] == str(other) and registry.version("sft")["base_model"] == str(other)
        assert holder.path == str(other)
    finally:
        holder.close()


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from retrain.job import run_lock
    with run_lock(Path(sys.argv[1])):
        print("locked", flush=True)
        time.sleep(60)
""")


def test_run_lock_is_exclusive_and_released_by_kill_9(tmp_path, store):
    data = tmp_path / "data"
    proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(data)], cwd=ROOT, stdout=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == b"locked"
        assert job.lock_held(data)
        with pytest.raises(job.RunLocked):
            with job.run_lock(data, wait_s=0.5):
                pass
        registry = Registry(store)
        run_id = registry.create_run("test")
        registry.update_run(run_id, status="running", pid=proc.pid)
        assert job.reap_stale_runs(registry, data) == []  # lock held: a live run, leave it
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert not job.lock_held(data)
        assert job.reap_stale_runs(registry, data) == [run_id]
        run = registry.run(run_id)
        assert run["status"] == "failed" and "died" in run["reason"]
        with job.run_lock(data):  # the next run can take the lock
            assert job.lock_held(data)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_schedule_survives_restart(tmp_path, store):
    settings = Settings(data_dir=str(tmp_path / "data"), retrain_interval_minutes=30)
    registry = Registry(store)
    first = RetrainScheduler(settings, store, registry).start()
    planned = first.next_run_time()
    first.shutdown()
    assert planned is not None
    saved = datetime.fromisoformat(store.get_state(STATE_KEY))
    assert saved == planned
    time.sleep(1.1)  # a naive restart would plan "now + 30 min", later than the saved time
    second = RetrainScheduler(settings, store, registry).start()
    try:
        assert second.next_run_time() == planned
    finally:
        second.shutdown()


def test_cron_setting_and_missed_run_time(tmp_path, store):
    settings = Settings(data_dir=str(tmp_path / "data"), retrain_cron="0 3 * * *", retrain_min_preferences=5)
    registry = Registry(store)
    scheduler = RetrainScheduler(settings, store, registry).start()
    try:
        when = scheduler.next_run_time()
        assert (when.hour, when.minute) == (3, 0)
        assert scheduler.tick() is None  # no data: no run
        assert registry.runs() == []
    finally:
        scheduler.shutdown()
    past = datetime.now(timezone.utc) - timedelta(hours=2)
    store.set_state(STATE_KEY, past.isoformat())
    missed = RetrainScheduler(settings, store, registry)
    missed.tick = lambda: None  # the run itself is not under test here
    missed.start()
    try:
        time.sleep(0.5)
        # the missed time fired once at start; the next one is the regular cron time again
        assert missed.next_run_time() > datetime.now(timezone.utc)
    finally:
        missed.shutdown()


def test_no_sql_outside_feedback():
    """SQL lives in feedback/ behind named methods; the retrain side and the app call those."""
    import re

    sql = re.compile(r"\b(SELECT|UPDATE|INSERT|DELETE)\b.*\b(FROM|SET|INTO)\b|\.query\(|\.execute\(")
    files = [*sorted((ROOT / "retrain").glob("*.py")), *sorted((ROOT / "assistant").glob("*.py")), ROOT / "app.py"]
    found = [f"{p.relative_to(ROOT)}:{n}" for p in files
             for n, line in enumerate(p.read_text().splitlines(), 1) if sql.search(line)]
    assert found == []


ASK_LOCK_HELD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from retrain.job import lock_held
    print("asking", flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lock_held(Path(sys.argv[1]))
""")


def test_asking_lock_held_never_makes_a_run_fail(tmp_path):
    """The scheduler asks ``lock_held`` every tick (in the app, while ``retrain run`` may be
    starting in another process); asking must never make a starting run fail with "another
    retrain run is in progress"."""
    data = tmp_path / "data"
    with job.run_lock(data):
        pass  # the lock file exists from now on
    askers = [subprocess.Popen([sys.executable, "-c", ASK_LOCK_HELD, str(data)], cwd=ROOT, stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}) for _ in range(2)]
    refused = 0
    try:
        for asker in askers:
            assert asker.stdout.readline().strip() == b"asking"
        for _ in range(2000):
            try:
                with job.run_lock(data):
                    pass
            except job.RunLocked:
                refused += 1
    finally:
        for asker in askers:
            asker.kill()
            asker.wait()
    assert refused == 0


CREATE_RUN_AND_DIE = textwrap.dedent("""
    import sys
    from feedback.registry import Registry
    from feedback.store import FeedbackStore
    store = FeedbackStore(sys.argv[1])
    print(Registry(store).create_run("schedule"), flush=True)
""")


def test_a_queued_run_of_a_dead_app_is_marked_failed(tmp_path, store):
    """The app created a run row and died before its child started: the row must not stay
    'queued' for ever, neither for the next tick nor for a restarted app."""
    registry = Registry(store)
    proc = subprocess.run([sys.executable, "-c", CREATE_RUN_AND_DIE, str(store.path)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    dead = proc.stdout.strip()
    mine = registry.create_run("manual")  # this process is alive: about to start its child
    assert registry.run(dead)["status"] == "queued"
    assert job.reap_stale_runs(registry, tmp_path / "data") == [dead]
    row = registry.run(dead)
    assert row["status"] == "failed" and "stopped before the training process started" in row["reason"]
    assert registry.run(mine)["status"] == "queued"
    # a restarted app: nothing it finds queued can be its own yet (even a row with its pid)
    assert job.reap_stale_runs(registry, tmp_path / "data", app_starting=True) == [mine]
