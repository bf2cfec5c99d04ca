"""Prove that the loop learns: simulated users with a hidden taste drive the running app.

    python -m benchmarks.learning                              # the whole matrix of shipped oracles
    python -m benchmarks.learning --oracle concise             # one oracle
    python -m benchmarks.learning --oracle concise,random      # several, in turn
    python -m benchmarks.learning --oracle mypkg.judges:prefers_polite --null-control

For each oracle in turn, on a fresh data directory (phases timed):
1. start ``app.py`` (embedded model unless ``--model``);
2. baseline: the SFT model's answers to held-out prompts, through the app's API, from sessions
   that opted out of training (``/opt_out``), so evaluation chats never become training data;
3. collect: ``--users`` simulated users, each with its own ``gradio_client`` session, chat a
   training prompt, regenerate, and vote what the oracle says (``/chat``, ``/regenerate``,
   ``/vote``), until ``--preferences`` votes are recorded;
4. retrain: the real job, ``python -m retrain run --now`` on the same data directory, in its
   own process, exactly as the scheduler would run it; then the leak check: no held-out prompt
   may be among the run's rollout or gate prompts (``runs/<run>/prompts.json``);
5. canary: while the run's status is ``canary`` (the candidate passed the offline gate and
   answers B in a share of regenerate turns), the same users keep voting (at most
   ``--canary-votes`` votes and ``--canary-minutes``) until it is promoted or rejected;
6. swap: wait until the app answers with the promoted version;
7. evaluate: the new version's answers to the same held-out prompts (opted out too); the oracle
   judges new vs SFT: the win rate (ties count half), the win rate over the pairs it did not
   call a tie, and the win rate over pairs of about the same length (words within 15%), each
   with a 95% bootstrap interval; KL to SFT and reward-model held-out accuracy come from the
   run's record.

Then a markdown matrix, one row per oracle.  ``random`` is the null control: its votes carry
no preference, so its expected decision is "rejected"; the benchmark exits non-zero when the
null control is promoted, when a held-out prompt leaked into the retrain, or when a run fails.

The system under test never sees the oracle, only its votes.  Held-out prompts
(``benchmarks/heldout_prompts.txt``) are never shown to the simulated users, and are checked
to be neither among nor near-paraphrases of the retrain's seed prompts (``benchmarks/leakcheck.py``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from assistant.client import LOOPBACK_PROXIES, free_port  # noqa: E402
from assistant.client import message_text as text_of  # noqa: E402
from benchmarks import oracles as oracles_mod  # noqa: E402
from benchmarks.leakcheck import check_disjoint, check_run_prompts  # noqa: E402
from benchmarks.oracles import get as get_oracle  # noqa: E402

SYSTEM = "You are a helpful AI assistant."
DEFAULT_ORACLES = ",".join(oracles_mod.ORACLES)  # every shipped taste, the null control (random) last
NULL_CONTROL = "random"
LENGTH_MATCH_TOLERANCE = 0.15
PHASES = ("start_app", "baseline_answers", "collect_preferences", "retrain", "canary", "swap", "new_answers", "total")


def load_lines(path: Path) -> list[str]:
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def expected_decision(oracle_name: str) -> str:
    """What the gate should decide for votes by this oracle: the null control carries no
    preference and must be rejected; every real taste should be learnt and promoted."""
    return "rejected" if oracle_name == NULL_CONTROL else "promoted"


def parse_oracles(values: list[str] | None, null_control: bool = False) -> list[str]:
    """Oracle names from repeated and/or comma-separated ``--oracle`` values, in order, without
    repeats (the default list when none); ``null_control`` appends ``random`` if missing."""
    names: list[str] = []
    for value in values or [DEFAULT_ORACLES]:
        for name in value.split(","):
            name = name.strip()
            if name and name not in names:
                names.append(name)
    if null_control and NULL_CONTROL not in names:
        names.append(NULL_CONTROL)
    return names


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "oracle"


class App:
    """The app as a child process, like a user would run it."""

    def __init__(self, args: argparse.Namespace, env: dict[str, str]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        cmd = [sys.executable, "app.py", "--data-dir", args.data_dir, "--port", str(self.port), "--model", args.model,
               "--no-retrain-enabled", "--max-new-tokens", str(args.max_new_tokens), "--max-batch", str(args.users),
               "--rate-messages-per-minute", "100000", "--rate-votes-per-minute", "100000",
               # the live canary decides inside the app, within the benchmark's bounds
               "--canary-share", str(args.canary_share), "--canary-max-votes", str(args.canary_votes),
               "--canary-max-minutes", str(args.canary_minutes),
               # each simulated user is a client of its own by X-Forwarded-For (``as_client``)
               "--trusted-proxies", LOOPBACK_PROXIES]
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
    """One simulated user: one gradio_client session.  ``opt_out=True`` for evaluation
    sessions: the app's store then leaves them out of every training snapshot."""

    _addresses = itertools.count()  # each simulated user is a client of its own (``as_client``)

    def __init__(self, url: str, args: argparse.Namespace, seed: int, opt_out: bool = False):
        from gradio_client import Client

        from assistant.client import as_client

        self.client = Client(url, verbose=False, headers=as_client(next(User._addresses)))
        self.args = args
        self.seed = seed
        self.opt_out = opt_out
        if opt_out:
            self.client.predict(True, api_name="/opt_out")

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
    """One answer per prompt, each in a fresh chat, ``--users`` at a time, from opted-out
    sessions (evaluation chats never become training data)."""
    local = threading.local()

    def one(prompt: str) -> tuple[str, str]:
        if not hasattr(local, "user"):
            local.user = User(url, args, 0, opt_out=True)
        return local.user.chat(prompt)

    with ThreadPoolExecutor(args.users) as pool:
        results = list(pool.map(one, prompts))
    return [r[0] for r in results], {r[1] for r in results}


