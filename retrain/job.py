"""One retrain run, start to finish: snapshot -> reward model -> PPO -> gate -> publish.

Runs in its own process (see ``scheduler``), holding ``retrain.lock`` for its whole life so
runs never overlap; the lock is a ``filelock.FileLock`` (an ``flock``) that the kernel drops
when the process dies, even by ``kill -9``.  Everything it makes is written under
``runs/<run_id>/`` first; the served model changes only at the very end, by publishing a
complete version directory and
appending one row to ``serving_log``, or, with the live canary on (the default), by putting the
published candidate on trial (``retrain.canary``), where users' votes decide.  Either happens
only if the version the run trained from is still served (one transaction): a rollback made
during the run is never undone; the run is then recorded as passed, not promoted.  A run that
dies before that leaves the server and the feedback exactly as they were;
``reap_stale_runs`` marks it failed afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import Timeout

from assistant import models
from assistant.instance import HeldLock, is_held
from assistant.settings import Settings
from feedback.registry import Registry
from feedback.store import FeedbackStore, now
from retrain.config import RetrainConfig

log = logging.getLogger(__name__)

LOCK_NAME = "retrain.lock"
LOCK_WAIT_S = 5.0
LABEL_SCORES = "label_scores.json"  # runs/<id>/: out-of-fold disagreement per label (``label_scores``)
GATE_ANSWERS = "gate_answers.json"  # runs/<id>/: the gate's held-out answers of candidate and served model
"""How long a run waits for the lock before it gives up: longer than any ``lock_held`` probe."""
DIED = "the training process died before finishing (killed or crashed); nothing was published"
ORPHANED = "the app that queued this run stopped before the training process started; nothing was published"


class RunLocked(RuntimeError):
    """Another retrain holds the lock."""


@contextmanager
def run_lock(data_dir: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Holds the run lock for the block.  Waits up to ``wait_s`` for it, so another
    process's ``lock_held`` probe (which holds it for microseconds) never refuses a run;
    raises RunLocked when a run still holds it after that."""
    lock = HeldLock(Path(data_dir) / LOCK_NAME, wait_s=wait_s)
    try:
        lock.acquire()
    except Timeout:
        raise RunLocked(f"another retrain run is in progress (pid {lock.owner()})") from None
    try:
        yield
    finally:
        lock.release()


def lock_held(data_dir: Path) -> bool:
    """Whether a run holds the lock now (a probe that never makes a run fail: see ``run_lock``)."""
    return is_held(Path(data_dir) / LOCK_NAME)


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


def _owner_gone(run: dict, app_starting: bool) -> bool:
    """A queued or running row's owner (the app that queued it, then the training process;
    ``Registry.create_run`` records the pid) is gone.  A row without a pid has no owner
    (older databases).  A starting app has queued nothing yet, so a row naming its own pid
    is a dead app's whose pid was reused (containers start every app as the same pid)."""
    pid = run["pid"]
    if pid is None or (app_starting and pid == os.getpid()):
        return True
    return not _pid_alive(pid)


def reap_stale_runs(registry: Registry, data_dir: Path, *, app_starting: bool = False) -> list[str]:
    """Marks failed every run recorded as queued/running whose owner process is gone: the
    training process that died, or the app that died before its child started.  Only
    trusted while nobody holds the run lock (a live run holds it).  ``app_starting``: called
    by an app on start (see ``_owner_gone``)."""
    if lock_held(data_dir):
        return []
    stale = [run for run in registry.unfinished_runs() if _owner_gone(run, app_starting)]
    _fail(registry, stale)
    return [run["id"] for run in stale]


def _fail(registry: Registry, runs: list[dict]) -> None:
    for status, reason in (("running", DIED), ("queued", ORPHANED)):
        registry.fail_runs([run["id"] for run in runs if run["status"] == status], reason)


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


def _join_ppo(config: RetrainConfig, should_stop: Callable[[], bool] | None) -> dict:
    """What a rank other than 0 does: wait for the plan, train its share of PPO."""
    plan = _share_plan(None)
    if plan is None:
        return {}
    run_ppo(plan, config.ppo, should_stop=should_stop)
    return {"id": plan["run_id"], "status": "worker"}


