"""The promotion decision: is the PPO candidate safe and better than what is served?

Checks (every failed one is a reason in the report):
1. the reward model learned: held-out accuracy >= ``min_rm_accuracy`` and its Wilson 95%
   lower bound >= ``min_rm_ci_low`` (above chance), and not worse than the previous RM by more
   than ``max_rm_drop`` when the caller passes ``previous_rm_accuracy``;
2. KL(candidate || SFT) on held-out prompts (k1 estimate on the candidate's own samples,
   nats per response, at the sampling temperature) <= ``kl_budget``;
3. the candidate's answers are not degenerate: empty-answer rate, end-of-turn rate, length
   collapse (mean length vs the served model's), identical answers across prompts, and
   repeated 4-grams;
4. the candidate beats the served model on the held-out prompts as judged by the reward
   model (the only judge the system has): win rate >= ``min_win_rate`` (ties count half).
Both models are sampled the same way (serving temperature and top-p, same token budget).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from assistant import models
from retrain.ppo import decode_responses, sample, token_logprobs
from retrain.reward import (
    RewardModel,
    RewardReport,
    end_of_turn_id,
    lower_forward,
    prompt_ids,
    wilson,
)


@dataclass
class GateConfig:
    min_rm_accuracy: float = 0.6
    min_rm_ci_low: float = 0.5  # the RM's held-out accuracy CI must clear chance
    max_rm_drop: float = 0.05  # vs the previous RM's accuracy, when known
    kl_budget: float = 25.0  # nats per response, KL(candidate || SFT)
    min_win_rate: float = 0.55  # candidate over served, judged by the RM
    max_empty_rate: float = 0.1
    min_eos_rate: float = 0.5  # share of answers that end within max_new_tokens
    min_length_ratio: float = 0.15  # candidate mean length / served mean length
    min_mean_tokens: float = 2.0
    max_duplicate_rate: float = 0.5  # share of prompts whose answer equals another prompt's
    max_repetition: float = 0.5  # share of repeated 4-grams inside an answer (mean)
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 128
    max_prompts: int = 48
    batch_size: int = 16
    seed: int = 1234


@dataclass
class GateReport:
    passed: bool
    reasons: list[str]
    metrics: dict = field(default_factory=dict)


def repetition(text: str, n: int = 4) -> float:
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def generate(model, tok, prompts: list[list[dict]], cfg: GateConfig, seed: int):
    """Samples one answer per prompt; returns texts, token lengths, ended flags, token tensors."""
    stop = models.stop_token_ids(model, tok) | {end_of_turn_id(tok)}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    texts, lengths, ended, raw = [], [], [], []
    for i in range(0, len(prompts), cfg.batch_size):
        enc = [prompt_ids(tok, p) for p in prompts[i:i + cfg.batch_size]]
        ids, pmask, resp, rmask = sample(model, tok, enc, max_new_tokens=cfg.max_new_tokens,
                                         temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=stop, generator=gen)
        texts += decode_responses(tok, resp, rmask)
        e = torch.isin(resp, torch.tensor(sorted(stop))).any(-1)
        lengths += (rmask.sum(-1) - e.long()).tolist()
        ended += e.tolist()
        raw.append((ids, pmask, resp, rmask))
    return texts, lengths, ended, raw


@torch.no_grad()
def kl_to(model, ref, raw, temperature: float) -> list[float]:
    """Per-response k1 KL(model || ref) on the model's own samples."""
    out = []
    for ids, pmask, resp, rmask in raw:
        full, fmask = torch.cat([ids, resp], 1), torch.cat([pmask, rmask], 1)
        P = ids.shape[1]
        lp, _ = token_logprobs(model, model.lm_head, lower_forward(model, full, fmask, 0), P, resp, temperature)
        lr, _ = token_logprobs(ref, ref.lm_head, lower_forward(ref, full, fmask, 0), P, resp, temperature)
        out += ((lp - lr) * rmask).sum(-1).tolist()
    return out


def _summary(texts, lengths, ended) -> dict:
    n = max(1, len(texts))
    counts = Counter(t for t in texts if t)
    return {"empty_rate": sum(1 for t in texts if not t.strip()) / n,
            "eos_rate": sum(ended) / n,
            "mean_tokens": sum(lengths) / n,
            "duplicate_rate": sum(c for c in counts.values() if c > 1) / n,
            "repetition": sum(repetition(t) for t in texts) / n}


def _same(a: str, b: str) -> bool:
    try:
        return os.path.realpath(models.resolve(a, Path(a).parent)) == os.path.realpath(models.resolve(b, Path(b).parent))
    except Exception:  # noqa: BLE001
        return a == b