class Collector:
    """The simulated users who vote: their sessions and their place in the prompt list are kept
    across phases (collecting, then the canary)."""

    def __init__(self, url: str, args: argparse.Namespace, prompts: list[str], oracle):
        self.url, self.args, self.oracle = url, args, oracle
        order = list(prompts)
        random.Random(args.seed).shuffle(order)
        self.queue = itertools.cycle(order)
        self.users: list[User | None] = [None] * args.users
        self.lock = threading.Lock()

    def run(self, budget: int, stop: threading.Event | None = None,
            deadline: float | None = None) -> tuple[dict, list[threading.Thread]]:
        """Starts the users: chat, regenerate, vote until ``budget`` votes were tried, ``stop``
        is set or the monotonic ``deadline`` passed.  Returns the live counts by verdict (and
        ``errors``) and the threads to join."""
        counts = {"a": 0, "b": 0, "tie": 0, "errors": 0}
        tickets = iter(range(budget))

        def worker(i: int) -> None:
            while True:
                if (stop is not None and stop.is_set()) or (deadline is not None and time.monotonic() > deadline):
                    return
                with self.lock:
                    if next(tickets, None) is None:
                        return
                    prompt = next(self.queue)
                try:
                    if self.users[i] is None:
                        self.users[i] = User(self.url, self.args, i)
                    user = self.users[i]
                    user.chat(prompt)
                    answer_a, answer_b = user.regenerate()
                    verdict = self.oracle([{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}],
                                          answer_a, answer_b)
                    user.vote(verdict)
                    with self.lock:
                        counts[verdict] = counts.get(verdict, 0) + 1
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    with self.lock:
                        counts["errors"] += 1
                    print(f"  user {i}: {type(exc).__name__}: {exc}", flush=True)

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(self.args.users)]
        for t in threads:
            t.start()
        return counts, threads


def collect(url: str, args: argparse.Namespace, prompts: list[str], oracle) -> dict:
    """Chat, regenerate, vote ``--preferences`` times; returns counts by verdict."""
    counts, threads = Collector(url, args, prompts, oracle).run(args.preferences)
    for t in threads:
        t.join()
    return counts


