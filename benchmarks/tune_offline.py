"""Offline tuning harness: does the retrain loop learn an oracle's taste?

1. samples two answers per prompt from the SFT model (serving settings: T=0.7, top-p 0.9),
2. votes on each pair with a hidden oracle (``benchmarks.oracles``),
3. writes conversations, generations and verdicts into a FeedbackStore in a temp dir, so
   ``retrain.data.build_snapshot`` is exercised exactly as in the app,
4. trains the reward model, runs PPO (and optionally the gate),
5. measures the oracle win rate of the new policy over SFT on held-out prompts (both sampled
   with the same settings) with a Wilson 95% interval, and prints phase wall times.

    python -m benchmarks.tune_offline --pairs 300 --threads 2 --oracle concise

Sampled pairs are cached under ``--cache`` so repeated tuning runs skip step 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from assistant import models
from benchmarks import oracles
from feedback.store import FeedbackStore
from retrain.data import build_snapshot, load_seed_prompts
from retrain.gate import GateConfig, evaluate
from retrain.ppo import PPOConfig, decode_responses, sample, train_ppo
from retrain.reward import RewardConfig, end_of_turn_id, prompt_ids, train_reward_model, wilson

SYSTEM = "You are a helpful AI assistant."
TOPICS = ["the ocean", "volcanoes", "chess", "coffee", "the moon", "bees", "rainforests", "jazz", "bicycles",
          "the Roman Empire", "photosynthesis", "black holes", "recycling", "sleep", "dogs", "bread baking",
          "electric cars", "the immune system", "gardening", "clouds", "time zones", "spiders", "glaciers",
          "the printing press", "solar power", "friendship", "meditation", "pizza", "deserts", "penguins",
          "credit cards", "earthquakes", "libraries", "running", "tea", "computers", "rivers", "birds",
          "mountains", "music lessons", "saving money", "job interviews", "cooking rice", "public transport",
          "hiking", "the internet", "vaccines", "pyramids", "dinosaurs", "origami"]
TEMPLATES = ["Tell me about {t}.", "Explain {t} to a beginner.", "What should I know about {t}?",
             "Give me some facts about {t}.", "Why is {t} interesting?", "Write a short paragraph about {t}.",
             "What are the pros and cons of {t}?", "Describe {t}."]


def prompt_pool(seed: int = 0) -> list[str]:
    pool = [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]
    random.Random(seed).shuffle(pool)
    return pool


def chat(p: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p}]


def generate(model, tok, prompts: list[str], *, n: int, max_new_tokens: int, seed: int, batch: int = 16,
             temperature: float = 0.7, top_p: float = 0.9) -> list[list[str]]:
    """n samples per prompt (serving settings)."""
    stop = models.stop_token_ids(model, tok) | {end_of_turn_id(tok)}
    gen = torch.Generator().manual_seed(seed)
    jobs = [p for p in prompts for _ in range(n)]
    texts: list[str] = []
    for i in range(0, len(jobs), batch):
        enc = [prompt_ids(tok, chat(p)) for p in jobs[i:i + batch]]
        _, _, resp, rmask = sample(model, tok, enc, max_new_tokens=max_new_tokens, temperature=temperature,
                                   top_p=top_p, stop_ids=stop, generator=gen)
        texts += decode_responses(tok, resp, rmask)
        print(f"  generated {len(texts)}/{len(jobs)}", flush=True)
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def fill_store(store: FeedbackStore, prompts: list[str], answers: list[list[str]], oracle, sessions: int = 10) -> dict:
    votes = {"a": 0, "b": 0, "tie": 0}
    for i, (p, (a, b)) in enumerate(zip(prompts, answers)):
        sid = f"session-{i % sessions}"
        conv = store.start_conversation(sid, SYSTEM)
        store.set_message(conv, 0, "user", p)
        ctx = chat(p)
        common = dict(session_id=sid, conversation_id=conv, turn=1, context=ctx, model_version="sft",
                      sampling={"temperature": 0.7, "top_p": 0.9}, prompt_tokens=0, completion_tokens=0,
                      ttft_ms=None, latency_ms=None, finish_reason="stop")
        ga = store.record_generation(content=a, **common)
        gb = store.record_generation(content=b, **common)
        comp = store.open_comparison(session_id=sid, conversation_id=conv, turn=1, a_generation_id=ga,
                                     b_generation_id=gb)
        v = oracle(ctx, a, b)
        votes[v] += 1
        store.decide_comparison(comp, v, sid)
    return votes


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="embedded")
    ap.add_argument("--models-dir", default=str(Path.home() / ".cache" / "rlhf-assistant-tests" / "models"))
    ap.add_argument("--oracle", default="concise")
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--eval-prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cache", default="/tmp/tune_offline_cache")
    ap.add_argument("--gate", action="store_true", help="also run the promotion gate (timed)")
    ap.add_argument("--ppo", default="{}", help="JSON overrides of PPOConfig")
    ap.add_argument("--rm", default="{}", help="JSON overrides of RewardConfig")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    times: dict[str, float] = {}
    sft_path = models.resolve(args.model, args.models_dir)
    loaded = models.load(sft_path, args.models_dir, device="cpu", dtype="float32")
    oracle = oracles.get(args.oracle)
    pool = prompt_pool(args.seed)
    seeds = set(load_seed_prompts())
    pool = [p for p in pool if p not in seeds]
    train_prompts = pool[:args.pairs]
    eval_prompts = pool[args.pairs:args.pairs + args.eval_prompts]
    if len(eval_prompts) < args.eval_prompts:
        raise SystemExit("prompt pool too small")

    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    key = cache / f"pairs-{Path(sft_path).name}-{args.pairs}-{args.max_new_tokens}-{args.seed}.json"
    t = time.perf_counter()
    if key.exists():
        answers = json.loads(key.read_text())
    else:
        answers = generate(loaded.model, loaded.tokenizer, train_prompts, n=2, max_new_tokens=args.max_new_tokens,
                           seed=args.seed)
        key.write_text(json.dumps(answers))
    times["collect"] = time.perf_counter() - t

    work = Path(tempfile.mkdtemp(prefix="tune-offline-"))
    store = FeedbackStore(work / "feedback.sqlite")
    votes = fill_store(store, train_prompts, answers, oracle)
    snap = build_snapshot(store)
    print("votes", votes, "snapshot", {k: snap.stats[k] for k in ("pairs", "train", "heldout", "ties",
                                                                     "rollout_prompts", "heldout_prompts")})
    rcfg = dataclasses.replace(RewardConfig(), **json.loads(args.rm))
    pcfg = dataclasses.replace(PPOConfig(), **json.loads(args.ppo))

    def log(phase, step, metrics):
        if phase == "ppo":
            print(f"  ppo {step:3d} " + " ".join(f"{k}={v:.3g}" for k, v in metrics.items()), flush=True)

    ref_samples = [(chat(p), a) for p, ans in zip(train_prompts, answers) for a in ans]
    t = time.perf_counter()
    rep = train_reward_model(sft_path, snap.train, snap.heldout, str(work / "rm"), rcfg, ref_samples=ref_samples,
                             log=log)
    times["reward_model"] = time.perf_counter() - t
    print(f"RM: acc {rep.accuracy:.3f} [{rep.ci_low:.3f}, {rep.ci_high:.3f}] margin {rep.margin:.2f} "
          f"loss {rep.first_loss:.3f}->{rep.train_loss:.3f} n={rep.n_train}/{rep.n_heldout}", flush=True)
    t = time.perf_counter()
    res = train_ppo(sft_path, sft_path, str(work / "rm"), snap.rollout_prompts, str(work / "policy"), pcfg, log=log)
    times["ppo"] = time.perf_counter() - t
    gate = None
    if args.gate:
        t = time.perf_counter()
        gate = evaluate(res.path, sft_path, sft_path, str(work / "rm"), snap.heldout_prompts, rep, GateConfig())
        times["gate"] = time.perf_counter() - t
        print("gate", gate.passed, gate.reasons, {k: round(v, 3) for k, v in gate.metrics.items()})

    t = time.perf_counter()
    new = models.load(res.path, args.models_dir, device="cpu", dtype="float32")
    new_ans = generate(new.model, new.tokenizer, eval_prompts, n=1, max_new_tokens=args.max_new_tokens,
                       seed=args.seed + 7)
    sft_ans = generate(loaded.model, loaded.tokenizer, eval_prompts, n=1, max_new_tokens=args.max_new_tokens,
                       seed=args.seed + 7)
    w = tie = 0
    for p, (a,), (b,) in zip(eval_prompts, new_ans, sft_ans):
        v = oracle(chat(p), a, b)
        w += v == "a"
        tie += v == "tie"
    n = len(eval_prompts)
    wr = (w + 0.5 * tie) / n
    lo, hi = wilson(w + 0.5 * tie, n)
    decisive = n - tie
    wr_d = w / decisive if decisive else float("nan")
    lo_d, hi_d = wilson(w, decisive) if decisive else (0.0, 1.0)
    times["eval"] = time.perf_counter() - t
    mean_words = (sum(len(a[0].split()) for a in new_ans) / n, sum(len(b[0].split()) for b in sft_ans) / n)
    out = {"win_rate_ties_half": wr, "ci": [lo, hi], "win_rate_decisive": wr_d, "ci_decisive": [lo_d, hi_d],
           "wins": w, "ties": tie, "n": n, "rm_accuracy": rep.accuracy, "rm_ci": [rep.ci_low, rep.ci_high],
           "ppo_final": res.final, "mean_words_new_sft": mean_words, "times_s": times, "threads": args.threads,
           "ppo_config": dataclasses.asdict(pcfg), "rm_config": dataclasses.asdict(rcfg)}
    if gate:
        out["gate"] = {"passed": gate.passed, "reasons": gate.reasons}
    print(json.dumps(out, indent=1, default=str))
    for i in range(3):
        print("--- prompt:", eval_prompts[i], "\n NEW:", new_ans[i][0][:300], "\n SFT:", sft_ans[i][0][:300])
    store.close()
    return out


if __name__ == "__main__":
    main()