def evaluate(candidate_path: str, served_path: str, sft_path: str, reward_model_path: str,
             heldout_prompts: list[list[dict]], rm_report: RewardReport, cfg: GateConfig, *, log=None,
             previous_rm_accuracy: float | None = None) -> GateReport:
    t0 = time.perf_counter()
    reasons: list[str] = []
    metrics: dict = {"rm_accuracy": rm_report.accuracy, "rm_ci_low": rm_report.ci_low,
                     "rm_ci_high": rm_report.ci_high, "rm_margin": rm_report.margin}
    if not (rm_report.accuracy >= cfg.min_rm_accuracy):
        reasons.append(f"reward model held-out accuracy {rm_report.accuracy:.3f} < {cfg.min_rm_accuracy}")
    if rm_report.ci_low < cfg.min_rm_ci_low:
        reasons.append(f"reward model accuracy CI lower bound {rm_report.ci_low:.3f} < {cfg.min_rm_ci_low} "
                       f"(n={rm_report.n_heldout})")
    if previous_rm_accuracy is not None and rm_report.accuracy < previous_rm_accuracy - cfg.max_rm_drop:
        reasons.append(f"reward model accuracy {rm_report.accuracy:.3f} fell below the previous "
                       f"{previous_rm_accuracy:.3f}")
    prompts = heldout_prompts[:cfg.max_prompts]
    if not prompts:
        reasons.append("no held-out prompts to evaluate on")
        return GateReport(False, reasons, metrics)

    def load(path):
        return models.load(path, Path(path).parent, device="cpu", dtype="float32")

    cand = load(candidate_path)
    sft = load(sft_path)
    served = sft if _same(served_path, sft_path) else load(served_path)
    c_texts, c_len, c_end, c_raw = generate(cand.model, cand.tokenizer, prompts, cfg, cfg.seed)
    s_texts, s_len, s_end, _ = generate(served.model, served.tokenizer, prompts, cfg, cfg.seed + 1)
    kls = kl_to(cand.model, sft.model, c_raw, cfg.temperature)
    cs, ss = _summary(c_texts, c_len, c_end), _summary(s_texts, s_len, s_end)
    metrics.update({f"candidate_{k}": v for k, v in cs.items()})
    metrics.update({f"served_{k}": v for k, v in ss.items()})
    metrics["kl_candidate_sft"] = sum(kls) / len(kls)
    if metrics["kl_candidate_sft"] > cfg.kl_budget:
        reasons.append(f"KL(candidate || SFT) {metrics['kl_candidate_sft']:.2f} nats > budget {cfg.kl_budget}")
    if cs["empty_rate"] > cfg.max_empty_rate:
        reasons.append(f"degenerate: {cs['empty_rate']:.0%} empty answers")
    if cs["eos_rate"] < cfg.min_eos_rate:
        reasons.append(f"degenerate: only {cs['eos_rate']:.0%} of answers end within {cfg.max_new_tokens} tokens")
    if cs["mean_tokens"] < max(cfg.min_mean_tokens, cfg.min_length_ratio * ss["mean_tokens"]):
        reasons.append(f"degenerate: length collapsed to {cs['mean_tokens']:.1f} tokens "
                       f"(served {ss['mean_tokens']:.1f})")
    if cs["duplicate_rate"] > cfg.max_duplicate_rate:
        reasons.append(f"degenerate: {cs['duplicate_rate']:.0%} of answers are identical across prompts")
    if cs["repetition"] > cfg.max_repetition:
        reasons.append(f"degenerate: repeated 4-grams {cs['repetition']:.0%}")
    rm = RewardModel.load(reward_model_path)
    c_sc = rm.score(prompts, c_texts)
    s_sc = rm.score(prompts, s_texts)
    wins = float((c_sc > s_sc).sum() + 0.5 * (c_sc == s_sc).sum())
    win_rate = wins / len(prompts)
    lo, hi = wilson(wins, len(prompts))
    metrics.update({"rm_win_rate": win_rate, "rm_win_ci_low": lo, "rm_win_ci_high": hi,
                    "candidate_rm_score": float(c_sc.mean()), "served_rm_score": float(s_sc.mean()),
                    "n_prompts": len(prompts), "gate_s": time.perf_counter() - t0})
    if win_rate < cfg.min_win_rate:
        reasons.append(f"candidate wins {win_rate:.0%} against the served model on held-out prompts "
                       f"(RM judge) < {cfg.min_win_rate:.0%}")
    if log:
        log("gate", 0, {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    return GateReport(passed=not reasons, reasons=reasons, metrics=metrics)
