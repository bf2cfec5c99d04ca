"""One retrain run, start to finish: snapshot -> reward model -> PPO -> gate -> publish.

Runs in its own process (see ``scheduler``), holding ``retrain.lock`` for its whole life so
runs never overlap; the lock is an ``flock`` that the kernel drops when the process dies,
even by ``kill -9``.  Everything it makes is written under ``runs/<run_id>/`` first; the
served model changes only at the very end, by publishing a complete version directory and
appending one row to ``serving_log``.  A run that dies before that row leaves the server
and the feedback exactly as they were; ``reap_stale_runs`` marks it failed afterwards.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from assistant.settings import Settings
from feedback.registry import Registry
from feedback.store import FeedbackStore, now

log = logging.getLogger(__name__)

LOCK_NAME = "retrain.lock"


class RunLocked(RuntimeError):
    """Another retrain holds the lock."""


@contextmanager
def run_lock(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    fh = open(data_dir / LOCK_NAME, "a+")
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked("another retrain run is in progress") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        yield
    finally:
        fh.close()  # closing drops the flock


def lock_held(data_dir: Path) -> bool:
    path = data_dir / LOCK_NAME
    if not path.exists():
        return False
    with open(path, "a+") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(fh, fcntl.LOCK_UN)
        return False


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (killed child not yet reaped) is dead for our purpose
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def reap_stale_runs(registry: Registry, data_dir: Path) -> list[str]:
    """Marks failed every run recorded as queued/running whose process is gone.
    Only trusted while nobody holds the run lock (a live run holds it)."""
    if lock_held(data_dir):
        return []
    reaped = []
    for run in registry.store.query("SELECT id, pid, status FROM training_runs WHERE status IN ('queued','running')"):
        if run["status"] == "running" and _pid_alive(run["pid"]):
            continue
        if run["status"] == "queued" and run["pid"] is None:
            continue  # created by a scheduler that is about to start it
        registry.update_run(run["id"], status="failed", finished_at=now(),
                            reason="the training process died before finishing (killed or crashed); "
                                   "nothing was published")
        reaped.append(run["id"])
    return reaped


# ----------------------------------------------------------------------------- configs
@dataclasses.dataclass
class JobConfig:
    """Overrides for the three stage configs, from ``--retrain-config FILE.json`` with keys
    ``data``, ``reward``, ``ppo``, ``gate`` (each a dict of that stage's config fields)."""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    reward: dict[str, Any] = dataclasses.field(default_factory=dict)
    ppo: dict[str, Any] = dataclasses.field(default_factory=dict)
    gate: dict[str, Any] = dataclasses.field(default_factory=dict)
    min_pairs: int = 8  # below this a run is rejected without training

    @classmethod
    def load(cls, path: str | Path | None) -> JobConfig:
        if not path:
            return cls()
        raw = json.loads(Path(path).read_text())
        unknown = set(raw) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown sections in {path}: {sorted(unknown)}")
        return cls(**raw)


def _build(cls: type, overrides: dict) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(overrides) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**overrides)


def _asdict(obj: Any) -> dict:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else dict(obj)


# ----------------------------------------------------------------------------- the run
class Run:
    """Carries one run's ids and writes its progress to the registry."""

    def __init__(self, registry: Registry, run_id: str):
        self.registry = registry
        self.id = run_id
        self._last_beat = 0.0

    def log(self, phase: str, step: int, metrics: dict[str, float]) -> None:
        self.registry.log_metrics(self.id, phase, step, metrics)
        if time.monotonic() - self._last_beat > 5:
            self.registry.update_run(self.id, heartbeat_at=now())
            self._last_beat = time.monotonic()