def run_once(settings: Settings, *, run_id: str | None = None, trigger: str = "manual",
             config: RetrainConfig | None = None, should_stop: Callable[[], bool] | None = None) -> dict:
    """Runs one retrain and returns the final run row.  Never raises for a rejected
    candidate; raises (after marking the run failed) for a crash."""
    from retrain import versions

    config = config or RetrainConfig.load(getattr(settings, "retrain_config", "") or None)
    config.with_app_settings(settings)
    if not _is_main():
        return _join_ppo(config, should_stop)
    shared = {"sent": False}
    try:
        return _run_main(settings, run_id, trigger, config, should_stop, shared, versions)
    finally:
        if not shared["sent"]:
            _share_plan(None)  # let waiting ranks go home


def _run_main(settings: Settings, run_id: str | None, trigger: str, config: RetrainConfig,
              should_stop: Callable[[], bool] | None, shared: dict, versions) -> dict:
    store = FeedbackStore(settings.db_path, scrub_pii=settings.scrub_pii)
    registry = Registry(store)
    try:
        with run_lock(settings.data_path):
            reap_stale_runs_unlocked(registry)
            versions.clean_partial(settings.versions_dir)
            run_id = run_id or registry.create_run(trigger, config=config.as_dict())
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
    """Inside the lock every other running row is stale by definition, and so is a queued
    one whose owner is gone (this run's own row is queued by a live owner: this process)."""
    _fail(registry, [run for run in registry.unfinished_runs()
                     if run["status"] == "running" or _owner_gone(run, False)])



