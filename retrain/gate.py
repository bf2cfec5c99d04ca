"""The offline gate: is the PPO candidate safe, and better by a judge PPO could not fool?

Checks (every failed one is a reason in the report, with its value and threshold):
1. the reward models learned: their cross-fitted accuracy (each decisive pair scored by the
   model that never trained on it, ``retrain.job``) >= ``min_rm_accuracy``, its Wilson
   lower bound >= ``min_rm_ci_low`` (above chance), and not worse than the previous run's
   by more than ``max_rm_drop``;
2. KL(candidate || SFT) on held-out prompts (k1 on the candidate's own samples, nats per
   response, at the sampling temperature) <= ``kl_budget``;
3. no degeneration *relative to the served model* (never an absolute threshold the SFT model
   itself could fail): end-of-answer rate, entropy, length, empty, duplicate and repeated
   answers, each allowed to be worse than the served model's by at most its delta;
4. the **judge** prefers the candidate to the served model on held-out prompts.  The judge is
   the cross-fitted reward model trained on the other half of the data, never the one PPO
   optimised (a reward-hacked candidate fools the model it hacked, Gao et al. 2022).  Its
   verdict on a prompt is its own Bradley-Terry probability that a user prefers the
   candidate's answer, sigmoid(r_candidate - r_served) in raw reward units, and the win rate
   is their mean (the judge's *expected* win rate, as AlpacaEval weights its judge's
   preferences by their probability): a confident judge counts for more than a hesitant
   one, and a judge that learned nothing says about 0.5 on every prompt, so it cannot pass.
   The decision is on the interval: the one-sided lower bound (Student-t, ``z`` at the
   sample's degrees of freedom) must exceed ``min_win_ci_low``, never the point estimate.
   The hard win rate (ties half) is reported beside it.
Both models are sampled the same way (the app's temperature, top-p and answer cap).

A candidate that passes goes on to the live canary (``retrain.canary``), where users' own
votes have the last word.  ``evaluate`` takes loaded models; ``retrain.job`` loads them.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from assistant import models
from retrain.backbone import end_of_turn_id, lower_forward, prompt_ids
from retrain.ppo import decode_responses, token_logprobs
from retrain.reward import RewardModel, wilson
from retrain.rollout import Sampler, TorchSampler


@dataclass
class GateConfig:
    min_rm_accuracy: float = 0.6
    """Cross-fitted pairwise accuracy of the reward models on decisive pairs they never saw."""
    min_rm_ci_low: float = 0.5
    """The Wilson 95% lower bound of that accuracy must clear chance."""
    max_rm_drop: float = 0.05
    """Allowed drop below the previous run's reward-model accuracy, when known."""
    kl_budget: float = 12.0
    """Nats per response, KL(candidate || SFT).  Good runs here reach about 6 (docs/rlhf.md)."""
    min_win_ci_low: float = 0.5
    """The judge's expected win rate of candidate over served: its lower bound must exceed this."""
    z: float = 1.645
    """Normal quantile of the win-rate bound (1.645: one-sided 95%), widened to Student-t's."""
    max_eos_drop: float = 0.1
    """End-of-answer rate may fall at most this much below the served model's."""
    max_entropy_drop: float = 0.5
    """Mean token entropy may fall at most this fraction below the served model's."""
    min_length_ratio: float = 0.15
    """Candidate mean length / served mean length, at least."""
    max_empty_increase: float = 0.05
    """Share of empty answers, at most this much above the served model's."""
    max_duplicate_increase: float = 0.2
    """Share of answers identical across prompts, at most this much above the served model's."""
    max_repetition_increase: float = 0.2
    """Repeated 4-grams inside an answer (mean share), at most this much above the served model's."""
    temperature: float | None = None
    """Sampling temperature; None: the app's --temperature."""
    top_p: float | None = None
    """Nucleus top-p; None: the app's --top-p."""
    max_new_tokens: int | None = None
    """Answer cap; None: the app's --max-new-tokens."""
    max_prompts: int = 64
    """Held-out prompts evaluated (one answer per model each)."""
    batch_size: int = 16
    """Prompts sampled together."""
    seed: int = 1234
    """Sampling seed (the served model uses seed + 1)."""