def votes_total(counts: dict) -> int:
    return sum(v for k, v in counts.items() if k != "errors")


def canary(collector: Collector, args: argparse.Namespace, run_id: str) -> tuple[dict, dict, dict]:
    """While the run is in ``canary``, the same users keep voting (at most ``--canary-votes``
    votes and ``--canary-minutes``); the run row is re-read every few votes (and every 10 s)
    until it is promoted or rejected.  Returns (counts, the final run row, a summary)."""
    run = run_row(args.data_dir, run_id)
    if run["status"] != "canary":
        return {}, run, {"entered": False}
    t0 = time.monotonic()
    deadline = t0 + 60 * args.canary_minutes
    stop = threading.Event()
    counts, threads = collector.run(args.canary_votes, stop=stop, deadline=deadline)
    polled_at_votes, polled_at = 0, time.monotonic()
    polls = 0
    while any(t.is_alive() for t in threads):
        time.sleep(0.5)
        n = votes_total(counts) + counts.get("errors", 0)
        if n - polled_at_votes >= args.canary_poll_votes or time.monotonic() - polled_at >= 10:
            polled_at_votes, polled_at = n, time.monotonic()
            polls += 1
            run = run_row(args.data_dir, run_id)
            if run["status"] != "canary":
                stop.set()
    for t in threads:
        t.join()
    run = run_row(args.data_dir, run_id)
    grace = time.monotonic() + 15  # the app decides every few seconds, also at its own time limit
    while run["status"] == "canary" and time.monotonic() < grace:
        time.sleep(1)
        run = run_row(args.data_dir, run_id)
    summary = {"entered": True, "votes": votes_total(counts), "polls": polls, "final_status": run["status"],
               "decided": run["status"] != "canary", "seconds": round(time.monotonic() - t0, 1)}
    if run["status"] == "canary":
        print(f"  canary undecided after {summary['votes']} votes / {summary['seconds']:.0f} s "
              f"(--canary-votes {args.canary_votes}, --canary-minutes {args.canary_minutes})", flush=True)
    return counts, run, summary


# -- judging ---------------------------------------------------------------------------------

def judge(new: list[str], old: list[str], prompts: list[str], oracle, seed: int) -> list[float]:
    """The oracle's verdict on each (new, old) pair as a score for the new answer: 1 a win,
    0.5 a tie, 0 a loss.  Each pair is shown in a random order (seeded)."""
    rng = random.Random(seed)
    scores = []
    for prompt, n, o in zip(prompts, new, old):
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
        flip = rng.random() < 0.5  # show the pair in a random order
        v = oracle(messages, o, n) if flip else oracle(messages, n, o)
        if v == "tie":
            scores.append(0.5)
        elif v in ("a", "b") and (v == "a") != flip:
            scores.append(1.0)
        elif v in ("a", "b"):
            scores.append(0.0)
        else:  # e.g. "both_bad" from a user-written oracle: no ordering, a tie
            scores.append(0.5)
    return scores


def summarize(scores: list[float], seed: int = 0, resamples: int = 4000) -> dict:
    """Mean score (ties count half) with a 95% bootstrap interval, and W/T/L counts; the rates
    are None when there are no scores."""
    wins = sum(s == 1.0 for s in scores)
    ties = sum(s == 0.5 for s in scores)
    losses = sum(s == 0.0 for s in scores)
    if not scores:
        return {"win_rate": None, "ci_low": None, "ci_high": None, "wins": 0, "ties": 0, "losses": 0, "n": 0}
    rng = random.Random(seed)
    mean = sum(scores) / len(scores)
    boots = sorted(sum(rng.choice(scores) for _ in scores) / len(scores) for _ in range(resamples))
    return {"win_rate": mean, "ci_low": boots[int(0.025 * len(boots))], "ci_high": boots[int(0.975 * len(boots))],
            "wins": wins, "ties": ties, "losses": losses, "n": len(scores)}