# ----------------------------------------------------------------------------- loading and saving
def _accelerator():
    """accelerate's Accelerator (one process per device under ``accelerate launch``), or None."""
    import torch

    try:
        from accelerate import Accelerator

        return Accelerator(cpu=not torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - accelerate is optional at run time
        return None


def load_policy(policy_path: str, cfg, device: str):
    """The policy as a trainable PEFT model named 'default' on the SFT base.  From an adapter
    version: that adapter, trained further.  From a full model: a new LoRA on its top layers.
    Returns (peft model, tokenizer, sft base path)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    from retrain.backbone import decoder_of
    from retrain.reward import LORA_TARGETS

    resolved = models.resolve(policy_path, Path(policy_path).parent)
    if models.is_adapter(resolved):
        base_path = models.adapter_base(resolved)
        base = models.load(base_path, Path(base_path).parent, device=device, dtype="float32").model
        model = PeftModel.from_pretrained(base, resolved, is_trainable=True)
        tok = models.load_tokenizer(resolved if Path(resolved, "tokenizer_config.json").exists() else base_path)
    else:
        base_path = resolved
        loaded = models.load(resolved, Path(resolved).parent, device=device, dtype="float32")
        base, tok = loaded.model, loaded.tokenizer
        n = len(decoder_of(base).layers)
        k = max(1, min(cfg.lora_layers, n))
        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=LORA_TARGETS,
                          layers_to_transform=list(range(n - k, n)), bias="none")
        model = get_peft_model(base, lcfg)
    model.eval()  # dropout off
    return model, tok, base_path


def save_policy(model, tok, base_path: str, out_dir: Path, meta: dict) -> None:
    from retrain.versions import atomic_dir

    with atomic_dir(out_dir) as tmp:
        model.peft_config["default"].base_model_name_or_path = str(base_path)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "training.json").write_text(json.dumps(meta, indent=2, default=str))


def run_ppo(plan: dict, cfg, *, log=None, should_stop=None):
    """Loads the policy, the KL reference, the reward model and its critic copy from the
    plan's paths, trains (every rank), and saves the policy (rank 0).  Returns PPOResult."""
    from retrain.backbone import end_of_turn_id
    from retrain.ppo import train_ppo
    from retrain.reward import load_reward_model
    from retrain.rollout import make_sampler

    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    accelerator = _accelerator()
    device = str(accelerator.device) if accelerator is not None else "cpu"
    policy, tok, base_path = load_policy(plan["policy_path"], cfg, device)
    ref_model = None
    ref_spec = plan["ref_path"]
    if ref_spec and os.path.realpath(models.resolve(ref_spec, Path(ref_spec).parent)) != os.path.realpath(base_path):
        ref_model = models.load(ref_spec, Path(ref_spec).parent, device=device, dtype="float32").model
    rm = load_reward_model(plan["reward_path"], device=device)
    value = rm.as_value_model()
    judge = None  # the reward model PPO does not optimise: its score of fresh rollouts stops PPO early
    if plan.get("judge_path"):
        judge = load_reward_model(plan["judge_path"], device=device,
                                  model=rm.model if getattr(rm, "design", "") == "features" else None)
    stop_ids = models.stop_token_ids(policy.get_base_model(), tok) | {end_of_turn_id(tok)}
    sampler = make_sampler(plan.get("sampler", "torch"), base_path, policy, plan.get("gguf_dir") or
                           Path(plan["out_dir"]).parent, threads=cfg.threads, work_dir=Path(plan["out_dir"]).parent)
    try:
        result = train_ppo(policy, tok, rm, value, plan["prompts"], cfg, stop_ids=stop_ids,
                           eot_id=end_of_turn_id(tok), ref_model=ref_model, log=log, should_stop=should_stop,
                           ptx_pairs=plan["ptx_pairs"], accelerator=accelerator,
                           sampler=sampler.follow(policy) if sampler else None, judge=judge)
    finally:
        if sampler:
            sampler.close()
    if accelerator is None or accelerator.is_main_process:
        save_policy(policy, tok, base_path, Path(plan["out_dir"]),
                    {"config": dataclasses.asdict(cfg), "steps": result.steps, "final": result.final,
                     "stopped": result.stopped, "stop_reason": result.stop_reason, "kept_step": result.kept_step,
                     "policy_from": plan["policy_path"], "ref": ref_spec, "reward_model": plan["reward_path"],
                     "wall_s": result.wall_s})
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return result


# ----------------------------------------------------------------------------- the stages
def fit_role(sft_path: str, pairs, points, reference, config: RetrainConfig, init_from: str | None, run: Run,
             role: str, shared: dict):
    """One role's reward model of ``config.reward.design``, trained on its fold and normalised
    on ``reference`` answers.  ``shared`` carries what both roles reuse (the frozen SFT model
    and its features or states).  Returns (model, RewardMetrics)."""
    from retrain.reward import new_reward_model, normalize, train_reward_model

    cfg = config.reward
    if cfg.design == "features":
        from retrain.head_rm import fit_feature_model

        return fit_feature_model(sft_path, pairs, points, reference, cfg, init_from, shared, log=run.log,
                                 phase=f"rm_{role}")
    if cfg.design != "lora":
        raise ValueError(f"reward.design must be features or lora, not {cfg.design!r}")
    rm = new_reward_model(sft_path, cfg, init_from, "cpu")
    cache = shared.setdefault("cache", rm.cache(cfg.lower_batch))
    rm.state_cache = cache
    trained = train_reward_model(rm, pairs, points, cfg, cache=cache, log=run.log, phase=f"rm_{role}")
    trained.norm = normalize(rm, reference, cache, cfg.max_ref_samples, cfg.seed)
    return rm, trained


def train_cross_fitted(sft_path: str, snapshot, config: RetrainConfig, registry: Registry, run: Run) -> dict:
    """Two reward models on disjoint halves of the data (``Pair.fold``, by prompt): the *policy*
    RM (fold 0), which PPO optimises, and the *judge* (fold 1), which the gate and PPO's early
    stop use.  Each warm-starts from the previous run's model of the same role.  Their
    accuracy is measured out of fold: every decisive training pair by the model that never saw
    it, and every held-out pair by the mean of both.  Returns the models and the evaluation."""
    import torch

    from retrain.reward import accuracy_of

    rms, trained, previous, shared = {}, {}, {}, {}
    for fold, role in ((0, "policy"), (1, "judge")):
        prev = registry.latest_reward_model(role)
        previous[role] = prev
        init_from = prev["path"] if prev and Path(prev["path"]).exists() else None
        pairs = [p for p in snapshot.train if p.fold == fold]
        points = [q for q in snapshot.train_points if q.fold == fold]
        reference = snapshot.reference or [(p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)]
        rms[role], trained[role] = fit_role(sft_path, pairs, points, reference, config, init_from, run, role, shared)
        trained[role].norm["norm_source"] = "reference model answers" if snapshot.reference else "training answers"
    # out-of-fold evaluation
    unseen_by_policy = [p for p in snapshot.train if p.fold == 1]
    unseen_by_judge = [p for p in snapshot.train if p.fold == 0]
    oof = unseen_by_policy + unseen_by_judge
    margins = [rms["policy"].pair_margins(unseen_by_policy), rms["judge"].pair_margins(unseen_by_judge)]
    both = None
    if snapshot.heldout:
        both = (rms["policy"].pair_margins(snapshot.heldout) + rms["judge"].pair_margins(snapshot.heldout)) / 2
        margins.append(both)
    all_margins = torch.cat(margins)
    ev = accuracy_of(all_margins, oof + snapshot.heldout)
    held = accuracy_of(both, snapshot.heldout) if both is not None else {}
    ev.update(heldout_accuracy=held.get("accuracy"), heldout_n=held.get("n", 0), design=config.reward.design,
              steps_policy=trained["policy"].steps, steps_judge=trained["judge"].steps,
              interaction_policy=trained["policy"].norm.get("interaction"),
              interaction_judge=trained["judge"].norm.get("interaction"))
    run.log("rm", 0, {k: float(v) for k, v in ev.items() if isinstance(v, (int, float)) and v is not None})
    # every unpaired label scored the same way: by the model that never trained on it
    points = [q for q in snapshot.train_points if q.fold == 1], [q for q in snapshot.train_points if q.fold == 0]
    scores = [rms["policy"].point_scores(points[0]), rms["judge"].point_scores(points[1])]
    if snapshot.heldout_points:
        scores.append((rms["policy"].point_scores(snapshot.heldout_points)
                       + rms["judge"].point_scores(snapshot.heldout_points)) / 2)
    labels = label_scores(oof + snapshot.heldout, all_margins.tolist(),
                          [*points[0], *points[1], *snapshot.heldout_points], torch.cat(scores).tolist())
    return {"models": rms, "trained": trained, "previous": previous, "eval": ev, "label_scores": labels}


def record_of(item_id: str, source: str) -> str:
    """The feedback record (``comparison:ID`` / ``rating:ID``) a training item came from."""
    if item_id.startswith("thumbs:"):  # an up and a down on one context: the down is the judgement
        return "rating:" + item_id.split(":")[2]
    if source.startswith("thumb"):
        return "rating:" + item_id
    return "comparison:" + item_id.split(":")[0]


def label_scores(pairs, margins: list[float], points, scores: list[float]) -> list[dict]:
    """How strongly the reward models, out of fold, disagree with each human label, for the
    console's disagreement queue (``runs/<id>/label_scores.json``).  ``disagreement`` is in
    reward-std units: for a decided pair, how far the models prefer the rejected answer
    (``-margin``); for a tie, ``|margin|``; for an unpaired good / bad label, how far the
    answer scores below / above a typical reference answer.  Negative: the models agree."""
    rows = [{"record": record_of(p.id, p.source), "item": p.id, "source": p.source, "label": p.label,
             "model": round(m, 4), "disagreement": round(abs(m) if not p.decisive else -m, 4)}
            for p, m in zip(pairs, margins, strict=True)]
    rows += [{"record": record_of(q.id, q.source), "item": q.id, "source": q.source, "label": q.label,
              "model": round(s, 4), "disagreement": round(-s if q.label >= 0.5 else s, 4)}
             for q, s in zip(points, scores, strict=True)]
    return sorted(rows, key=lambda r: -r["disagreement"])


def save_reward_models(fitted: dict, config: RetrainConfig, registry: Registry, run: Run, settings: Settings) -> dict:
    """Writes both reward models under ``reward_models/`` atomically and registers them."""
    from retrain.versions import atomic_dir

    ids = {}
    ev = fitted["eval"]
    for role, rm in fitted["models"].items():
        rm_id = f"rm-{run.id}" + ("" if role == "policy" else "-judge")
        final = settings.data_path / "reward_models" / rm_id
        tr = fitted["trained"][role]
        with atomic_dir(final) as tmp:
            rm.save(str(tmp), extra={"role": role, "report": {**ev, **tr.norm, "n_pairs": tr.n_pairs,
                                                              "n_ties": tr.n_ties, "n_points": tr.n_points,
                                                              "steps": tr.steps, "stopped": tr.stopped,
                                                              "val_curve": tr.val_curve},
                                     "config": dataclasses.asdict(config.reward)})
        prev = fitted["previous"][role]
        registry.register_reward_model(id=rm_id, role=role, parent_id=prev["id"] if prev else None, run_id=run.id,
                                       path=str(final), accuracy=ev["accuracy"], ci_low=ev["ci_low"],
                                       ci_high=ev["ci_high"], margin=ev["margin"], n_train=tr.n_pairs + tr.n_points,
                                       n_heldout=ev["n"], norm_mean=rm.norm_mean, norm_std=rm.norm_std)
        ids[role] = (rm_id, str(final))
    return ids


def _train_and_gate(settings: Settings, registry: Registry, run: Run, config: RetrainConfig,
                    should_stop: Callable[[], bool] | None, shared: dict) -> None:
    import torch

    from retrain import versions
    from retrain.data import build_snapshot
    from retrain.gate import evaluate
    from retrain.rollout import make_sampler

    if settings.retrain_threads:
        torch.set_num_threads(settings.retrain_threads)
    t0 = time.monotonic()
    timings: dict[str, float] = {}
    store = registry.store
    snapshot = build_snapshot(store, **dataclasses.asdict(config.data), labels=config.labels,
                              system_prompt=settings.system_prompt)
    registry.update_run(run.id, n_preferences=len(snapshot.train) + len(snapshot.heldout),
                        data={**snapshot.stats, "judgements": snapshot.judgements,
                              "record_ids": snapshot.record_ids, "rating_ids": snapshot.rating_ids})
    run_dir = settings.runs_dir / run.id
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "prompts.json").write_text(json.dumps(
        {"rollout": snapshot.rollout_prompts, "gate": snapshot.heldout_prompts[:config.gate.max_prompts]},
        ensure_ascii=False))
    timings["snapshot_s"] = time.monotonic() - t0
    decisive = sum(p.decisive for p in snapshot.train)
    if decisive < config.min_pairs:
        registry.update_run(run.id, status="rejected", finished_at=now(),
                            reason=f"not enough usable preferences: {decisive} decisive training pairs "
                                   f"(need {config.min_pairs}+)",
                            decision={"passed": False, "timings": timings, "judgements": snapshot.judgements})
        return

    served = registry.served_version() or "sft"
    served_path = registry.version(served)["path"]
    sft_path = registry.version("sft")["path"]
    work = settings.runs_dir / run.id / "work"
    work.mkdir(parents=True, exist_ok=True)

    # 1. two cross-fitted reward models: PPO optimises one, the gate's judge is the other
    t = time.monotonic()
    fitted = train_cross_fitted(sft_path, snapshot, config, registry, run)
    ids = save_reward_models(fitted, config, registry, run, settings)
    ev = fitted["eval"]
    registry.update_run(run.id, reward_model_id=ids["policy"][0], rm_accuracy=ev["accuracy"], rm_ci_low=ev["ci_low"],
                        rm_ci_high=ev["ci_high"], rm_margin=ev["margin"])
    (run_dir / LABEL_SCORES).write_text(json.dumps(fitted["label_scores"], ensure_ascii=False))
    judge = fitted["models"]["judge"]
    del fitted["models"]["policy"]  # PPO loads its own copy (every rank does the same)
    timings["reward_s"] = time.monotonic() - t

    # 2. PPO from the served version, KL against the frozen SFT model
    t = time.monotonic()
    ppo_cfg = config.ppo
    plan = {"run_id": run.id, "policy_path": served_path,
            "ref_path": sft_path if ppo_cfg.ref == "sft" else served_path, "reward_path": ids["policy"][1],
            "judge_path": ids["judge"][1],
            "prompts": snapshot.rollout_prompts, "out_dir": str(work / "policy"),
            "ptx_pairs": snapshot.train if ppo_cfg.ptx_coef > 0 else None,  # PPO-ptx: chosen answers, rewrites
            "sampler": config.sampler or "auto", "gguf_dir": str(settings.models_dir / "gguf")}
    _share_plan(plan)
    shared["sent"] = True
    result = run_ppo(plan, ppo_cfg, log=run.log, should_stop=should_stop)
    timings["ppo_s"] = time.monotonic() - t

    # 3. gate on held-out prompts, judged by the reward model PPO did not optimise
    t = time.monotonic()

    def load(path):
        return models.load(path, Path(path).parent, device="cpu", dtype="float32")

    candidate, sft = load(plan["out_dir"]), load(sft_path)
    served_model = sft if served == "sft" else load(served_path)
    prev = fitted["previous"]["policy"]
    gate_sampler = make_sampler(plan["sampler"], sft.path, sft.model, plan["gguf_dir"],
                                threads=settings.retrain_threads)
    try:
        report = evaluate(candidate, served_model, sft, judge, snapshot.heldout_prompts, ev, config.gate,
                          log=run.log, previous_rm_accuracy=prev["accuracy"] if prev else None,
                          sampler_for=(lambda loaded: gate_sampler.use_version(loaded.path, work / "gguf"))
                          if gate_sampler else None)
    finally:
        if gate_sampler:
            gate_sampler.close()
    timings["gate_s"] = time.monotonic() - t
    (run_dir / GATE_ANSWERS).write_text(json.dumps(report.answers, ensure_ascii=False))
    timings["ppo_sample_s"] = result.sample_s
    timings["gate_sample_s"] = report.metrics.get("gate_sample_s", 0.0)
    kl = report.metrics.get("kl_candidate_sft")
    decision = {"passed": report.passed, "reasons": report.reasons, "checks": report.checks,
                "metrics": report.metrics, "timings": timings, "ppo": result.final, "rm": ev,
                "ppo_stop": {"stopped": result.stopped, "reason": result.stop_reason, "kept_step": result.kept_step,
                             "steps": result.steps},
                "sampler": result.sampler,
                "policy_reward_model": ids["policy"][0], "judge_reward_model": ids["judge"][0],
                "judgements": snapshot.judgements}
    registry.mark_used(run.id, snapshot.record_ids)
    if not report.passed:
        registry.update_run(run.id, status="rejected", finished_at=now(), kl=kl, decision=decision,
                            reason="; ".join(report.reasons) or "gate failed")
        return

    # 4. publish atomically, register with lineage, then tell the server
    version_id = f"v-{run.id.removeprefix('run-')}"
    final = versions.publish(plan["out_dir"], settings.versions_dir, version_id, {"run_id": run.id, "parent": served})
    registry.register_version(
        version_id=version_id, path=str(final), kind="ppo", parent_id=served, base_model=sft_path,
        run_id=run.id, metrics=report.metrics, config=config.as_dict(),
        feedback={"comparisons": snapshot.record_ids, "ratings": snapshot.rating_ids,
                  "reward_model": ids["policy"][0], "judge": ids["judge"][0]})
    registry.update_run(run.id, candidate_version=version_id)
    timings["total_s"] = time.monotonic() - t0
    versions.check_servable(registry, version_id)
    # both ends are conditional on `served` still being served (one transaction each): a
    # maintainer's rollback during the run wins, and the run is recorded as passed, not promoted
    if settings.canary_enabled:  # users' own votes have the last word (retrain.canary)
        registry.start_canary(run_id=run.id, version_id=version_id, parent_id=served, kl=kl, decision=decision,
                              reason="passed the offline gate; on trial as answer B until users' votes decide")
        return
    registry.promote_run(run.id, version_id, served, actor="retrain", reason=f"run {run.id} passed the gate",
                         kl=kl, decision=decision)