@dataclass
class GateReport:
    passed: bool
    reasons: list[str]
    metrics: dict = field(default_factory=dict)
    checks: list[dict] = field(default_factory=list)  # {name, value, threshold, passed}
    answers: list[dict] = field(default_factory=list)  # per held-out prompt: both answers, ended, judge scores


def repetition(text: str, n: int = 4) -> float:
    words = text.split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1 - len(set(grams)) / len(grams)


def generate(loaded, prompts: list[list[dict]], cfg: GateConfig, seed: int, sampler: Sampler | None = None):
    """Samples one answer per prompt from ``loaded`` (with ``sampler``, None: torch); returns
    texts, token lengths, ended flags, token tensors (on the CPU)."""
    tok = loaded.tokenizer
    stop = models.stop_token_ids(loaded.model, tok) | {end_of_turn_id(tok)}
    sampler = sampler or TorchSampler(loaded.model)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    texts, lengths, ended, raw = [], [], [], []
    for i in range(0, len(prompts), cfg.batch_size):
        enc = [prompt_ids(tok, p) for p in prompts[i:i + cfg.batch_size]]
        ids, pmask, resp, rmask = (t.cpu() for t in sampler.sample(
            enc, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, stop_ids=stop,
            pad_id=tok.pad_token_id, generator=gen))
        texts += decode_responses(tok, resp, rmask)
        e = torch.isin(resp, torch.tensor(sorted(stop))).any(-1)
        lengths += (rmask.sum(-1) - e.long()).tolist()
        ended += e.tolist()
        raw.append((ids, pmask, resp, rmask))
    return texts, lengths, ended, raw


@torch.no_grad()
def kl_and_entropy(model, ref, raw, temperature: float) -> tuple[list[float], float]:
    """Per-response k1 KL(model || ref) on the model's own samples, and the model's mean
    token entropy over them."""
    kls, ent_sum, n_tok = [], 0.0, 0.0
    for ids, pmask, resp, rmask in raw:
        full, fmask = torch.cat([ids, resp], 1), torch.cat([pmask, rmask], 1)
        P = ids.shape[1]
        lp, ent = token_logprobs(model, model.lm_head, lower_forward(model, full, fmask, 0), P, resp, temperature,
                                 with_entropy=True)
        if ref is not None:
            lr, _ = token_logprobs(ref, ref.lm_head, lower_forward(ref, full, fmask, 0), P, resp, temperature)
            kls += ((lp - lr) * rmask).sum(-1).tolist()
        ent_sum += float((ent * rmask).sum())
        n_tok += float(rmask.sum())
    return kls, ent_sum / max(1.0, n_tok)


def expected_win_rate(margins: torch.Tensor, z: float) -> tuple[float, float, float]:
    """The judge's expected win rate from its reward margins (candidate - served, raw reward
    units, one per prompt): the mean Bradley-Terry probability sigmoid(margin), with a
    two-sided interval of ``z`` widened to Student-t's quantile at n - 1 degrees of freedom
    (its Cornish-Fisher expansion in 1/dof, two terms).  Fewer than two prompts: no interval."""
    p = torch.sigmoid(margins.double())
    n = len(p)
    if n < 2:
        return (float(p.mean()) if n else 0.5), 0.0, 1.0
    mean = float(p.mean())
    dof = n - 1
    t = z + (z ** 3 + z) / (4 * dof) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * dof ** 2)
    half = t * float(p.std(unbiased=True)) / math.sqrt(n)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def _summary(texts, lengths, ended) -> dict:
    n = max(1, len(texts))
    counts = Counter(t for t in texts if t)
    return {"empty_rate": sum(1 for t in texts if not t.strip()) / n,
            "eos_rate": sum(ended) / n,
            "mean_tokens": sum(lengths) / n,
            "duplicate_rate": sum(c for c in counts.values() if c > 1) / n,
            "repetition": sum(repetition(t) for t in texts) / n}


