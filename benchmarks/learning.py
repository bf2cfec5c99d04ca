"""Prove that the loop learns: simulated users with a hidden taste drive the running app.

    python -m benchmarks.learning --oracle concise            # the shipped oracle
    python -m benchmarks.learning --oracle mypkg.judges:prefers_polite

Phases (each timed):
1. start ``app.py`` on a fresh data directory (embedded model unless ``--model``);
2. baseline: the SFT model's answers to held-out prompts, through the app's API;
3. collect: ``--users`` simulated users, each with its own ``gradio_client`` session, chat a
   training prompt, regenerate, and vote what the oracle says (``/chat``, ``/regenerate``,
   ``/vote``), until ``--preferences`` votes are recorded;
4. retrain: the real job, ``python -m retrain run --now`` on the same data directory, in its
   own process, exactly as the scheduler would run it;
5. swap: wait until the app answers with the promoted version;
6. evaluate: the new version's answers to the same held-out prompts; the oracle judges new
   vs SFT (ties count half), win rate with a 95% bootstrap interval; KL to SFT and reward-model
   held-out accuracy come from the run's record.

The system under test never sees the oracle, only its votes.  Held-out prompts
(``benchmarks/heldout_prompts.txt``) are never shown to the simulated users, and are checked
not to appear among the retrain's seed prompts.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from assistant.client import free_port  # noqa: E402
from assistant.client import message_text as text_of  # noqa: E402
from benchmarks.oracles import get as get_oracle  # noqa: E402

SYSTEM = "You are a helpful AI assistant."


def load_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


class App:
    """The app as a child process, like a user would run it."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        cmd = [sys.executable, "app.py", "--data-dir", args.data_dir, "--port", str(self.port), "--model", args.model,
               "--no-retrain-enabled", "--max-new-tokens", str(args.max_new_tokens), "--max-batch", str(args.users),
               "--rate-messages-per-minute", "100000", "--rate-votes-per-minute", "100000"]
        self.log = open(Path(args.data_dir) / "app.log", "ab")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 600) -> None:
        from gradio_client import Client

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the app exited with code {self.proc.returncode}; see app.log")
            try:
                Client(self.url, verbose=False)
                return
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(2)
        raise TimeoutError("the app did not come up")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


class User:
    """One simulated user: one gradio_client session."""

    def __init__(self, url: str, args: argparse.Namespace, seed: int):
        from gradio_client import Client

        self.client = Client(url, verbose=False)
        self.args = args
        self.seed = seed

    def chat(self, prompt: str) -> tuple[str, str]:
        a = self.args
        self.client.predict(api_name="/new_chat")
        history, version, _status = self.client.predict(prompt, SYSTEM, a.temperature, a.top_p, a.max_new_tokens,
                                                        -1, api_name="/chat")
        return text_of(history[-1]), version

    def regenerate(self) -> tuple[str, str]:
        a = self.args
        answer_a, answer_b, _version, _status = self.client.predict(a.temperature, a.top_p, a.max_new_tokens, -1,
                                                                    api_name="/regenerate")
        return answer_a, answer_b

    def vote(self, verdict: str) -> str:
        _history, status = self.client.predict(verdict, api_name="/vote")
        return status


def answers(url: str, args: argparse.Namespace, prompts: list[str]) -> tuple[list[str], set[str]]:
    """One answer per prompt, each in a fresh chat, ``--users`` at a time."""
    local = threading.local()

    def one(prompt: str) -> tuple[str, str]:
        if not hasattr(local, "user"):
            local.user = User(url, args, 0)
        return local.user.chat(prompt)

    with ThreadPoolExecutor(args.users) as pool:
        results = list(pool.map(one, prompts))
    return [r[0] for r in results], {r[1] for r in results}


