"""The scheduled retrain: APScheduler decides *when*, a child process does the work.

- Interval (``--retrain-interval-minutes``, default 60) or crontab (``--retrain-cron``).
- A tick starts a run only when at least ``--retrain-min-preferences`` new usable
  preferences exist (not excluded, not opted out, not used by an earlier run).
- Runs never overlap: APScheduler's ``max_instances=1`` inside one app, and the run lock
  (an ``flock`` held by the child) across processes, including ``retrain run --now``.
- The next run time is saved in ``app_state`` after every tick and restored at start, so an
  app restart does not push the schedule back; a time missed while the app was down runs
  once, at start (coalesced).
- Training runs in ``python -m retrain run`` with its CPU threads capped and a lower
  priority (nice), so a crash, an exception or ``kill -9`` cannot touch the server.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from datetime import datetime, timezone
from pathlib import Path

from assistant.settings import Settings, to_env
from feedback.registry import Registry
from feedback.store import FeedbackStore, now

log = logging.getLogger(__name__)

STATE_KEY = "retrain.next_run_time"
JOB_ID = "retrain"
REPO_ROOT = Path(__file__).resolve().parent.parent


def child_env(settings: Settings) -> dict[str, str]:
    threads = str(max(1, settings.retrain_threads))
    env = {**os.environ, **to_env(settings), "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    return env


class RetrainScheduler:
    def __init__(self, settings: Settings, store: FeedbackStore, registry: Registry):
        self.settings = settings
        self.store = store
        self.registry = registry
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._scheduler = None

    # -- schedule ------------------------------------------------------------------------
    def _trigger(self):
        from apscheduler.triggers.cron import CronTrigger
        from apscheduler.triggers.interval import IntervalTrigger

        if self.settings.retrain_cron:
            return CronTrigger.from_crontab(self.settings.retrain_cron, timezone=timezone.utc)
        return IntervalTrigger(minutes=max(1, self.settings.retrain_interval_minutes), timezone=timezone.utc)

    def start(self) -> RetrainScheduler:
        from apscheduler.schedulers.background import BackgroundScheduler

        saved = self.store.get_state(STATE_KEY)
        first = datetime.fromisoformat(saved) if saved else None
        self._scheduler = BackgroundScheduler(timezone=timezone.utc)
        trigger = self._trigger()
        if first is None:
            first = trigger.get_next_fire_time(None, datetime.now(timezone.utc))
        self._scheduler.add_job(self.tick, trigger, id=JOB_ID, next_run_time=first, max_instances=1,
                                coalesce=True, misfire_grace_time=None, replace_existing=True)
        self._scheduler.start()
        self._save_next()
        log.info("retrain scheduled; next check at %s", self.next_run_time())
        return self

    def shutdown(self) -> None:
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)

    def next_run_time(self) -> datetime | None:
        if self._scheduler is None:
            saved = self.store.get_state(STATE_KEY)
            return datetime.fromisoformat(saved) if saved else None
        job = self._scheduler.get_job(JOB_ID)
        return job.next_run_time if job else None

    def _save_next(self) -> None:
        when = self.next_run_time()
        if when is not None:
            self.store.set_state(STATE_KEY, when.isoformat())

    # -- runs -----------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        from retrain.job import lock_held

        proc = self._process
        return (proc is not None and proc.poll() is None) or lock_held(self.settings.data_path)

    def tick(self) -> str | None:
        """The scheduled job: start a run if there is enough new data and none is running."""
        from retrain.job import reap_stale_runs

        try:
            reap_stale_runs(self.registry, self.settings.data_path)
            new = self.store.count_new_preferences()
            if new < self.settings.retrain_min_preferences:
                log.info("retrain skipped: %d new preferences (< %d)", new, self.settings.retrain_min_preferences)
                return None
            if self.running:
                log.info("retrain skipped: a run is in progress")
                return None
            return self.run_now(trigger="schedule", wait=True)
        finally:
            # the job's own next fire time is set by APScheduler after this returns; save it
            # from a short-lived thread so a restart mid-run still knows the schedule
            threading.Timer(0.5, self._save_next).start()

    def run_now(self, trigger: str = "manual", wait: bool = False) -> str:
        """Starts a run in a child process and returns its id at once (or after it ends when
        ``wait``).  Refuses while another run holds the lock."""
        with self._lock:
            if self.running:
                raise RuntimeError("a retrain run is already in progress")
            run_id = self.registry.create_run(trigger)
            cmd = ["nice", "-n", "10", sys.executable, "-m", "retrain", "run", "--run-id", run_id, "--trigger", trigger]
            log_path = self.settings.runs_dir / run_id / "train.log"
            log_path.parent.mkdir(parents=True, exist_ok=True)
            out = open(log_path, "ab")
            self._process = subprocess.Popen(
                cmd, cwd=str(REPO_ROOT), env=child_env(self.settings), stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)
            out.close()
            proc = self._process
            self.registry.update_run(run_id, pid=proc.pid)  # the child owns the queued row from now on
        watcher = threading.Thread(target=self._watch, args=(proc, run_id, log_path), daemon=True)
        watcher.start()
        if wait:
            watcher.join()
        return run_id

    def _watch(self, proc: subprocess.Popen, run_id: str, log_path: Path) -> None:
        code = proc.wait()
        try:
            run = self.registry.run(run_id)
        except Exception:  # noqa: BLE001
            return
        if run["status"] in ("queued", "running"):
            tail = log_path.read_text(errors="replace")[-1500:] if log_path.exists() else ""
            self.registry.update_run(run_id, status="failed", finished_at=now(),
                                     reason=f"training process exited with code {code}: {tail.strip()[-600:]}")
        log.info("retrain %s finished with exit code %s (%s)", run_id, code, self.registry.run(run_id)["status"])

    def kill(self) -> None:
        """Stops a run in progress (used by tests and shutdown); the run is then marked failed."""
        proc = self._process
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def start_scheduler(ctx) -> RetrainScheduler:
    """Called by app.py: builds the scheduler on the app's store and starts it."""
    scheduler = RetrainScheduler(ctx.settings, ctx.store, ctx.registry).start()
    ctx.scheduler = scheduler
    return scheduler
