"""The frozen layers' forward in fp32 and in bf16: speed, and what it changes.

Every reward-model step of a retrain reuses the hidden states of the SFT model's frozen lower
layers (``retrain.backbone.StateCache``); computing them is most of the reward-model phase.
``RewardConfig.frozen_dtype = "auto"`` computes them under bf16 autocast where the device
multiplies bf16 natively (``retrain.backbone.native_bf16``).  This script measures, on the
embedded model and in one process (ratios inside one run):

- frozen-state throughput (tokens/s) of ``StateCache.get`` in fp32 and in bf16, alternating;
- the relative error of the bf16 states against fp32;
- why PPO keeps fp32: the per-token log-probability difference that bf16 lower layers would
  make at the rollout temperature (the policy's ratio and the KL are computed from them).

The texts are the model's own sampled answers to the shipped seed prompts.

    python benchmarks/frozen_precision.py                    # 32 answers, 2 threads
    python benchmarks/frozen_precision.py --answers 64 --json /tmp/frozen.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from assistant import models  # noqa: E402
from retrain.backbone import (  # noqa: E402
    StateCache,
    cpu_flags,
    encode,
    lower_forward,
    native_bf16,
    pad_left,
    upper_forward,
)
from retrain.data import DEFAULT_SYSTEM_PROMPT, load_seed_prompts  # noqa: E402


def sampled_answers(loaded: models.Loaded, prompts: list[list[dict]], max_new_tokens: int,
                    temperature: float) -> list[str]:
    tok, out = loaded.tokenizer, []
    for p in prompts:
        ids = tok.apply_chat_template(p, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        gen = loaded.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                    top_p=1.0, pad_token_id=tok.pad_token_id)
        out.append(tok.decode(gen[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="model (default: the embedded SmolLM2-135M)")
    p.add_argument("--answers", type=int, default=32, help="sampled answers to score (default 32)")
    p.add_argument("--train-layers", type=int, default=4, help="top layers a reward model trains (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--rounds", type=int, default=2, help="timed passes per precision, alternating (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--data-dir", default="data", help="the app's data directory (model cache in <dir>/models)")
    p.add_argument("--json", default="", help="write the results here too")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    cpu = torch.device("cpu")
    flags = sorted({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16"} & cpu_flags())
    print(f"CPU flags: {', '.join(flags) or 'unknown'}; native bf16: {native_bf16(cpu)}", flush=True)
    loaded = models.load(args.model, Path(args.data_dir).expanduser() / "models", device="cpu", dtype="float32")
    model, tok = loaded.model.eval(), loaded.tokenizer
    split = len(model.model.layers) - args.train_layers
    prompts = [[{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": q}]
               for q in load_seed_prompts()[:args.answers]]
    t = time.perf_counter()
    answers = sampled_answers(loaded, prompts, args.max_new_tokens, args.temperature)
    print(f"{len(answers)} answers sampled in {time.perf_counter() - t:.0f} s", flush=True)
    seqs = [encode(tok, p, a, 384) for p, a in zip(prompts, answers)]
    tokens = sum(len(s) for s in seqs)

    times: dict[str, list[float]] = {"float32": [], "bfloat16": []}
    states: dict[str, list[torch.Tensor]] = {}
    for _ in range(args.rounds):
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            cache = StateCache(split, tok.pad_token_id, 8, dtype)
            t = time.perf_counter()
            states[name] = cache.get(model, seqs, f"frozen layers, {name}")
            times[name].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    fp32, bf16 = torch.cat(states["float32"]), torch.cat(states["bfloat16"])
    state_err = float((bf16 - fp32).norm() / fp32.norm())

    # the policy's log-probabilities on the same texts with fp32 or bf16 lower layers
    diffs, per_seq = [], []
    for j in range(0, len(seqs), 8):
        chunk = seqs[j:j + 8]
        ids, mask = pad_left(chunk, tok.pad_token_id)
        lp = {}
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            with torch.no_grad():
                h = upper_forward(model, lower_forward(model, ids, mask, split, dtype))
                logits = model.lm_head(h[:, :-1]).float() / args.temperature
                lp[name] = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        m = mask[:, 1:].bool()
        d = (lp["bfloat16"] - lp["float32"]).masked_fill(~m, 0)
        diffs.append(d[m].abs())
        per_seq.append(d.sum(-1).abs())
    diffs, per_seq = torch.cat(diffs), torch.cat(per_seq)

    result = {
        "native_bf16": native_bf16(cpu), "cpu_flags": flags, "threads": args.threads, "split": split,
        "sequences": len(seqs), "tokens": tokens,
        "tokens_per_s": {k: round(tokens / v, 1) for k, v in best.items()},
        "speedup_bf16": round(best["float32"] / best["bfloat16"], 2),
        "state_relative_error": round(state_err, 4),
        "logprob_abs_diff_per_token": {"mean": round(float(diffs.mean()), 4), "max": round(float(diffs.max()), 3)},
        "logprob_abs_diff_per_answer_mean": round(float(per_seq.mean()), 3),
    }
    print(f"\nfrozen layers 0..{split} of {len(model.model.layers)}, {len(seqs)} sequences, {tokens} tokens, "
          f"{args.threads} threads (best of {args.rounds})")
    print("| precision | tokens/s | ratio |\n|---|---|---|")
    print(f"| fp32 | {result['tokens_per_s']['float32']} | 1.00 |")
    print(f"| bf16 (autocast) | {result['tokens_per_s']['bfloat16']} | {result['speedup_bf16']:.2f} |")
    print(f"\nbf16 states: relative error {state_err:.2e} against fp32")
    print(f"log-probabilities with bf16 lower layers (T={args.temperature}): |diff| per token mean "
          f"{result['logprob_abs_diff_per_token']['mean']}, max {result['logprob_abs_diff_per_token']['max']}; "
          f"per answer {result['logprob_abs_diff_per_answer_mean']} nats (why PPO's log-probs stay fp32)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