class Checks:
    """Collects named checks with their value and threshold; failed ones become reasons."""

    def __init__(self):
        self.rows: list[dict] = []
        self.reasons: list[str] = []

    def at_least(self, name: str, value: float, threshold: float, reason: str) -> None:
        self._add(name, value, threshold, ">=", value >= threshold, reason)

    def at_most(self, name: str, value: float, threshold: float, reason: str) -> None:
        self._add(name, value, threshold, "<=", value <= threshold, reason)

    def above(self, name: str, value: float, threshold: float, reason: str) -> None:
        self._add(name, value, threshold, ">", value > threshold, reason)

    def _add(self, name, value, threshold, op, ok, reason) -> None:
        self.rows.append({"name": name, "value": value, "op": op, "threshold": threshold, "passed": bool(ok)})
        if not ok:
            self.reasons.append(reason)


def check_reward_models(checks: Checks, rm_eval: dict, cfg: GateConfig, previous_accuracy: float | None) -> None:
    acc, lo, n = rm_eval.get("accuracy", float("nan")), rm_eval.get("ci_low", 0.0), rm_eval.get("n", 0)
    checks.at_least("rm_accuracy", acc, cfg.min_rm_accuracy,
                    f"reward model accuracy {acc:.3f} < {cfg.min_rm_accuracy} (cross-fitted, n={n})")
    checks.at_least("rm_ci_low", lo, cfg.min_rm_ci_low,
                    f"reward model accuracy CI lower bound {lo:.3f} < {cfg.min_rm_ci_low} (n={n}): "
                    "no evidence it beats chance")
    if previous_accuracy is not None:
        floor = previous_accuracy - cfg.max_rm_drop
        checks.at_least("rm_accuracy_vs_previous", acc, floor,
                        f"reward model accuracy {acc:.3f} fell below the previous {previous_accuracy:.3f}")


