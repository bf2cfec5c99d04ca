"""What one finished retrain did, and why: evidence from its data directory.

    python benchmarks/run_report.py --data-dir /work/runs/nh1                     # the newest run there
    python benchmarks/run_report.py --data-dir D --run run-... --oracle no_hedging

The PPO inner loop: retrain again on a copy of a learning run's votes (``cp -r D D2 && python
-m retrain run --now --data-dir D2 --model embedded --max-new-tokens 128``), then this report;
with ``--oracle`` it also says how the simulated user judges the gate's answers (candidate
against served, ``runs/<id>/gate_answers.json``): a few minutes instead of a whole loop.

Why does PPO's end-of-answer rate fall?
A rollout that hits the answer cap ("truncated") is scored by the policy reward model at an
appended end-of-turn token, minus ``ppo.truncation_penalty``.  PPO lets answers stop ending
when that is worth more than ending.  Three places that can come from, each measured here:

1. **the votes**: in decisive votes between an answer that ended and one that was cut off,
   how often the cut-off one won (the taste itself may prefer what runs on);
2. **the reward model**: its normalised score of the reference (SFT) model's truncated answers
   against its ended ones, over the same prompts' answers the run normalised on, and the
   same gap as the *votes* see it (the oracle-free check: the mean margin on mixed pairs).
   A gap larger than the votes' own preference is the reward model's length bias;
3. **PPO's steps**: the end-of-answer rate, RM score, judge score and KL per step
   (``run_metrics``), to see when the rate fell against how far the policy had moved.

4. **PPO's push on ending**: ``eos_advantage`` per step, the mean (whitened) advantage at the
   end-of-turn token of the answers that ended: negative means PPO teaches the policy to end
   less often.

Does the reward model know what length is worth to this taste?  (with ``--oracle``)
5. **the length axis**: each served answer of the gate (four sentences or more) against its
   own first half (whole sentences, so it ends): how often the policy reward model prefers
   the whole answer, how often the oracle does, and how often the two agree where the oracle
   decides.  Vote pairs differ little in length, so a reward model can rank them well and
   still misjudge what shortening an answer costs: PPO moves along that axis more easily than
   any other, and follows the reward model's mistake there.

Prints a short report; ``--out`` writes it as JSON too.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.oracles import first_half  # noqa: E402
from benchmarks.oracles import get as get_oracle  # noqa: E402
from feedback.registry import Registry  # noqa: E402
from feedback.store import FeedbackStore  # noqa: E402
from retrain.reward import wilson  # noqa: E402


def ended(gen: dict) -> bool:
    return (gen.get("finish_reason") or "") != "length"


def vote_evidence(store: FeedbackStore) -> dict:
    """Decisive votes between an ended and a truncated answer: how often the truncated one won."""
    mixed = trunc_won = decisive = 0
    for row in store.usable_comparisons():
        if row["verdict"] not in ("a", "b") or not row.get("a_generation_id") or not row.get("b_generation_id"):
            continue
        decisive += 1
        ea, eb = ended(store.generation(row["a_generation_id"])), ended(store.generation(row["b_generation_id"]))
        if ea == eb:
            continue
        mixed += 1
        winner_ended = ea if row["verdict"] == "a" else eb
        trunc_won += not winner_ended
    lo, hi = wilson(trunc_won, mixed) if mixed else (float("nan"), float("nan"))
    return {"decisive": decisive, "mixed": mixed, "truncated_won": trunc_won,
            "truncated_win_rate": trunc_won / mixed if mixed else None, "ci": [lo, hi]}


def rm_evidence(rm, store: FeedbackStore, version: str = "sft", limit: int = 400) -> dict:
    """The reward model's normalised score of the reference model's ended and truncated answers."""
    rows = store.answers_of_version(version, limit)
    scores = rm.score([json.loads(r["context"]) for r in rows], [r["content"] for r in rows]).tolist() if rows else []
    trunc = [s for s, r in zip(scores, rows) if not ended(r)]
    done = [s for s, r in zip(scores, rows) if ended(r)]
    mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")  # noqa: E731
    return {"answers": len(rows), "truncated": len(trunc), "ended": len(done),
            "score_truncated": mean(trunc), "score_ended": mean(done), "gap": mean(trunc) - mean(done)}


def ppo_steps(registry: Registry, run_id: str) -> list[dict]:
    by_step: dict[int, dict] = {}
    for m in registry.metrics(run_id, "ppo"):
        by_step.setdefault(m["step"], {})[m["name"]] = m["value"]
    keys = ("eos_rate", "eos_advantage", "truncation_penalty", "rm_score", "score", "judge_score", "kl",
            "response_length")
    return [{"step": s, **{k: by_step[s].get(k) for k in keys}} for s in sorted(by_step)]


def gate_verdicts(path: Path, oracle_name: str) -> dict | None:
    """The oracle's verdicts on the gate's held-out answers: candidate against served."""
    if not path.exists():
        return None
    oracle = get_oracle(oracle_name)
    rows = json.loads(path.read_text())
    v = [oracle(r["prompt"], r["candidate"], r["served"]) for r in rows]
    wins, ties = v.count("a"), v.count("tie")
    lo, hi = wilson(wins + 0.5 * ties, len(v)) if v else (float("nan"), float("nan"))
    return {"oracle": oracle_name, "n": len(v), "wins": wins, "ties": ties, "losses": v.count("b"),
            "win_rate": (wins + 0.5 * ties) / len(v) if v else None, "ci": [lo, hi]}


def length_axis(score: Callable[[list, list[str]], list[float]], rows: list[dict], oracle_name: str) -> dict | None:
    """Each served gate answer against its own first half: the share where ``score`` (prompts,
    answers -> scores; the reward model) prefers the whole answer, where the oracle does (of its
    decisive verdicts), and where the two agree (same)."""
    oracle = get_oracle(oracle_name)
    items = [(r["prompt"], r["served"], h) for r in rows if (h := first_half(r["served"]))]
    if not items:
        return None
    prompts = [p for p, _, _ in items]
    whole, half = score(prompts, [w for _, w, _ in items]), score(prompts, [h for _, _, h in items])
    rm_whole = [float(w) > float(h) for w, h in zip(whole, half)]
    verdicts = [oracle(p, w, h) for p, w, h in items]
    decided = [(v == "a", r) for v, r in zip(verdicts, rm_whole) if v != "tie"]
    agree = sum(o == r for o, r in decided)
    lo, hi = wilson(agree, len(decided)) if decided else (float("nan"), float("nan"))
    return {"n": len(items), "rm_prefers_whole": sum(rm_whole) / len(items), "oracle_decisive": len(decided),
            "oracle_prefers_whole": sum(o for o, _ in decided) / len(decided) if decided else None,
            "agreement": agree / len(decided) if decided else None, "ci": [lo, hi]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--run", default="", help="run id (default: the newest run in the data directory)")
    p.add_argument("--oracle", default="", help="judge the gate's answers with this oracle (name or module:function)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    data = Path(args.data_dir)
    store = FeedbackStore(data / "feedback.sqlite")
    registry = Registry(store)
    run = registry.run(args.run) if args.run else registry.runs(limit=1)[0]
    report: dict = {"run": run["id"], "status": run["status"], "votes": vote_evidence(store)}
    path = data / "reward_models" / f"rm-{run['id']}"
    if path.exists():
        from retrain.reward import load_reward_model

        rm = load_reward_model(str(path))
        report["reward_model"] = rm_evidence(rm, store)
    report["ppo"] = ppo_steps(registry, run["id"])
    if args.oracle:
        gate = data / "runs" / run["id"] / "gate_answers.json"
        report["gate_oracle"] = gate_verdicts(gate, args.oracle)
        if path.exists() and gate.exists():
            report["length_axis"] = length_axis(lambda p, a: rm.score(p, a).tolist(), json.loads(gate.read_text()),
                                                args.oracle)
    decision = json.loads(run["decision"]) if isinstance(run.get("decision"), str) else (run.get("decision") or {})
    report["ppo_stop"] = decision.get("ppo_stop")
    v = report["votes"]
    print(f"run {report['run']} ({report['status']})")
    if v["mixed"]:
        print(f"votes: {v['mixed']} of {v['decisive']} decisive votes were ended vs truncated; the truncated answer "
              f"won {v['truncated_won']} ({v['truncated_win_rate']:.0%}, 95% CI {v['ci'][0]:.0%}-{v['ci'][1]:.0%})")
    if "reward_model" in report:
        r = report["reward_model"]
        print(f"reward model: reference answers truncated {r['score_truncated']:+.2f} (n={r['truncated']}) vs ended "
              f"{r['score_ended']:+.2f} (n={r['ended']}): gap {r['gap']:+.2f} std")
    for s in report["ppo"]:
        print("  step {step}: eos {eos_rate} (advantage {eos_advantage}, penalty {truncation_penalty}), rm {rm_score}, "
              "score {score}, "
              "judge {judge_score}, kl {kl}, len {response_length}".format(**{k: (f"{x:.2f}" if isinstance(x, float) else x) for k, x in s.items()}))
    print(f"stop: {report['ppo_stop']}")
    g = report.get("gate_oracle")
    if g:
        print(f"oracle {g['oracle']} on the gate's answers, candidate vs served: {g['win_rate']:.1%} "
              f"({g['ci'][0]:.1%}-{g['ci'][1]:.1%}), W/T/L {g['wins']}/{g['ties']}/{g['losses']}")
    la = report.get("length_axis")
    if la and la["oracle_decisive"]:
        print(f"length axis, {la['n']} served gate answers against their first half: the reward model prefers the "
              f"whole answer in {la['rm_prefers_whole']:.0%}, the oracle in {la['oracle_prefers_whole']:.0%} of its "
              f"{la['oracle_decisive']} decisive verdicts; they agree on {la['agreement']:.0%} "
              f"({la['ci'][0]:.0%}-{la['ci'][1]:.0%})")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