def win_rate(new: list[str], old: list[str], prompts: list[str], oracle, seed: int) -> dict:
    """The oracle's win rate of ``new`` over ``old`` (ties count half) with its 95% CI."""
    return summarize(judge(new, old, prompts, oracle, seed), seed)


def decisive_win_rate(scores: list[float], seed: int = 0) -> dict:
    """The win rate over the comparisons the oracle did not call a tie (with its CI)."""
    return summarize([s for s in scores if s != 0.5], seed)


def word_count(text: str) -> int:
    return len((text or "").split())


def length_matched(a: str, b: str, tolerance: float = LENGTH_MATCH_TOLERANCE) -> bool:
    """Whether two answers' word counts are within ``tolerance`` (15%) of the longer one."""
    wa, wb = word_count(a), word_count(b)
    return abs(wa - wb) <= tolerance * max(wa, wb)


def length_matched_win_rate(scores: list[float], new: list[str], old: list[str], seed: int = 0,
                            tolerance: float = LENGTH_MATCH_TOLERANCE) -> dict:
    """The win rate (ties half) over the pairs of about the same length (:func:`length_matched`):
    what the new version wins by something other than length.  ``n`` says how many pairs."""
    kept = [s for s, n, o in zip(scores, new, old) if length_matched(n, o, tolerance)]
    return {**summarize(kept, seed), "tolerance": tolerance}


def run_row(data_dir: str, run_id: str | None = None) -> dict:
    """The run ``run_id`` (re-read from the store), or the latest run."""
    from feedback.registry import Registry
    from feedback.store import FeedbackStore

    store = FeedbackStore(Path(data_dir) / "feedback.sqlite")
    try:
        registry = Registry(store)
        return registry.run(run_id) if run_id else registry.runs(limit=1)[0]
    finally:
        store.close()


def _json_field(value) -> dict:
    if isinstance(value, dict):
        return value
    try:
        out = json.loads(value or "{}")
    except (TypeError, ValueError):
        return {}
    return out if isinstance(out, dict) else {}


def merge_counts(*counts: dict) -> dict:
    out: dict[str, int] = {}
    for c in counts:
        for k, v in (c or {}).items():
            out[k] = out.get(k, 0) + v
    return out


# -- one oracle, the whole loop ------------------------------------------------------------------