def evaluate(candidate, served, sft, judge: RewardModel, heldout_prompts: list[list[dict]], rm_eval: dict,
             cfg: GateConfig, *, log=None, previous_rm_accuracy: float | None = None,
             sampler_for: Callable[[models.Loaded], Sampler] | None = None) -> GateReport:
    """``candidate``, ``served``, ``sft``: loaded models (``models.Loaded``; ``served`` may be
    ``sft``); ``judge``: the reward model PPO did not optimise; ``rm_eval``: the reward models'
    cross-fitted accuracy (``accuracy``, ``ci_low``, ``n``); ``sampler_for(loaded)``: what
    samples a model's answers (``retrain.rollout``; None: the model itself in torch)."""
    sampler_for = sampler_for or (lambda loaded: TorchSampler(loaded.model))
    t0 = time.perf_counter()
    if cfg.temperature is None or cfg.top_p is None or cfg.max_new_tokens is None:
        raise ValueError("GateConfig sampling settings must be set (the app's settings)")
    checks = Checks()
    metrics: dict = {f"rm_{k}": v for k, v in rm_eval.items() if isinstance(v, (int, float))}
    check_reward_models(checks, rm_eval, cfg, previous_rm_accuracy)
    prompts = heldout_prompts[:cfg.max_prompts]
    if not prompts:
        checks.reasons.append("no held-out prompts to evaluate on")
        return GateReport(False, checks.reasons, metrics, checks.rows)

    t = time.perf_counter()
    c_texts, c_len, c_end, c_raw = generate(candidate, prompts, cfg, cfg.seed, sampler_for(candidate))
    s_texts, s_len, s_end, s_raw = generate(served, prompts, cfg, cfg.seed + 1, sampler_for(served))
    sample_s = time.perf_counter() - t
    kls, c_ent = kl_and_entropy(candidate.model, sft.model, c_raw, cfg.temperature)
    _, s_ent = kl_and_entropy(served.model, None, s_raw, cfg.temperature)
    cs, ss = _summary(c_texts, c_len, c_end), _summary(s_texts, s_len, s_end)
    metrics.update({f"candidate_{k}": v for k, v in cs.items()})
    metrics.update({f"served_{k}": v for k, v in ss.items()})
    metrics.update(candidate_entropy=c_ent, served_entropy=s_ent, kl_candidate_sft=sum(kls) / len(kls))

    kl = metrics["kl_candidate_sft"]
    checks.at_most("kl_candidate_sft", kl, cfg.kl_budget, f"KL(candidate || SFT) {kl:.2f} nats > budget {cfg.kl_budget}")
    checks.at_least("eos_rate", cs["eos_rate"], ss["eos_rate"] - cfg.max_eos_drop,
                    f"degenerate: {cs['eos_rate']:.0%} of answers end within {cfg.max_new_tokens} tokens "
                    f"(served {ss['eos_rate']:.0%})")
    checks.at_least("entropy", c_ent, s_ent * (1 - cfg.max_entropy_drop),
                    f"degenerate: token entropy {c_ent:.2f} collapsed (served {s_ent:.2f})")
    checks.at_least("length_ratio", cs["mean_tokens"] / max(1e-9, ss["mean_tokens"]), cfg.min_length_ratio,
                    f"degenerate: length collapsed to {cs['mean_tokens']:.1f} tokens (served {ss['mean_tokens']:.1f})")
    checks.at_most("empty_rate", cs["empty_rate"], ss["empty_rate"] + cfg.max_empty_increase,
                   f"degenerate: {cs['empty_rate']:.0%} empty answers (served {ss['empty_rate']:.0%})")
    checks.at_most("duplicate_rate", cs["duplicate_rate"], ss["duplicate_rate"] + cfg.max_duplicate_increase,
                   f"degenerate: {cs['duplicate_rate']:.0%} of answers are identical across prompts "
                   f"(served {ss['duplicate_rate']:.0%})")
    checks.at_most("repetition", cs["repetition"], ss["repetition"] + cfg.max_repetition_increase,
                   f"degenerate: repeated 4-grams {cs['repetition']:.0%} (served {ss['repetition']:.0%})")

    c_raw = judge.score(prompts, c_texts, normalized=False)
    s_raw = judge.score(prompts, s_texts, normalized=False)
    c_sc, s_sc = ((x - judge.norm_mean) / judge.norm_std for x in (c_raw, s_raw))  # reported, normalised
    win_p = torch.sigmoid(c_raw - s_raw)
    win_rate, lo, hi = expected_win_rate(c_raw - s_raw, cfg.z)
    wins = float((c_raw > s_raw).sum() + 0.5 * (c_raw == s_raw).sum())
    sign_lo, sign_hi = wilson(wins, len(prompts), cfg.z)
    metrics.update({"judge_win_rate": win_rate, "judge_win_ci_low": lo, "judge_win_ci_high": hi,
                    "judge_sign_win_rate": wins / len(prompts), "judge_sign_win_ci_low": sign_lo,
                    "judge_sign_win_ci_high": sign_hi,
                    "candidate_judge_score": float(c_sc.mean()), "served_judge_score": float(s_sc.mean()),
                    "n_prompts": len(prompts), "gate_sample_s": sample_s, "gate_s": time.perf_counter() - t0})
    checks.above("judge_win_ci_low", lo, cfg.min_win_ci_low,
                 f"the judge (a reward model PPO did not optimise) expects users to prefer the candidate "
                 f"{win_rate:.0%} of the time on {len(prompts)} held-out prompts (it prefers it on "
                 f"{wins / len(prompts):.0%}); lower bound {lo:.0%} does not clear {cfg.min_win_ci_low:.0%}")
    if log:
        log("gate", 0, {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
    answers = [{"prompt": p, "candidate": ct, "served": st, "candidate_ended": bool(ce), "served_ended": bool(se),
                "candidate_judge": round(float(cj), 4), "served_judge": round(float(sj), 4), "judge_p": round(float(wp), 4)}
               for p, ct, st, ce, se, cj, sj, wp in zip(prompts, c_texts, s_texts, c_end, s_end, c_sc, s_sc, win_p,
                                                        strict=True)]
    return GateReport(passed=not checks.reasons, reasons=checks.reasons, metrics=metrics, checks=checks.rows,
                      answers=answers)
