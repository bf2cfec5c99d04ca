"""Retrain speed: the phases that sample (PPO's rollouts, the gate's answers) on each sampler.

A retrain on a CPU spends most of its time sampling: PPO's rollouts at every step and the
gate's answers from two models.  ``retrain.rollout`` samples them on llama.cpp (the app's CPU
decoder) with the policy's current LoRA, or in torch.  This script runs the real code of both
phases on the embedded model, once per sampler, in one process (ratios inside one run):

- PPO: ``--steps`` steps of ``retrain.ppo.train_ppo`` with the default ``PPOConfig`` (16
  rollouts a step, 2 epochs, LoRA on the top 4 layers) on the shipped seed prompts, against a
  reward model with an untrained head (what it scores does not change the time a step takes);
  per step: sampling seconds, the rest (log-probs, values, the PPO epochs), rollout length;
- gate: ``retrain.gate.generate`` of ``--gate-prompts`` answers from the SFT model.

Then both are projected to a default run: 16 PPO steps, and 64 held-out prompts x 2 models.
Each sampler starts from the same seed, but answers are random and their lengths differ:
the time per sampled token is printed too.  The CPU may be shared: compare within one run.

    python benchmarks/retrain_speed.py                       # 3 PPO steps, 32 gate prompts, 2 threads
    python benchmarks/retrain_speed.py --steps 4 --max-new-tokens 256 --json /tmp/retrain_speed.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from assistant import models  # noqa: E402
from retrain.backbone import end_of_turn_id  # noqa: E402
from retrain.data import DEFAULT_SYSTEM_PROMPT, load_seed_prompts  # noqa: E402
from retrain.gate import GateConfig, generate  # noqa: E402
from retrain.job import load_policy  # noqa: E402
from retrain.ppo import PPOConfig, train_ppo  # noqa: E402
from retrain.reward import RewardConfig, new_reward_model  # noqa: E402
from retrain.rollout import TorchSampler, make_sampler  # noqa: E402


def run_one(name: str, sft: models.Loaded, prompts: list[list[dict]], args, cache: Path) -> dict:
    torch.manual_seed(0)
    cfg = PPOConfig(steps=args.steps, temperature=args.temperature, max_new_tokens=args.max_new_tokens)
    policy, tok, base = load_policy(str(sft.path), cfg, "cpu")
    rm = new_reward_model(str(sft.path), RewardConfig(), None, "cpu")
    stop = models.stop_token_ids(policy.get_base_model(), tok) | {end_of_turn_id(tok)}
    sampler = make_sampler(name, base, policy, cache, threads=args.threads)
    steps: list[dict] = []
    try:
        result = train_ppo(policy, tok, rm, rm.as_value_model(), prompts, cfg, stop_ids=stop,
                           eot_id=end_of_turn_id(tok), log=lambda phase, step, m: steps.append(m),
                           sampler=sampler.follow(policy) if sampler else None)
        gate_cfg = GateConfig(temperature=args.temperature, top_p=args.top_p, max_new_tokens=args.max_new_tokens)
        gate_sampler = sampler.use_version(sft.path, cache) if sampler else TorchSampler(sft.model)
        t = time.perf_counter()
        _, lengths, _, _ = generate(sft, prompts[-args.gate_prompts:], gate_cfg, 1234, gate_sampler)
        gate_s = time.perf_counter() - t
    finally:
        if sampler:
            sampler.close()
    gen = [s["gen_s"] for s in steps]
    rest = [s["step_s"] - s["gen_s"] for s in steps]
    tokens = [s["response_length"] * cfg.batch_size for s in steps]
    return {"sampler": result.sampler, "steps": len(steps), "sample_s": statistics.mean(gen),
            "rest_s": statistics.mean(rest), "step_s": statistics.mean(s["step_s"] for s in steps),
            "rollout_tokens": statistics.mean(s["response_length"] for s in steps),
            "ms_per_rollout_token": 1000 * sum(gen) / max(1.0, sum(tokens)),
            "gate_s": gate_s, "gate_prompts": len(lengths), "gate_tokens": statistics.mean(lengths),
            "ms_per_gate_token": 1000 * gate_s / max(1, sum(lengths)),
            "projected_ppo_s": 16 * statistics.mean(s["step_s"] for s in steps),
            "projected_gate_sample_s": 2 * 64 * gate_s / max(1, len(lengths))}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded", help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--samplers", default="torch,llamacpp", help="comma-separated: torch, llamacpp")
    p.add_argument("--steps", type=int, default=3, help="PPO steps per sampler (default 3)")
    p.add_argument("--gate-prompts", type=int, default=32, help="gate answers per sampler (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=128,
                   help="rollout and answer cap (default 128, the learning benchmark's serving cap)")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads (default 2)")
    p.add_argument("--data-dir", default="data", help="the app's data directory (model cache in <dir>/models)")
    p.add_argument("--json", default="", help="write the results here too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(tempfile.mkdtemp(prefix="retrain-speed-"))
    models_dir = Path(args.data_dir).expanduser() / "models"
    sft = models.load(args.model, models_dir, device="cpu", dtype="float32")
    prompts = [[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": q}]
               for q in load_seed_prompts()]
    results = []
    for name in args.samplers.split(","):
        if name == "llamacpp" and make_sampler("auto", sft.path, sft.model, models_dir / "gguf") is None:
            print(f"skipping llamacpp: it cannot sample {sft.path} here (see the log)")
            continue
        print(f"-- {name}: {args.steps} PPO steps, {args.gate_prompts} gate answers", flush=True)
        results.append(run_one(name, sft, prompts, args, models_dir / "gguf" if name == "llamacpp" else cache))
    print(f"\n{args.model}, {args.threads} threads, cap {args.max_new_tokens} tokens, "
          f"{torch.get_num_threads()} torch threads\n")
    print("| sampler | PPO step: sampling | rest | step | rollout tokens | ms/token | gate: s for N answers | "
          "ms/token | projected PPO (16 steps) | projected gate sampling (64 x 2) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['sampler']} | {r['sample_s']:.1f} s | {r['rest_s']:.1f} s | {r['step_s']:.1f} s | "
              f"{r['rollout_tokens']:.0f} | {r['ms_per_rollout_token']:.1f} | {r['gate_s']:.1f} s for "
              f"{r['gate_prompts']} | {r['ms_per_gate_token']:.1f} | {r['projected_ppo_s'] / 60:.1f} min | "
              f"{r['projected_gate_sample_s'] / 60:.1f} min |")
    by = {r["sampler"]: r for r in results}
    if {"torch", "llamacpp"} <= by.keys():
        t, c = by["torch"], by["llamacpp"]
        print(f"\nllama.cpp against torch, same run: PPO step {t['step_s'] / c['step_s']:.2f}x faster "
              f"(sampling {t['sample_s'] / c['sample_s']:.2f}x, per rollout token "
              f"{t['ms_per_rollout_token'] / c['ms_per_rollout_token']:.2f}x); gate sampling "
              f"{t['gate_s'] / c['gate_s']:.2f}x (per token {t['ms_per_gate_token'] / c['ms_per_gate_token']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