# ----------------------------------------------------------------------------- processes
# Under ``accelerate launch`` (one process per GPU) rank 0 does everything that touches the
# database and the disk (lock, snapshot, reward model, gate, publish); every rank joins PPO,
# which shards each rollout batch and averages gradients.  The plan (paths and prompts)
# travels from rank 0 to the others once the reward model is ready, or None to stand down.
def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def _share_plan(plan: dict | None) -> dict | None:
    if _world_size() <= 1:
        return plan
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():  # the launcher set RANK/WORLD_SIZE/MASTER_ADDR; join its group
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    box = [plan]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _join_ppo(config: JobConfig, should_stop: Callable[[], bool] | None) -> dict:
    """What a rank other than 0 does: wait for the plan, train its share of PPO."""
    from retrain.ppo import PPOConfig, train_ppo

    plan = _share_plan(None)
    if plan is None:
        return {}
    train_ppo(plan["policy_path"], plan["ref_path"], plan["reward_path"], plan["prompts"], plan["out_dir"],
              _build(PPOConfig, config.ppo), should_stop=should_stop, ptx_pairs=plan["ptx_pairs"])
    return {"id": plan["run_id"], "status": "worker"}


def run_once(settings: Settings, *, run_id: str | None = None, trigger: str = "manual",
             config: JobConfig | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """Runs one retrain and returns the final run row.  Never raises for a rejected
    candidate; raises (after marking the run failed) for a crash."""
    from retrain import versions

    config = config or JobConfig.load(getattr(settings, "retrain_config", ""))
    if not _is_main():
        return _join_ppo(config, should_stop)
    shared = {"sent": False}
    try:
        return _run_main(settings, run_id, trigger, config, should_stop, shared, versions)
    finally:
        if not shared["sent"]:
            _share_plan(None)  # let waiting ranks go home


def _run_main(settings: Settings, run_id: str | None, trigger: str, config: JobConfig,
              should_stop: Callable[[], bool] | None, shared: dict, versions) -> dict:
    store = FeedbackStore(settings.db_path, scrub_pii=settings.scrub_pii)
    registry = Registry(store)
    try:
        with run_lock(settings.data_path):
            reap_stale_runs_unlocked(registry)
            versions.clean_partial(settings.versions_dir)
            run_id = run_id or registry.create_run(trigger, config=_asdict(config))
            registry.update_run(run_id, status="running", started_at=now(), heartbeat_at=now(), pid=os.getpid())
            run = Run(registry, run_id)
            try:
                _train_and_gate(settings, registry, run, config, should_stop, shared)
            except BaseException as exc:
                registry.update_run(run_id, status="failed", finished_at=now(),
                                    reason=f"{type(exc).__name__}: {exc}"[:2000])
                raise
            finally:
                shutil.rmtree(settings.runs_dir / run_id / "work", ignore_errors=True)
            return registry.run(run_id)
    finally:
        store.close()


def reap_stale_runs_unlocked(registry: Registry) -> None:
    """Inside the lock every other running row is stale by definition."""
    for run in registry.store.query("SELECT id FROM training_runs WHERE status = 'running'"):
        registry.update_run(run["id"], status="failed", finished_at=now(),
                            reason="the training process died before finishing (killed or crashed); "
                                   "nothing was published")


def _train_and_gate(settings: Settings, registry: Registry, run: Run, config: JobConfig,
                    should_stop: Callable[[], bool] | None, shared: dict) -> None:
    import torch

    from retrain import versions
    from retrain.data import build_snapshot
    from retrain.gate import GateConfig, evaluate
    from retrain.ppo import PPOConfig, train_ppo
    from retrain.reward import RewardConfig, train_reward_model

    if settings.retrain_threads:
        torch.set_num_threads(settings.retrain_threads)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    store = registry.store
    snapshot = build_snapshot(store, **config.data)
    registry.update_run(run.id, n_preferences=len(snapshot.train) + len(snapshot.heldout),
                        data={**snapshot.stats, "record_ids": snapshot.record_ids})
    timings["snapshot_s"] = time.monotonic() - t0
    if len(snapshot.train) < config.min_pairs or not snapshot.heldout:
        registry.update_run(run.id, status="rejected", finished_at=now(),
                            reason=f"not enough usable preferences: {len(snapshot.train)} train / "
                                   f"{len(snapshot.heldout)} held-out pairs (need {config.min_pairs}+ and 1+)",
                            decision={"passed": False, "timings": timings})
        return

    served = registry.served_version() or "sft"
    served_path = registry.version(served)["path"]
    sft_path = registry.version("sft")["path"]
    work = settings.runs_dir / run.id / "work"
    work.mkdir(parents=True, exist_ok=True)

    # 1. reward model (warm start from the last one)
    t = time.monotonic()
    reward_cfg = _build(RewardConfig, config.reward)
    previous = registry.latest_reward_model()
    init_from = previous["path"] if previous and Path(previous["path"]).exists() else None
    rm = train_reward_model(sft_path, snapshot.train, snapshot.heldout, str(work / "reward"), reward_cfg,
                            init_from=init_from, log=run.log)
    rm_id = f"rm-{run.id}"
    rm_dir = versions.publish(rm.path, settings.data_path / "reward_models", rm_id)
    registry.register_reward_model(id=rm_id, parent_id=previous["id"] if previous else None, run_id=run.id,
                                   path=str(rm_dir), accuracy=rm.accuracy, ci_low=rm.ci_low, ci_high=rm.ci_high,
                                   margin=rm.margin, n_train=rm.n_train, n_heldout=rm.n_heldout,
                                   norm_mean=rm.norm_mean, norm_std=rm.norm_std)
    registry.update_run(run.id, reward_model_id=rm_id, rm_accuracy=rm.accuracy, rm_ci_low=rm.ci_low,
                        rm_ci_high=rm.ci_high, rm_margin=rm.margin)
    timings["reward_s"] = time.monotonic() - t

    # 2. PPO from the served version, KL against the frozen SFT model
    t = time.monotonic()
    ppo_cfg = _build(PPOConfig, config.ppo)
    ref_path = sft_path if ppo_cfg.ref == "sft" else served_path
    plan = {"run_id": run.id, "policy_path": served_path, "ref_path": ref_path, "reward_path": str(rm_dir),
            "prompts": snapshot.rollout_prompts, "out_dir": str(work / "policy"),
            "ptx_pairs": snapshot.train if ppo_cfg.ptx_coef > 0 else None}  # PPO-ptx: chosen answers, rewrites
    _share_plan(plan)
    shared["sent"] = True
    result = train_ppo(plan["policy_path"], plan["ref_path"], plan["reward_path"], plan["prompts"], plan["out_dir"],
                       ppo_cfg, log=run.log, should_stop=should_stop, ptx_pairs=plan["ptx_pairs"])
    timings["ppo_s"] = time.monotonic() - t

    # 3. gate on held-out evidence
    t = time.monotonic()
    gate_cfg = _build(GateConfig, config.gate)
    report = evaluate(result.path, served_path, sft_path, str(rm_dir), snapshot.heldout_prompts, rm, gate_cfg,
                      log=run.log, previous_rm_accuracy=previous["accuracy"] if previous else None)
    timings["gate_s"] = time.monotonic() - t
    kl = report.metrics.get("kl_candidate_sft")
    decision = {"passed": report.passed, "reasons": report.reasons, "metrics": report.metrics,
                "timings": timings, "ppo": result.final}
    registry.mark_used(run.id, snapshot.record_ids)
    if not report.passed:
        registry.update_run(run.id, status="rejected", finished_at=now(), kl=kl, decision=decision,
                            reason="; ".join(report.reasons) or "gate failed")
        return

    # 4. publish atomically, register with lineage, then tell the server
    version_id = f"v-{run.id.removeprefix('run-')}"
    final = versions.publish(result.path, settings.versions_dir, version_id, {"run_id": run.id, "parent": served})
    registry.register_version(
        version_id=version_id, path=str(final), kind="ppo", parent_id=served, base_model=sft_path,
        run_id=run.id, metrics=report.metrics,
        config={"reward": _asdict(reward_cfg), "ppo": _asdict(ppo_cfg), "gate": _asdict(gate_cfg)},
        feedback={"comparisons": snapshot.record_ids, "reward_model": rm_id})
    registry.update_run(run.id, candidate_version=version_id)
    registry.set_served(version_id, "promote", actor="retrain", reason=f"run {run.id} passed the gate")
    timings["total_s"] = time.monotonic() - t0
    registry.update_run(run.id, status="promoted", finished_at=now(), kl=kl, decision=decision,
                        reason="passed the gate")
