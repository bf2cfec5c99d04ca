"""The whole loop on a tiny model: votes in, retrain in its own process, gate decision
recorded, a promoted version swapped in while a stream runs, rollback; and the faults:
a retrain killed mid-PPO changes nothing that is served or stored, and the next run works."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from assistant import models, serve
from assistant.client import free_port
from assistant.engine import SamplingParams
from assistant.settings import Settings, to_env
from feedback.registry import Registry
from feedback.store import FeedbackStore
from retrain.job import GATE_ANSWERS, LABEL_SCORES
from retrain.scheduler import RetrainScheduler
from tests.factories import seed_votes, wait_for, write_config

ROOT = Path(__file__).resolve().parents[2]

def _table_digest(store: FeedbackStore, table: str) -> str:
    rows = store.query(f"SELECT * FROM {table} ORDER BY rowid")
    return hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()


@contextlib.contextmanager
def running_loop(tmp_path, model_dir):
    """The app's pieces on ``model_dir``: settings, store, registry, server, version follower,
    retrain scheduler, and the retrain config file."""
    config = tmp_path / "retrain.json"
    write_config(config)
    settings = Settings(data_dir=str(tmp_path / "data"), model=str(model_dir), max_batch=4,
                        retrain_config=str(config), retrain_threads=1, canary_enabled=False)
    store = FeedbackStore(settings.db_path)
    registry = Registry(store)
    holder = serve.start(settings, registry)
    follower = serve.VersionFollower(holder, registry, serve.engine_factory(settings))
    scheduler = RetrainScheduler(settings, store, registry)
    try:
        yield settings, store, registry, holder, follower, scheduler, config
    finally:
        scheduler.kill()
        holder.close()
        store.close()


@pytest.fixture
def loop(tmp_path, tiny_model_dir):
    with running_loop(tmp_path, tiny_model_dir) as parts:
        yield parts


def test_votes_retrain_gate_swap_under_stream_and_rollback(loop):
    settings, store, registry, holder, follower, scheduler, config = loop
    voted = seed_votes(store, 24)
    assert store.count_new_preferences() == 24

    run_id = scheduler.run_now(wait=True)
    run = registry.run(run_id)
    assert run["status"] == "promoted", run["reason"]
    version = run["candidate_version"]
    info = registry.version(version)
    assert info["parent_id"] == "sft" and info["run_id"] == run_id and info["kind"] == "ppo"
    assert sorted(json.loads(info["feedback"])["comparisons"]) == sorted(voted)
    assert Path(info["path"], "adapter_config.json").exists()
    assert json.loads(run["decision"])["passed"] is True
    assert run["rm_accuracy"] is not None and run["kl"] is not None
    phases = {m["phase"] for m in registry.metrics(run_id)}
    assert {"rm", "ppo", "gate"} <= phases
    # each role's ensemble members logged their validation curves (early stopping)
    # (a member whose inner fold got no item of these 24 has no validation curve)
    members = {p for p in phases if p.startswith(("rm_policy_m", "rm_judge_m"))}
    assert members <= {f"rm_{role}_m{m}" for role in ("policy", "judge") for m in range(5)}
    assert any(p.startswith("rm_policy_m") for p in members) and any(p.startswith("rm_judge_m") for p in members)
    # the gate's judge is never the reward model PPO optimised: another model, other data
    decision = json.loads(run["decision"])
    policy_rm, judge_rm = registry.latest_reward_model("policy"), registry.latest_reward_model("judge")
    assert decision["policy_reward_model"] == policy_rm["id"] == run["reward_model_id"]
    assert decision["judge_reward_model"] == judge_rm["id"] != policy_rm["id"]
    assert judge_rm["path"] != policy_rm["path"]
    trained = json.loads(Path(info["path"], "training.json").read_text())
    assert trained["reward_model"] == policy_rm["path"]  # what PPO optimised
    roles = {json.loads(Path(p, "reward_config.json").read_text())["role"] for p in (policy_rm["path"], judge_rm["path"])}
    assert roles == {"policy", "judge"}
    assert decision["judgements"]["preference"] == {"seen": 24, "used": 24, "dropped": {}}
    assert {c["name"] for c in decision["checks"]} >= {"rm_ci_low", "kl_candidate_sft", "judge_win_ci_low"}
    prompts = json.loads((settings.runs_dir / run_id / "prompts.json").read_text())
    assert prompts["rollout"] and prompts["gate"]
    # the gate's answers, one row per held-out prompt it evaluated, scored by the judge
    answers = json.loads((settings.runs_dir / run_id / GATE_ANSWERS).read_text())
    assert [a["prompt"] for a in answers] == prompts["gate"]
    assert all(isinstance(a["candidate"], str) and isinstance(a["served_judge"], float) for a in answers)
    # the judge's win rate is its expected one: the mean of its per-prompt preference probability,
    # which sides with the higher-scored answer; the hard (sign) rate is reported beside it
    assert all((a["judge_p"] > 0.5) == (a["candidate_judge"] > a["served_judge"]) for a in answers
               if abs(a["candidate_judge"] - a["served_judge"]) > 1e-3)
    assert decision["metrics"]["judge_win_rate"] == pytest.approx(
        sum(a["judge_p"] for a in answers) / len(answers), abs=1e-3)
    assert decision["metrics"]["judge_sign_win_rate"] == pytest.approx(
        sum((a["candidate_judge"] > a["served_judge"]) + 0.5 * (a["candidate_judge"] == a["served_judge"])
            for a in answers) / len(answers), abs=0.02)
    # the disagreement queue's scores: every vote scored once, by a model that never trained on it
    scores = json.loads((settings.runs_dir / run_id / LABEL_SCORES).read_text())
    assert sorted(r["record"] for r in scores) == sorted(f"comparison:{v}" for v in voted)
    assert [r["disagreement"] for r in scores] == sorted((r["disagreement"] for r in scores), reverse=True)
    assert all(r["disagreement"] == -r["model"] for r in scores)  # decisive votes: the chosen answer's margin
    ppo_names = {m["name"] for m in registry.metrics(run_id, "ppo")}
    assert {"score", "kl", "entropy", "clipfrac", "approx_kl", "value_loss", "response_length", "eos_rate"} <= ppo_names
    assert store.count_new_preferences() == 0  # consumed by the run
    assert registry.served_version() == version
    assert holder.version == "sft"  # the server has not looked yet

    # a chat streaming during the swap finishes on the old weights
    old_version, old_engine, stream = holder.submit(old_engine_prompt(holder), SamplingParams(
        temperature=1.0, max_new_tokens=60, seed=1))
    first = next(iter(stream))
    assert follower.check() is True
    assert holder.version == version
    rest = list(stream)
    assert stream.finish_reason in ("stop", "length") and stream.error is None
    assert len([first, *rest]) == len(stream.tokens)
    assert old_version == "sft" and old_engine.version == "sft"
    new_version, new_engine, second = holder.submit(old_engine_prompt(holder), SamplingParams(max_new_tokens=4))
    list(second)
    assert new_version == version and new_engine is not old_engine
    assert wait_for(lambda: old_engine.finished, 10)  # retired once its stream ended

    # roll back from the CLI, as an operator would
    proc = subprocess.run([sys.executable, "-m", "retrain", "rollback", "sft", "--reason", "test"], cwd=ROOT,
                          env={**os.environ, **to_env(settings), "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert follower.check() is True and holder.version == "sft"
    assert [r["action"] for r in registry.serving_history()] == ["serve", "promote", "rollback"]


def test_on_llamacpp_the_retrain_samples_there_and_the_version_is_served_there(tmp_path, tiny_model_dir):
    """A model directory with a GGUF: the app serves from llama.cpp, the retrain samples its
    rollouts and the gate's answers there (the policy's LoRA as a llama.cpp adapter), and the
    promoted version is served as the base GGUF plus its adapter."""
    from assistant.engine import gguf, llamacpp
    from tests.factories import build_tiny_model

    model_dir = build_tiny_model(tmp_path / "tiny-gguf", tiny_model_dir)
    gguf.hf_to_gguf(model_dir, model_dir / "model.gguf", models.embedded_gguf_path())
    with running_loop(tmp_path, model_dir) as (settings, store, registry, holder, follower, scheduler, _):
        assert isinstance(holder.current()[1].decoder, llamacpp.LlamaCppDecoder)
        seed_votes(store, 16)
        run = registry.run(scheduler.run_now(wait=True))
        assert run["status"] == "promoted", run["reason"]
        decision = json.loads(run["decision"])
        assert decision["sampler"] == "llamacpp"
        assert 0 < decision["timings"]["ppo_sample_s"] < decision["timings"]["ppo_s"]
        assert 0 < decision["timings"]["gate_sample_s"] < decision["timings"]["gate_s"]
        assert follower.check() is True and holder.version == run["candidate_version"]
        engine = holder.current()[1]
        assert isinstance(engine.decoder, llamacpp.LlamaCppDecoder) and engine.decoder.lora is not None
        version, _, stream = holder.submit(old_engine_prompt(holder), SamplingParams(max_new_tokens=4))
        assert len(list(stream)) >= 1 and version == run["candidate_version"]


def old_engine_prompt(holder) -> list[int]:
    return holder.current()[1].encode_chat([{"role": "user", "content": "Tell me a story."}])


def test_gate_rejection_is_recorded_and_nothing_is_served(loop):
    settings, store, registry, holder, follower, scheduler, config = loop
    seed_votes(store, 16)
    write_config(config, gate={"min_rm_accuracy": 1.01}, ppo={"ptx_coef": 0.5})
    run_id = scheduler.run_now(wait=True)
    run = registry.run(run_id)
    assert "ptx_loss" in {m["name"] for m in registry.metrics(run_id, "ppo")}  # PPO-ptx on chosen answers
    assert run["status"] == "rejected"
    assert "accuracy" in run["reason"].lower()
    assert run["candidate_version"] is None
    assert registry.served_version() == "sft"
    assert [v["id"] for v in registry.versions()] == ["sft"]
    assert follower.check() is False and holder.version == "sft"


def test_retrain_killed_mid_ppo_changes_nothing_and_next_run_works(loop):
    settings, store, registry, holder, follower, scheduler, config = loop
    seed_votes(store, 16)
    write_config(config, ppo={"steps": 500})
    before = {t: _table_digest(store, t) for t in ("comparisons", "ratings", "generations", "sessions",
                                                   "model_versions", "serving_log")}
    run_id = scheduler.run_now(wait=False)
    assert wait_for(lambda: any(m["phase"] == "ppo" for m in registry.metrics(run_id)), timeout_s=300,
                    interval_s=0.5), "PPO never started"
    os.kill(scheduler._process.pid, signal.SIGKILL)
    assert wait_for(lambda: registry.run(run_id)["status"] == "failed", 30)
    assert "-9" in registry.run(run_id)["reason"]
    assert {t: _table_digest(store, t) for t in before} == before
    assert store.query("PRAGMA integrity_check")[0]["integrity_check"] == "ok"
    assert registry.served_version() == "sft" and holder.version == "sft"
    assert not any(p for p in settings.versions_dir.glob("*")) if settings.versions_dir.exists() else True
    assert follower.check() is False

    write_config(config)
    run2 = scheduler.run_now(wait=True)
    assert registry.run(run2)["status"] == "promoted", registry.run(run2)["reason"]
    assert follower.check() is True and holder.version == registry.run(run2)["candidate_version"]


def test_a_rollback_during_a_run_is_not_undone_by_its_promotion(loop):
    """A maintainer rolls back while a run trains from the version served at its start: the
    run still finishes and publishes its candidate, but does not promote it over the
    rollback; it is recorded as passed, not promoted."""
    from retrain import versions

    settings, store, registry, holder, follower, scheduler, config = loop
    seed_votes(store, 16)
    other = versions.publish(registry.version("sft")["path"], settings.versions_dir, "v-other")
    registry.register_version(version_id="v-other", path=str(other), kind="ppo", parent_id="sft")
    run_id = scheduler.run_now(wait=False)
    assert wait_for(lambda: any(m["phase"].startswith("rm") for m in registry.metrics(run_id)), timeout_s=300,
                    interval_s=0.2), "the reward model never started"
    registry.set_served("v-other", "rollback", actor="maintainer", reason="mid-run")
    assert wait_for(lambda: registry.run(run_id)["status"] not in ("queued", "running"), 300, 0.5)
    run = registry.run(run_id)
    assert run["status"] == "passed", run["reason"]
    assert "not promoted" in run["reason"] and "v-other" in run["reason"]
    assert registry.served_version() == "v-other"
    assert registry.version(run["candidate_version"])["parent_id"] == "sft"  # published, promotable by hand
    assert [(r["version_id"], r["action"]) for r in registry.serving_history()] == [("sft", "serve"),
                                                                                   ("v-other", "rollback")]


def test_multi_process_run_under_a_launcher(loop):
    """Two processes (torchrun on CPU, gloo; accelerate launch does the same per GPU): rank 0
    snapshots, trains the RM, gates and publishes; both ranks share the PPO batches."""
    settings, store, registry, holder, follower, scheduler, config = loop
    seed_votes(store, 16)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
         "-m", "retrain", "run", "--now"],
        cwd=ROOT, env={**os.environ, **to_env(settings), "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run = registry.runs(limit=1)[0]
    assert run["status"] == "promoted", run["reason"]
    assert proc.stderr.replace("\r", "\n").count("\nppo:   0%") + proc.stderr.startswith("ppo:   0%") == 2
    assert follower.check() is True and holder.version == run["candidate_version"]



def test_null_control_random_votes_are_rejected(loop):
    """Votes that carry no preference (half a, half b, in random order) are never promoted:
    the reward models' cross-fitted accuracy cannot clear chance."""
    import random

    settings, store, registry, holder, follower, scheduler, config = loop
    verdicts = ["a"] * 16 + ["b"] * 16
    random.Random(7).shuffle(verdicts)
    seed_votes(store, 32, verdict=lambda i: verdicts[i])
    write_config(config, gate={"min_rm_accuracy": 0.6, "min_rm_ci_low": 0.5, "min_win_ci_low": 0.5,
                                "max_prompts": 24})
    run = registry.run(scheduler.run_now(wait=True))
    assert run["status"] == "rejected", run["reason"]
    assert "reward model accuracy" in run["reason"]
    assert run["rm_ci_low"] < 0.5 and json.loads(run["decision"])["rm"]["n"] >= 24
    assert registry.served_version() == "sft" and run["candidate_version"] is None