def run_oracle(name: str, args: argparse.Namespace, heldout: list[str], train_prompts: list[str],
               env: dict[str, str]) -> dict:
    """The whole loop for one oracle on ``args.data_dir``; returns its report."""
    oracle = get_oracle(name)
    oracles_mod.reseed_random(args.seed)
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    phases: dict[str, float] = {}
    t_all = time.monotonic()

    def phase(label: str, t0: float) -> None:
        phases[label] = round(time.monotonic() - t0, 1)
        print(f"[{name}: {label}] {phases[label]:.0f} s", flush=True)

    print(f"\n=== oracle {name} (expected: {expected_decision(name)}) in {args.data_dir}", flush=True)
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
        collector = Collector(app.url, args, train_prompts, oracle)
        counts, threads = collector.run(args.preferences)
        for th in threads:
            th.join()
        phase("collect_preferences", t)
        print(f"  votes: {counts}", flush=True)

        t = time.monotonic()
        # the app's own serving settings, as its scheduler would pass them: rollouts and the
        # gate sample like the chat does
        cmd = [sys.executable, "-m", "retrain", "run", "--now", "--data-dir", args.data_dir, "--model", args.model,
               "--retrain-threads", str(args.retrain_threads), "--max-new-tokens", str(args.max_new_tokens),
               "--temperature", str(args.temperature), "--top-p", str(args.top_p)]
        if args.retrain_config:
            cmd += ["--retrain-config", args.retrain_config]
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        run = run_row(args.data_dir)
        phase("retrain", t)
        print(f"  run {run['id']}: {run['status']} ({run['reason']})", flush=True)
        leak = check_run_prompts(Path(args.data_dir) / "runs" / run["id"] / "prompts.json", heldout)
        print(f"  {leak['message']}", flush=True)

        t = time.monotonic()
        canary_counts, run, canary_summary = canary(collector, args, run["id"])
        phase("canary", t)
        if canary_summary["entered"]:
            print(f"  canary: {canary_counts} -> {run['status']} ({run['reason']})", flush=True)

        t = time.monotonic()
        new_version = run["candidate_version"] if run["status"] == "promoted" else None
        if new_version:
            probe = User(app.url, args, 0, opt_out=True)
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

    scores = judge(new_answers, sft_answers, eval_prompts, oracle, args.seed)
    data = _json_field(run.get("data"))
    decision = _json_field(run.get("decision"))
    words = lambda xs: sum(word_count(x) for x in xs) / max(1, len(xs))  # noqa: E731
    votes = merge_counts(counts, canary_counts)
    return {
        "oracle": name, "expected": expected_decision(name), "data_dir": args.data_dir,
        "votes": votes, "votes_collect": counts, "votes_canary": canary_counts,
        "judgements": data.get("judgements"),
        "run": run["id"], "status": run["status"], "reason": run["reason"], "canary": canary_summary,
        "served_before": sorted(sft_versions), "served_after": sorted(new_versions),
        "oracle_win_rate": summarize(scores, args.seed),
        "decisive_win_rate": decisive_win_rate(scores, args.seed),
        "length_matched_win_rate": length_matched_win_rate(scores, new_answers, sft_answers, args.seed),
        "kl_to_sft": run["kl"],
        "rm_heldout_accuracy": {"accuracy": run["rm_accuracy"], "ci_low": run["rm_ci_low"],
                                "ci_high": run["rm_ci_high"]},
        "mean_words": {"sft": round(words(sft_answers), 1), "new": round(words(new_answers), 1)},
        "leak_check": leak, "retrain_timings": decision.get("timings"), "phases_s": phases,
        "reward_model": {k: (decision.get("rm") or {}).get(k) for k in ("design", "steps_policy", "steps_judge",
                                                                          "interaction_policy", "interaction_judge")},
        "ppo_stop": decision.get("ppo_stop"),
        "eos_rate": {"candidate": (decision.get("metrics") or {}).get("candidate_eos_rate"),
                     "served": (decision.get("metrics") or {}).get("served_eos_rate")},
    }


# -- the matrix ----------------------------------------------------------------------------------

def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def _rate(r: dict | None, with_n: bool = False) -> str:
    if not r or r.get("win_rate") is None:
        return "– (n=0)" if with_n else "–"
    s = f"{_pct(r['win_rate'])} ({100 * r['ci_low']:.1f}-{_pct(r['ci_high'])})"
    return f"{s}, n={r['n']}" if with_n else s


def _votes(v: dict) -> str:
    s = f"{v.get('a', 0)}/{v.get('b', 0)}/{v.get('tie', 0)}"
    extra = [f"{k} {n}" for k, n in v.items() if k not in ("a", "b", "tie") and n]
    return s + (f" ({', '.join(extra)})" if extra else "")


def _judgements(j) -> str:
    if not isinstance(j, dict) or not j:
        return "–"
    parts = []
    for kind, d in j.items():
        if isinstance(d, dict):
            dropped = d.get("dropped") or {}
            drop = f" −{sum(dropped.values())}" if isinstance(dropped, dict) and dropped else ""
            parts.append(f"{kind} {d.get('used', '?')}/{d.get('seen', '?')}{drop}")
        else:
            parts.append(f"{kind} {d}")
    return ", ".join(parts)