def collect(url: str, args: argparse.Namespace, prompts: list[str], oracle) -> dict:
    """Chat, regenerate, vote; returns counts by verdict."""
    counts = {"a": 0, "b": 0, "tie": 0, "errors": 0}
    lock = threading.Lock()
    budget = iter(range(args.preferences))
    order = list(prompts)
    random.Random(args.seed).shuffle(order)
    queue = iter(order * (1 + args.preferences // max(1, len(order))))

    def worker(seed: int) -> None:
        user = User(url, args, seed)
        while True:
            with lock:
                if next(budget, None) is None:
                    return
                prompt = next(queue)
            try:
                user.chat(prompt)
                answer_a, answer_b = user.regenerate()
                verdict = oracle([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                                 answer_a, answer_b)
                user.vote(verdict)
                with lock:
                    counts[verdict] += 1
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    counts["errors"] += 1
                print(f"  user {seed}: {type(exc).__name__}: {exc}", flush=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return counts


def win_rate(new: list[str], old: list[str], prompts: list[str], oracle, seed: int) -> dict:
    rng = random.Random(seed)
    scores = []
    wins = ties = losses = 0
    for prompt, n, o in zip(prompts, new, old):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        flip = rng.random() < 0.5  # show the pair in a random order
        v = oracle(messages, o, n) if flip else oracle(messages, n, o)
        if v == "tie":
            ties += 1
            scores.append(0.5)
        elif (v == "a") != flip:
            wins += 1
            scores.append(1.0)
        else:
            losses += 1
            scores.append(0.0)
    mean = sum(scores) / len(scores)
    boots = sorted(sum(rng.choice(scores) for _ in scores) / len(scores) for _ in range(4000))
    return {"win_rate": mean, "ci_low": boots[int(0.025 * len(boots))], "ci_high": boots[int(0.975 * len(boots))],
            "wins": wins, "ties": ties, "losses": losses, "n": len(scores)}


def run_row(data_dir: str) -> dict:
    from feedback.registry import Registry
    from feedback.store import FeedbackStore

    store = FeedbackStore(Path(data_dir) / "feedback.sqlite")
    try:
        return Registry(store).runs(limit=1)[0]
    finally:
        store.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--oracle", default="concise", help="built-in name or module:function (default concise)")
    p.add_argument("--preferences", type=int, default=300, help="votes to collect (default 300)")
    p.add_argument("--users", type=int, default=8, help="simulated users at once (default 8)")
    p.add_argument("--heldout", type=int, default=80, help="held-out prompts to evaluate (default 80)")
    p.add_argument("--samples", type=int, default=2, help="answers per held-out prompt and model (default 2)")
    p.add_argument("--model", default="embedded", help="model the app serves (default: the embedded one)")
    p.add_argument("--data-dir", default="", help="fresh data directory (default: a temporary one)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer cap while chatting (default 128)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--retrain-threads", type=int, default=2, help="CPU threads of the retrain (app idle then)")
    p.add_argument("--retrain-config", default="", help="JSON overrides for the retrain (see retrain/job.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON here too")
    args = p.parse_args(argv)

    import tempfile

    oracle = get_oracle(args.oracle)
    args.data_dir = args.data_dir or tempfile.mkdtemp(prefix="learning-")
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    heldout = load_lines(ROOT / "benchmarks" / "heldout_prompts.txt")[: args.heldout]
    from retrain.data import load_seed_prompts

    seeds = load_seed_prompts()
    overlap = set(heldout) & set(seeds)
    assert not overlap, f"held-out prompts leak into the seed prompts: {sorted(overlap)[:3]}"
    train_prompts = seeds
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    phases: dict[str, float] = {}
    t_all = time.monotonic()

    def phase(name: str, t0: float) -> None:
        phases[name] = round(time.monotonic() - t0, 1)
        print(f"[{name}] {phases[name]:.0f} s", flush=True)

    t = time.monotonic()
    app = App(args, env)
    try:
        app.wait_ready()
        phase("start_app", t)
        eval_prompts = [q for q in heldout for _ in range(args.samples)]

        t = time.monotonic()
        sft_answers, sft_versions = answers(app.url, args, eval_prompts)
        phase("baseline_answers", t)

        t = time.monotonic()
        counts = collect(app.url, args, train_prompts, oracle)
        phase("collect_preferences", t)
        print(f"  votes: {counts}", flush=True)

        t = time.monotonic()
        cmd = [sys.executable, "-m", "retrain", "run", "--now", "--data-dir", args.data_dir, "--model", args.model,
               "--retrain-threads", str(args.retrain_threads)]
        if args.retrain_config:
            cmd += ["--retrain-config", args.retrain_config]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        run = run_row(args.data_dir)
        phase("retrain", t)
        print(f"  run {run['id']}: {run['status']} ({run['reason']})", flush=True)

        t = time.monotonic()
        new_version = run["candidate_version"] if run["status"] == "promoted" else None
        if new_version:
            probe = User(app.url, args, 0)
            deadline = time.monotonic() + 300
            while new_version not in probe.chat("Hi")[1]:
                if time.monotonic() > deadline:
                    raise TimeoutError("the app did not swap to the promoted version")
                time.sleep(1)
        phase("swap", t)

        t = time.monotonic()
        new_answers, new_versions = answers(app.url, args, eval_prompts)
        phase("new_answers", t)
    finally:
        app.stop()
    phases["total"] = round(time.monotonic() - t_all, 1)

    result = win_rate(new_answers, sft_answers, eval_prompts, oracle, args.seed)
    decision = json.loads(run["decision"] or "{}")
    words = lambda xs: sum(len(x.split()) for x in xs) / max(1, len(xs))  # noqa: E731
    report = {
        "oracle": args.oracle, "votes": counts, "run": run["id"], "status": run["status"], "reason": run["reason"],
        "served_before": sorted(sft_versions), "served_after": sorted(new_versions),
        "oracle_win_rate": result, "kl_to_sft": run["kl"],
        "rm_heldout_accuracy": {"accuracy": run["rm_accuracy"], "ci_low": run["rm_ci_low"],
                                "ci_high": run["rm_ci_high"]},
        "mean_words": {"sft": round(words(sft_answers), 1), "new": round(words(new_answers), 1)},
        "retrain_timings": decision.get("timings"), "phases_s": phases,
    }
    print(json.dumps(report, indent=1))
    wr = result
    print(f"\nwin rate of {new_version or 'SFT (no promotion)'} over SFT by oracle '{args.oracle}': "
          f"{wr['win_rate']:.1%} (95% CI {wr['ci_low']:.1%}-{wr['ci_high']:.1%}; W/T/L {wr['wins']}/{wr['ties']}/"
          f"{wr['losses']}), KL {run['kl']}, RM acc {run['rm_accuracy']}, total {phases['total'] / 60:.1f} min")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