def _clip(text, width: int = 70) -> str:
    text = str(text or "").replace("|", "/").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def matrix(reports: list[dict]) -> str:
    """The results as markdown: one row per oracle, then the phase times."""
    head = ("| oracle | votes a/b/tie | judgements used/seen | RM acc (95% CI) | KL | win rate (95% CI) "
            "| decisive only | length-matched (±15%) | words SFT→new | decision | expected | leak check |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in reports:
        if "error" in r:
            lines.append(f"| {r['oracle']} | " + " | ".join(["–"] * 8) + f" | ERROR: {_clip(r['error'])} "
                         f"| {r['expected']} | – |")
            continue
        rm = r["rm_heldout_accuracy"]
        rm_s = "–" if rm["accuracy"] is None else (
            f"{rm['accuracy']:.2f} ({rm['ci_low']:.2f}-{rm['ci_high']:.2f})" if rm["ci_low"] is not None
            else f"{rm['accuracy']:.2f}")
        kl = "–" if r["kl_to_sft"] is None else f"{r['kl_to_sft']:.2f}"
        wr = r["oracle_win_rate"]
        wr_s = _rate(wr) + f", W/T/L {wr['wins']}/{wr['ties']}/{wr['losses']}"
        ok = "" if r["status"] == r["expected"] else " ✗"
        leak = r["leak_check"]
        leak_s = ("n/a" if not leak.get("available") else
                  ("ok" if not leak["leaked"] else f"LEAK {len(leak['leaked'])}"))
        lines.append(f"| {r['oracle']} | {_votes(r['votes'])} | {_judgements(r['judgements'])} | {rm_s} | {kl} "
                     f"| {wr_s} | {_rate(r['decisive_win_rate'], True)} "
                     f"| {_rate(r['length_matched_win_rate'], True)} "
                     f"| {r['mean_words']['sft']:.0f}→{r['mean_words']['new']:.0f} "
                     f"| {r['status']}: {_clip(r['reason'])} | {r['expected']}{ok} | {leak_s} |")
    lines += ["", "| oracle | RM design | RM steps policy/judge | RM phase (s) | PPO stop (kept step) "
              "| end-of-answer rate, candidate vs served |", "|---|---|---|---|---|---|"]
    for r in reports:
        if "error" in r:
            continue
        rm, stop, eos = r.get("reward_model") or {}, r.get("ppo_stop") or {}, r.get("eos_rate") or {}
        reward_s = (r.get("retrain_timings") or {}).get("reward_s")
        stop_s = (f"{stop.get('stopped')}{': ' + _clip(stop['reason'], 40) if stop.get('reason') else ''} "
                  f"({stop.get('kept_step')} of {stop.get('steps')})") if stop else "–"
        design = rm.get("design") or "–"
        if rm.get("interaction_policy") is not None:
            design += " + interaction: " + "/".join("yes" if rm.get(f"interaction_{x}") else "no"
                                                    for x in ("policy", "judge"))
        lines.append(f"| {r['oracle']} | {design} | {rm.get('steps_policy', '–')}/"
                     f"{rm.get('steps_judge', '–')} | {'–' if reward_s is None else f'{reward_s:.0f}'} | {stop_s} "
                     f"| {_pct(eos.get('candidate'))} vs {_pct(eos.get('served'))} |")
    lines += ["", "| oracle | " + " | ".join(f"{p} (s)" for p in PHASES) + " |",
              "|---|" + "---|" * len(PHASES)]
    for r in reports:
        ph = r.get("phases_s") or {}
        lines.append(f"| {r['oracle']} | " + " | ".join(f"{ph[p]:.0f}" if p in ph else "–" for p in PHASES) + " |")
    return "\n".join(lines)


def failures(reports: list[dict]) -> list[str]:
    """What makes the benchmark fail: a run that errored, a held-out prompt among the
    retrain's prompts, a promoted null control."""
    out = []
    for r in reports:
        if "error" in r:
            out.append(f"oracle {r['oracle']}: the run failed: {r['error']}")
            continue
        leak = r.get("leak_check") or {}
        if leak.get("leaked"):
            out.append(f"oracle {r['oracle']}: held-out prompts leaked into the retrain's prompts "
                       f"({leak['message']}): {leak['leaked'][:5]}")
        if r["oracle"] == NULL_CONTROL and r["status"] == "promoted":
            out.append(f"oracle {r['oracle']}: the null control was promoted ({r['reason']}); the gate must reject it")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--oracle", action="append", default=None,
                   help="built-in name or module:function; comma-separated or repeated, run in turn "
                        f"(default {DEFAULT_ORACLES})")
    p.add_argument("--null-control", action="store_true",
                   help=f"also run the null control ({NULL_CONTROL!r}, expected to be rejected) if not listed")
    p.add_argument("--preferences", type=int, default=300, help="votes to collect (default 300)")
    p.add_argument("--users", type=int, default=16,
                   help="simulated users at once, each a client of its own; the app decodes as many answers at once "
                        "(--max-batch, whose default is 16) (default 16)")
    p.add_argument("--heldout", type=int, default=80, help="held-out prompts to evaluate (default 80)")
    p.add_argument("--samples", type=int, default=2, help="answers per held-out prompt and model (default 2)")
    p.add_argument("--model", default="embedded", help="model the app serves (default: the embedded one)")
    p.add_argument("--data-dir", default="",
                   help="fresh data directory (default: a temporary one); with several oracles, one "
                        "subdirectory per oracle")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer cap while chatting (default 128)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--retrain-threads", type=int, default=2, help="CPU threads of the retrain (app idle then)")
    p.add_argument("--retrain-config", default="", help="JSON overrides for the retrain (see retrain/config.py)")
    p.add_argument("--canary-share", type=float, default=1.0,
                   help="share of regenerates whose answer B is the candidate on trial (default 1.0: every "
                        "vote of the trial's minutes is evidence; the app's own default is 0.5)")
    p.add_argument("--canary-votes", type=int, default=200, help="most votes while the run is in canary (default 200)")
    p.add_argument("--canary-minutes", type=float, default=10, help="most minutes in canary (default 10)")
    p.add_argument("--canary-poll-votes", type=int, default=5, help="re-read the run every N canary votes (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the results as JSON here too")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    import tempfile

    names = parse_oracles(args.oracle, args.null_control)
    for name in names:
        get_oracle(name)  # fail fast on a typo
    heldout = load_lines(ROOT / "benchmarks" / "heldout_prompts.txt")[: args.heldout]
    from retrain.data import load_seed_prompts

    seeds = load_seed_prompts()
    try:
        check_disjoint(heldout, seeds, "the seed prompts")
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}

    reports = []
    for name in names:
        oargs = argparse.Namespace(**vars(args))
        if args.data_dir:
            oargs.data_dir = args.data_dir if len(names) == 1 else str(Path(args.data_dir) / safe_name(name))
        else:
            oargs.data_dir = tempfile.mkdtemp(prefix=f"learning-{safe_name(name)}-")
        try:
            report = run_oracle(name, oargs, heldout, seeds, env)
        except Exception as exc:  # noqa: BLE001 - one oracle failing does not stop the matrix
            traceback.print_exc()
            report = {"oracle": name, "expected": expected_decision(name), "data_dir": oargs.data_dir,
                      "error": f"{type(exc).__name__}: {exc}"}
        reports.append(report)
        print(json.dumps(report, indent=1), flush=True)
        if "error" not in report:
            wr = report["oracle_win_rate"]
            print(f"\nwin rate of {report['status']} run {report['run']} over SFT by oracle '{name}': "
                  f"{_rate(wr)} (W/T/L {wr['wins']}/{wr['ties']}/{wr['losses']}), KL {report['kl_to_sft']}, "
                  f"RM acc {report['rm_heldout_accuracy']['accuracy']}, "
                  f"total {report['phases_s']['total'] / 60:.1f} min", flush=True)
        if args.out:  # after each oracle, so a long matrix leaves partial results
            Path(args.out).write_text(json.dumps({"oracles": reports, "matrix": matrix(reports),
                                                  "failures": failures(reports)}, indent=1))

    table = matrix(reports)
    print("\n" + table)
    problems = failures(reports)
    if args.out:
        Path(args.out).write_text(json.dumps({"oracles": reports, "matrix": table, "failures": problems}, indent=1))
    for line in problems:
        print(f"FAIL: {line}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
