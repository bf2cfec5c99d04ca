"""PPO with a KL penalty against the frozen SFT model (one readable file, one config).

Objective: maximise E[r(x, y)] - beta * KL(pi || pi_ref), per token (k1 estimator)::

    reward_t = -beta * (logp_policy_t - logp_ref_t)   (+ RM score at the last token)

The recipe, each detail and why, with the lessons measured on this project: ``docs/rlhf.md``.
Where it lives below:
- rollouts sampled at ``temperature`` and log-probs computed from ``logits / temperature``;
  top-p is off during rollouts (``rollout_top_p=1``) so the sampled distribution is exactly
  the one whose log-probs PPO uses;
- left-padded prompts with position ids from the attention mask; every token after the
  first end-of-turn token is masked out; a response that never ends (hits the rollout cap,
  which follows the serving cap) is scored by the RM as if it ended there, minus
  ``truncation_penalty``: a penalty *relative* to its score, so PPO cannot learn "stop
  sooner" in place of what users prefer;
- GAE (gamma 1, lambda 0.95) with a value model initialised from the reward model (so the
  final score reaches early tokens from the first step), advantages whitened per batch;
- clipped policy loss, clipped value loss, Adam eps 1e-5, linear lr decay, grad clip;
- fixed beta or the adaptive controller of Ziegler et al. (``adaptive_kl``);
- optional PPO-ptx: LM loss on chosen answers / rewrites (``ptx_coef``, default 0);
- dropout off everywhere (models in eval mode while training).

Efficiency (two CPU cores): LoRA on the top ``lora_layers`` layers only.  The frozen layers
below are shared by the policy, the reference (the same model with the adapter disabled),
the value model and the reward model, so their hidden states are computed once per rollout
batch and reused by all four models and by every PPO epoch.  Rollouts are sampled on
llama.cpp with the policy's current adapter where the app serves from llama.cpp, else in
torch with the adapter merged (``retrain.rollout``); log-probabilities are always torch's.

Multi-GPU: ``accelerate launch -m retrain run ...`` (or any script calling ``train_ppo``)
runs one process per device; each process takes its share of every prompt batch, gradients
of the LoRA / value parameters are averaged across processes, and the main process saves.
On a CPU it is a single process.

``train_ppo`` takes loaded models and returns metrics; ``retrain.job`` loads and saves.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from statistics import NormalDist

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from retrain.backbone import Lower, lower_forward, upper_forward
from retrain.reward import RewardModel
from retrain.rollout import Sampler, TorchSampler


@dataclass
class PPOConfig:
    # -- schedule
    steps: int = 16
    """PPO iterations (one rollout batch and its update each)."""
    batch_size: int = 16
    """Rollouts per batch (shared across processes): ``batch_size / group_size`` prompts."""
    group_size: int = 1
    """Rollouts per prompt.  1: one each, advantages from GAE on the critic.  k > 1: k answers to
    each prompt and the critic-free leave-one-out baseline of RLOO (Ahmadian et al. 2024): each
    answer's return (score minus the KL it paid) less the mean of the other k - 1 answers'.  The
    early stop counts a prompt's answers as one draw.  The reward model's level differs from
    prompt to prompt (by as much as the answers differ: ``docs/rlhf.md`` §3), which a
    per-prompt baseline removes and a critic must learn."""
    minibatch_size: int = 8
    """Rollouts per gradient step."""
    ppo_epochs: int = 2
    """Passes over each rollout batch."""
    seed: int = 0
    """Prompt order and sampling seed."""
    # -- sampling
    temperature: float | None = None
    """Rollout temperature; None: the app's --temperature.  Log-probs use logits / temperature."""
    rollout_top_p: float = 1.0
    """Top-p during rollouts: 1 (off), so the sampled distribution is the one PPO scores."""
    max_new_tokens: int | None = None
    """Rollout cap; None: the app's --max-new-tokens (the serving cap)."""
    max_prompt_length: int = 256
    """Prompts are cut from the left to this many tokens."""
    truncation_penalty: float = 1.0
    """Subtracted from the RM score of a rollout that hits the cap (normalised units); with
    ``truncation_control``, where it starts."""
    truncation_control: float = 0.0
    """0: a fixed ``truncation_penalty``.  Above 0: the penalty is a Lagrange multiplier on the
    end-of-answer rate, kept at step 1's (the policy PPO started from): each step it moves by
    this much per unit the rate of the last ``judge_window`` steps is below (up) or above (down)
    step 1's, within [0, ``max_truncation_penalty``].  A fixed penalty is a price on not ending
    that PPO may find cheaper to pay, or cheaper to earn by ending sooner, than the taste."""
    max_truncation_penalty: float = 3.0
    """The controlled penalty's ceiling."""
    # -- objective
    beta: float = 0.05
    """KL coefficient of the per-token k1 penalty against the reference."""
    adaptive_kl: bool = False
    """Ziegler et al.'s adaptive controller for beta."""
    target_kl: float = 6.0
    """Adaptive controller target, nats per response."""
    kl_horizon: int = 10000
    """Adaptive controller horizon, in rollouts."""
    gamma: float = 1.0
    """GAE discount."""
    lam: float = 0.95
    """GAE lambda."""
    cliprange: float = 0.2
    """Policy ratio clip."""
    cliprange_value: float = 0.2
    """Value prediction clip."""
    vf_coef: float = 0.1
    """Value loss coefficient."""
    whiten_advantages: bool = True
    """Whiten advantages per rollout batch."""
    score_clip: float = 5.0
    """Clip the normalised RM score to +-score_clip."""
    ptx_coef: float = 0.0
    """PPO-ptx: LM loss on chosen answers and rewrites (0 = off)."""
    # -- early stopping (``EarlyStop``)
    judge_patience: int = 6
    """Stop when the judge's score of the fresh rollouts (mean over ``judge_window`` steps) has
    not beaten its best by ``judge_min_delta`` for this many steps (0 = never)."""
    judge_window: int = 3
    """Steps averaged for the judge's score (each is one rollout batch)."""
    judge_min_delta: float = 0.05
    """Improvement of the judge's windowed score (normalised units) that counts as progress."""
    judge_confidence: float = 0.9
    """Evidence the judge's decisions need (``EarlyStop``): stop only when the windowed score
    fell below the best at this one-sided confidence, and keep the latest policy not below the
    best at it.  A step's 16 rollouts measure the judge's mean to about +-0.25, so without it
    a noise peak at step 2 stopped a no_hedging run at KL 0.1 and kept that step.  0: patience
    alone stops, and the best window is kept."""
    max_eos_drop: float = 0.15
    """Stop when the end-of-answer rate (windowed) falls this far below the first step's..."""
    eos_confidence: float = 0.95
    """...and a one-sided two-proportion test says it fell at this confidence (0: the drop
    alone decides).  A batch of 16 answers measures the rate to +-12 points, so without it
    the guard stops on sampling noise at KL ~0 (it did on a plain_words run)."""
    keep_best: bool = True
    """End at the policy ``EarlyStop`` keeps (the latest whose judge score is within noise of the
    best; the served policy when the judge never saw progress), not the last one."""
    # -- optimisation
    lr: float = 5e-4
    """LoRA learning rate (full fine-tuning would be ~1e-6..3e-6)."""
    value_lr: float = 5e-4
    """Critic learning rate."""
    adam_eps: float = 1e-5
    """Adam epsilon."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    lr_decay: bool = True
    """Linear learning-rate decay over the steps."""
    # -- model
    lora_layers: int = 4
    """Top decoder layers carrying the policy LoRA (a new adapter on a full model)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha."""
    ref: str = "sft"
    """KL reference: 'sft' (the policy's base, adapter disabled) or 'served' (the served version)."""
    threads: int = 0
    """Torch threads (0: leave as set by the caller)."""


@dataclass
class PPOResult:
    steps: int
    final: dict  # the last step's metrics (``ppo/...``)
    wall_s: float = 0.0
    sample_s: float = 0.0  # of which sampling rollouts
    sampler: str = "torch"  # what sampled them (``retrain.rollout``)
    stopped: str = "steps"  # why it ended: "steps" (all done), "judge", "eos" or "asked" (should_stop)
    stop_reason: str = ""  # the early stop in words
    kept_step: int = 0  # the step whose policy was kept (``keep_best``); 0: the last


# ----------------------------------------------------------------------------- pure pieces (tested)
def kl_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, score: torch.Tensor,
               beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * (logp - ref_logp) on response tokens, plus the score at each
    row's last response token.  Returns (rewards, per-token kl)."""
    kl = (logp - ref_logp) * mask
    rewards = -beta * kl
    last = (mask.sum(-1) - 1).clamp(min=0).long()
    rewards = rewards.clone()
    rewards[torch.arange(len(score)), last] += score
    return rewards * mask, kl


def loo_advantages(score: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float,
                   group_size: int) -> torch.Tensor:
    """RLOO's sequence advantages [B, L]: each row's return ``score - beta * sum(kl)`` less the
    mean return of the other rows of its group (rows ``[g*k, (g+1)*k)`` share a prompt), on
    every response token."""
    ret = (score - beta * (kl * mask).sum(-1)).view(-1, group_size)
    loo = (ret.sum(-1, keepdim=True) - ret) / (group_size - 1)
    return (ret - loo).reshape(-1, 1) * mask


def group_mean_sd(x: torch.Tensor, group_size: int) -> tuple[int, float | None]:
    """(number of groups, std of the group means): the sampling error of ``x.mean()`` when rows
    of a group share a prompt, whose level they share too."""
    means = x.reshape(-1, group_size).mean(-1)
    return len(means), (float(means.std()) if len(means) > 1 else None)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over masked, right-padded responses.
    Returns (advantages, returns); the value after the last token is 0."""
    B, L = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(B, dtype=rewards.dtype, device=rewards.device)
    values = values * mask
    for t in reversed(range(L)):
        next_v = values[:, t + 1] if t + 1 < L else torch.zeros_like(last)
        next_m = mask[:, t + 1] if t + 1 < L else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v * next_m - values[:, t]
        last = delta + gamma * lam * last * next_m
        adv[:, t] = last * mask[:, t]
    return adv, (adv + values) * mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum() / mask.sum().clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def policy_loss(logp, old_logp, adv, mask, cliprange):
    ratio = torch.exp(logp - old_logp)
    l1 = -adv * ratio
    l2 = -adv * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(l1, l2), mask)
    with torch.no_grad():  # diagnostics: no graph, no grad-carrying floats
        clipfrac = masked_mean((l2 > l1).float(), mask)
        approx_kl = masked_mean(0.5 * (logp - old_logp) ** 2, mask)
    return loss, clipfrac, approx_kl


def value_loss(vpred, old_values, returns, mask, cliprange_value):
    vclipped = old_values + torch.clamp(vpred - old_values, -cliprange_value, cliprange_value)
    loss = 0.5 * masked_mean(torch.maximum((vpred - returns) ** 2, (vclipped - returns) ** 2), mask)
    return loss


class AdaptiveKL:
    """Ziegler et al. 2019: beta <- beta * (1 + clip(kl/target - 1, -0.2, 0.2) * n / horizon)."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.beta, self.target, self.horizon = beta, target, horizon

    def update(self, kl: float, n: int) -> None:
        err = max(-0.2, min(0.2, kl / self.target - 1))
        self.beta *= 1 + err * n / self.horizon


class EndingControl:
    """The truncation penalty under ``truncation_control``: a multiplier that holds the
    end-of-answer rate at step 1's, the way ``AdaptiveKL`` holds the KL at its target."""

    def __init__(self, cfg: PPOConfig):
        self.penalty, self.rate, self.ceiling = cfg.truncation_penalty, cfg.truncation_control, cfg.max_truncation_penalty
        self.window = max(1, cfg.judge_window)
        self.eos: list[tuple[float, int]] = []

    def update(self, eos_rate: float, n: int) -> float:
        """This step's end-of-answer rate over ``n`` answers; the penalty to apply to them."""
        self.eos.append((eos_rate, n))
        if self.rate and len(self.eos) > 1:
            recent = self.eos[-self.window:]
            window = sum(e * c for e, c in recent) / sum(c for _, c in recent)
            self.penalty = min(self.ceiling, max(0.0, self.penalty + self.rate * (self.eos[0][0] - window)))
        return self.penalty


def proportion_drop_p(ended0: float, n0: int, ended1: float, n1: int) -> float:
    """One-sided p-value that the rate ended1/n1 is below ended0/n0 (pooled two-proportion z)."""
    pooled = (ended0 + ended1) / (n0 + n1)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n0 + 1 / n1))
    if se == 0:
        return 1.0 if ended1 / n1 >= ended0 / n0 else 0.0
    return 1 - NormalDist().cdf((ended0 / n0 - ended1 / n1) / se)


class EarlyStop:
    """When PPO stops, and which policy it keeps.  ``update(step, judge_score, eos_rate, n,
    judge_sd)`` is called once per step with the judge's mean score of that step's fresh
    rollouts (sampled by the policy *before* the step's update, from prompts it was not yet
    updated on), their end-of-answer rate, how many there were and the spread of their judge
    scores; it returns a reason to stop, or None.  ``keep_now`` says whether the policy that
    sampled this step is now the one to keep (the caller snapshots it).

    The judge's score of 16 rollouts is noisy (about +-0.25 reward-std), so both decisions ask
    for evidence (a one-sided z-test between windows of ``judge_window`` steps at
    ``judge_confidence``):
    - **stop**: no window beat the best by ``judge_min_delta`` for ``judge_patience`` steps *and*
      the current window is below the best beyond noise (the judge's score fell);
    - **keep**: the latest policy whose window is not below the best beyond noise, once the
      best beat step 1's score beyond noise; the policy PPO started from until then, so a run
      that learned little leaves a candidate close to the served one.
    Without ``judge_sd`` every shortfall counts as evidence; with ``judge_confidence`` 0 patience
    alone stops and only the best window is kept.
    The end-of-answer guard compares the last ``judge_window`` steps with step 1 (the policy
    PPO started from) and needs both the drop and the evidence for it."""

    def __init__(self, cfg: PPOConfig):
        self.cfg = cfg
        self.judge: list[float] = []
        self.judge_var: list[float] = []  # variance of each step's mean
        self.eos: list[float] = []
        self.counts: list[int] = []
        self.best = -math.inf
        self.best_var = 0.0
        self.best_step = 0
        self.keep_step = 0
        self.improved = False  # this step's window is the new best
        self.keep_now = False  # this step's policy is the one to keep

    def _window(self) -> tuple[float, float]:
        w = max(1, self.cfg.judge_window)
        js, vs = self.judge[-w:], self.judge_var[-w:]
        return sum(js) / len(js), sum(vs) / len(vs) ** 2

    def _fell(self, mean: float, var: float) -> tuple[bool, float]:
        """Whether ``mean`` is below the best window beyond noise, and the one-sided p."""
        if not self.cfg.judge_confidence:  # patience alone: only the best window is kept
            return True, 0.0
        se = math.sqrt(self.best_var + var)
        if se == 0:
            return mean < self.best, 0.0 if mean < self.best else 1.0
        p = 1 - NormalDist().cdf((self.best - mean) / se)
        return p <= 1 - self.cfg.judge_confidence, p

    def _learned(self) -> bool:
        """Whether the best window beat step 1's (the policy PPO started from) beyond noise."""
        if self.best_step <= 1:
            return False
        se = math.sqrt(self.best_var + self.judge_var[0])
        if se == 0:
            return True
        return 1 - NormalDist().cdf((self.best - self.judge[0]) / se) <= 1 - self.cfg.judge_confidence

    def update(self, step: int, judge_score: float | None, eos_rate: float, n: int,
               judge_sd: float | None = None) -> str | None:
        """One step's fresh rollouts: ``n`` independent draws (prompts, under ``group_size``),
        their end-of-answer rate, the judge's mean score and spread.  The reason to stop, or None."""
        cfg = self.cfg
        w = max(1, cfg.judge_window)
        self.eos.append(eos_rate)
        self.counts.append(n)
        n_w = sum(self.counts[-w:])
        window_eos = sum(e * c for e, c in zip(self.eos[-w:], self.counts[-w:])) / n_w
        self.improved = self.keep_now = False
        fell, p_fell = False, 1.0
        if judge_score is not None:
            self.judge.append(judge_score)
            self.judge_var.append(0.0 if judge_sd is None else judge_sd ** 2 / max(1, n))
            window, var = self._window()
            if step == 1 or window > self.best + cfg.judge_min_delta:
                self.best, self.best_var, self.best_step, self.improved = window, var, step, True
            fell, p_fell = self._fell(window, var)
            if not cfg.judge_confidence:  # patience alone: the best window is kept
                self.keep_now = self.improved
            else:
                self.keep_now = step == 1 or (self._learned() and not fell
                                              and window > self.judge[0] + cfg.judge_min_delta)
            if self.keep_now:
                self.keep_step = step
        if len(self.eos) > 1 and window_eos < self.eos[0] - cfg.max_eos_drop:
            p = proportion_drop_p(self.eos[0] * self.counts[0], self.counts[0], window_eos * n_w, n_w)
            if p <= 1 - cfg.eos_confidence:
                return (f"end-of-answer rate fell to {window_eos:.0%} ({n_w} answers of the last "
                        f"{len(self.eos[-w:])} steps) from {self.eos[0]:.0%} at step 1 "
                        f"({self.counts[0]} answers; one-sided p = {p:.3f})")
        if judge_score is not None and cfg.judge_patience and step - self.best_step >= cfg.judge_patience and fell:
            evidence = f"; now {self._window()[0]:.3f}, one-sided p = {p_fell:.3f}" if judge_sd is not None else ""
            return (f"the judge's score stopped improving: best {self.best:.3f} at step {self.best_step}, "
                    f"none better by {cfg.judge_min_delta} in {cfg.judge_patience} steps{evidence}")
        return None


# ----------------------------------------------------------------------------- sampling
def decode_responses(tokenizer, resp: torch.Tensor, rmask: torch.Tensor) -> list[str]:
    return [tokenizer.decode(r[m.bool()].tolist(), skip_special_tokens=True).strip() for r, m in zip(resp, rmask)]


def token_logprobs(model, lm_head, lower: Lower, P: int, resp: torch.Tensor, temperature: float,
                   with_entropy: bool = False):
    """Log-probs (at ``temperature``) of the response tokens, from the cached lower states.
    Position P-1+t predicts response token t.

    The vocabulary-wide tensors ([B, L, 49152] for SmolLM2) weigh in a PPO step on a CPU, so
    the temperature divides the hidden state before a bias-free LM head (the same logits / T)
    rather than the logits: 10% off the LM head's forward and backward here."""
    h = upper_forward(model, lower)
    L = resp.shape[1]
    h = h[:, P - 1:P - 1 + L]
    if getattr(lm_head, "bias", None) is None:
        logits = lm_head(h / temperature).float()
    else:
        logits = lm_head(h).float() / temperature
    logp_all = F.log_softmax(logits, -1)
    logp = logp_all.gather(-1, resp[..., None]).squeeze(-1)
    ent = None
    if with_entropy:  # logged only: no graph through it
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
    return logp, ent


def _lm_head(model):
    m = model.get_base_model() if hasattr(model, "get_base_model") else model
    return m.lm_head


def _lora_min_layer(cfg) -> int:
    layers = getattr(cfg, "layers_to_transform", None)
    if layers is None:
        return 0
    return min([layers] if isinstance(layers, int) else layers)


# ----------------------------------------------------------------------------- training
def end_of_answer_advantage(adv: torch.Tensor, mask: torch.Tensor, ended: torch.Tensor) -> float:
    """Mean advantage at the end-of-turn token of the rollouts that ended: the push PPO gives to
    ending an answer where it ended (negative: the policy learns to end less often)."""
    if not bool(ended.any()):
        return 0.0
    last = (mask.sum(-1) - 1).clamp(min=0).long()
    return float(adv[torch.arange(len(last)), last][ended].mean())


def _allreduce_grads(params, accelerator) -> None:
    if accelerator is None or accelerator.num_processes <= 1:
        return
    import torch.distributed as dist

    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= accelerator.num_processes


def truncation_scores(rm_scores: torch.Tensor, ended: torch.Tensor, cfg: PPOConfig,
                      penalty: float | None = None) -> torch.Tensor:
    """The score PPO maximises: the clipped RM score, minus ``penalty`` (default
    ``truncation_penalty``) for a response that never ended (scored as if it ended at the cap)."""
    score = rm_scores.clamp(-cfg.score_clip, cfg.score_clip)
    return torch.where(ended, score, score - (cfg.truncation_penalty if penalty is None else penalty))


def with_end_of_turn(ids, pmask, resp, rmask, ended, eot: int, pad_id: int):
    """Prompt + response + one more column holding end-of-turn for the rows that never ended
    (masked padding for the others), so the RM reads every row's score at an end-of-turn
    token, where it was trained to.  Causal attention keeps every earlier position as it was.
    Returns (full ids, full mask, index of each row's scored token)."""
    B = ids.shape[0]
    extra = torch.where(ended, torch.full((B,), pad_id, device=ids.device), torch.full((B,), eot, device=ids.device))
    full = torch.cat([ids, resp, extra[:, None]], 1)
    fmask = torch.cat([pmask, rmask, (~ended).long()[:, None]], 1)
    P, L = ids.shape[1], resp.shape[1]
    last = torch.where(ended, P + rmask.sum(-1) - 1, torch.full_like(ended, P + L, dtype=torch.long))
    return full, fmask, last


def scorer(rm, full: torch.Tensor, fmask: torch.Tensor, P: int, L: int, last: torch.Tensor, lower: Lower,
           feats: torch.Tensor | None = None):
    """(normalised scores [B], the features the feature design computed or None) of the rollouts
    by a reward model of either design; ``feats``: features of the same spec already computed."""
    if getattr(rm, "design", "lora") == "features":
        feats = feats if feats is not None else rm.rollout_features(full, fmask, P, L)
        return rm.rollout_scores(feats), feats
    # the RM scores on frozen states of the precision it was trained on (its ``frozen_dtype``)
    rm_lower = lower if rm.frozen_dtype == torch.float32 and lower.split <= rm.split else rm.lower(full, fmask)
    return rm.values(rm_lower, normalized=True).float()[torch.arange(len(last)), last], None


def critic_values(value, lower: Lower, feats: torch.Tensor | None, P: int, L: int) -> torch.Tensor:
    """[B, L] values before each response token, from the critic of either design."""
    if getattr(value, "design", "lora") == "features":
        return value.values(feats).float()
    return value.values(lower, normalized=False)[:, P - 1:P - 1 + L].float()


def train_ppo(policy, tok, rm: RewardModel, value: RewardModel, prompts: list[list[dict]], cfg: PPOConfig, *,
              stop_ids: set[int], eot_id: int, ref_model=None, log=None, should_stop=None, ptx_pairs=None,
              accelerator=None, sampler: Sampler | None = None, judge=None) -> PPOResult:
    """Runs ``cfg.steps`` PPO iterations on ``policy`` (a PEFT model whose adapter 'default'
    is trained in place) and ``value`` (the critic, trained in place) against the frozen
    ``rm``; returns the metrics.  ``ref_model`` is the frozen KL reference; None means the
    policy's own base with the adapter disabled (the SFT model, no second copy).
    ``should_stop()`` is polled between steps.  ``sampler`` draws the rollouts (``retrain.rollout``;
    None: the policy itself in torch, adapter merged); it must follow the policy's weights.  ``cfg.temperature`` and ``cfg.max_new_tokens``
    must be set (``retrain.job`` fills them from the app's settings).  ``judge``: the reward
    model PPO does not optimise; its score of each fresh rollout batch drives ``EarlyStop``."""
    from retrain.backbone import prompt_ids

    t0 = time.perf_counter()
    if cfg.temperature is None or cfg.max_new_tokens is None:
        raise ValueError("PPOConfig.temperature and max_new_tokens must be set (the app's settings)")
    dev = next(policy.parameters()).device
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    torch.manual_seed(cfg.seed + rank)
    rng = random.Random(cfg.seed)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + rank)
    if not prompts:
        raise ValueError("no rollout prompts")
    sampler = sampler or TorchSampler(policy)
    lm_head = _lm_head(policy)
    split = min([_lora_min_layer(policy.peft_config["default"])]
                + [m.split for m in (rm, value) if getattr(m, "design", "lora") == "lora"])
    if ref_model is not None:
        split = 0  # another model's layers: no shared lower stack with it
    pol_params = [p for p in policy.parameters() if p.requires_grad]
    val_params = value.parameters()
    opt = torch.optim.Adam([{"params": pol_params, "lr": cfg.lr}, {"params": val_params, "lr": cfg.value_lr}],
                           eps=cfg.adam_eps)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, (lambda s: max(0.05, 1 - s / max(1, cfg.steps))) if cfg.lr_decay else (lambda s: 1.0))
    kl_ctl = AdaptiveKL(cfg.beta, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl else None
    beta = cfg.beta

    group = max(1, cfg.group_size)
    if cfg.batch_size % group:
        raise ValueError(f"ppo.batch_size ({cfg.batch_size}) must be a multiple of ppo.group_size ({group})")
    n_prompts = cfg.batch_size // group
    enc_prompts = [prompt_ids(tok, p)[-cfg.max_prompt_length:] for p in prompts]
    ptx = []
    if cfg.ptx_coef > 0 and ptx_pairs:  # the chosen answer (or rewrite) closed by end-of-turn
        ptx = [(prompt_ids(tok, p.prompt)[-cfg.max_prompt_length:],
                (tok(p.chosen, add_special_tokens=False)["input_ids"] + [eot_id])[:cfg.max_new_tokens])
               for p in ptx_pairs if p.decisive]
    order: list[int] = []
    final: dict = {}
    steps_done = 0
    sample_s = 0.0
    stopper = EarlyStop(cfg)
    ending = EndingControl(cfg)
    stopped, stop_reason, best_state = "steps", "", None
    bar = tqdm(total=cfg.steps, desc="ppo", leave=False)
    for step in range(1, cfg.steps + 1):
        if should_stop and should_stop():
            stopped = "asked"
            break
        ts = time.perf_counter()
        # ---- rollouts --------------------------------------------------------------
        if len(order) < n_prompts * world:
            more = list(range(len(enc_prompts)))
            rng.shuffle(more)
            order += more
        batch_idx = [i for i in order[:n_prompts * world][rank::world] for _ in range(group)]
        del order[:n_prompts * world]
        ids, pmask, resp, rmask = (t.to(dev) for t in sampler.sample(
            [enc_prompts[i] for i in batch_idx], max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
            top_p=cfg.rollout_top_p, stop_ids=stop_ids, pad_id=tok.pad_token_id, generator=gen))
        t_gen = time.perf_counter() - ts
        sample_s += t_gen
        ended = torch.isin(resp, torch.tensor(sorted(stop_ids), device=resp.device)).any(-1)
        P, L = ids.shape[1], resp.shape[1]
        full, fmask, last = with_end_of_turn(ids, pmask, resp, rmask, ended, eot_id, tok.pad_token_id)
        rmaskf = rmask.float()
        with torch.no_grad():
            lower = lower_forward(policy, full, fmask, split)
            old_logp, _ = token_logprobs(policy, lm_head, lower, P, resp, cfg.temperature)
            if ref_model is None:
                with policy.disable_adapter():
                    ref_logp, _ = token_logprobs(policy, lm_head, lower, P, resp, cfg.temperature)
            else:
                ref_lower = lower_forward(ref_model, full, fmask, 0)
                ref_logp, _ = token_logprobs(ref_model, _lm_head(ref_model), ref_lower, P, resp, cfg.temperature)
            rm_scores, feats = scorer(rm, full, fmask, P, L, last, lower)
            old_values = critic_values(value, lower, feats, P, L) if group == 1 else None
            judge_scores = None
            if judge is not None:
                same = feats is not None and getattr(judge, "spec", None) == rm.spec \
                    and judge.frozen_dtype == rm.frozen_dtype
                judge_scores, _ = scorer(judge, full, fmask, P, L, last, lower, feats if same else None)
            js = truncation_scores(judge_scores, ended, cfg) if judge_scores is not None else None
            jm, eos_now = _global_means(None if js is None else js.mean(), ended.float().mean(), accelerator)
            penalty = ending.update(eos_now, len(batch_idx) * world)
            score = truncation_scores(rm_scores, ended, cfg, penalty)
            rewards, kl = kl_rewards(old_logp, ref_logp, rmaskf, score, beta)
            if group == 1:
                adv, returns = gae(rewards, old_values, rmaskf, cfg.gamma, cfg.lam)
            else:
                adv = loo_advantages(score, kl, rmaskf, beta, group)
            if cfg.whiten_advantages:
                adv = whiten(adv, rmaskf)
            eos_adv = end_of_answer_advantage(adv, rmaskf, ended)
        # ---- early stop: the judge's score and the end-of-answer rate of these fresh rollouts
        # answers to one prompt are one draw, for the judge's spread (rank 0's: every rank decides
        # alike) and the end-of-answer counts: some prompts run long whatever the policy
        n_eff, jsd = len(batch_idx) // group, None
        if js is not None:
            n_eff, jsd = group_mean_sd(js, group)
        why = stopper.update(step, jm, eos_now, n_eff * world, jsd)
        if stopper.keep_now and cfg.keep_best:  # the policy that sampled this batch, before its update
            best_state = {k: v.detach().clone() for k, v in policy.state_dict().items() if "lora_" in k}
        if why:
            stopped, stop_reason = ("eos" if why.startswith("end-of-answer") else "judge"), why
            if log:
                log("ppo", step, {"early_stop": 1.0, "judge_score": stopper.judge[-1] if stopper.judge else 0.0,
                                  "eos_rate": float(ended.float().mean())})
            break
        # ---- PPO epochs --------------------------------------------------------------
        stats = {"pg_loss": [], "vf_loss": [], "clipfrac": [], "approx_kl": [], "entropy": [], "ptx_loss": []}
        n = len(batch_idx)
        for _epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=gen).tolist()
            for j in range(0, n, cfg.minibatch_size):
                mb = perm[j:j + cfg.minibatch_size]
                sub = Lower(h=lower.h[mb], mask=lower.mask[mb], split=lower.split)
                logp, ent = token_logprobs(policy, lm_head, sub, P, resp[mb], cfg.temperature,
                                           with_entropy=_epoch == 0)  # logged: once per rollout is enough
                m = rmaskf[mb]
                pg, clipfrac, approx_kl = policy_loss(logp, old_logp[mb], adv[mb], m, cfg.cliprange)
                if group == 1:
                    vpred = critic_values(value, sub, feats[mb] if feats is not None else None, P, L)
                    vf = value_loss(vpred, old_values[mb], returns[mb], m, cfg.cliprange_value)
                else:  # RLOO: no critic
                    vf = torch.zeros((), device=dev)
                loss = pg + cfg.vf_coef * vf
                if ptx:
                    pi, ri = ptx[rng.randrange(len(ptx))]
                    x = torch.tensor([pi + ri], device=dev)
                    lo = lower_forward(policy, x, torch.ones_like(x), split)
                    lg = lm_head(upper_forward(policy, lo)[:, len(pi) - 1:-1]).float()
                    ptx_loss = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), torch.tensor(ri, device=dev))
                    loss = loss + cfg.ptx_coef * ptx_loss
                    stats["ptx_loss"].append(float(ptx_loss.detach()))
                opt.zero_grad(set_to_none=True)
                if accelerator is not None:
                    accelerator.backward(loss)
                else:
                    loss.backward()
                _allreduce_grads(pol_params + val_params, accelerator)
                torch.nn.utils.clip_grad_norm_(pol_params + val_params, cfg.grad_clip)
                opt.step()
                stats["pg_loss"].append(float(pg.detach()))
                stats["vf_loss"].append(float(vf.detach()))
                stats["clipfrac"].append(float(clipfrac))
                stats["approx_kl"].append(float(approx_kl))
                if ent is not None:
                    stats["entropy"].append(float(masked_mean(ent, m)))
        sched.step()
        mean_kl = float(kl.sum(-1).mean())
        if kl_ctl is not None:
            kl_ctl.update(mean_kl, n * world)
            beta = kl_ctl.beta
        early = adv[:, :4]
        final = {
            "score": float(score.mean()), "rm_score": float(rm_scores.mean()), "kl": mean_kl, "beta": beta,
            "entropy": _mean(stats["entropy"]), "clipfrac": _mean(stats["clipfrac"]),
            "approx_kl": _mean(stats["approx_kl"]), "pg_loss": _mean(stats["pg_loss"]),
            "value_loss": _mean(stats["vf_loss"]), "response_length": float(rmask.sum(-1).float().mean()),
            "eos_rate": float(ended.float().mean()),
            "eos_advantage": eos_adv, "truncation_penalty": penalty,
            "value_first": float(old_values[:, 0].mean()) if old_values is not None else 0.0,
            "early_adv_score_corr": float(torch.corrcoef(torch.stack([early[:, 0], score]))[0, 1])
            if n > 2 else float("nan"),
            "gen_s": t_gen, "step_s": time.perf_counter() - ts,
        }
        if judge_scores is not None:
            final["judge_score"] = float(judge_scores.mean())
            final["judge_best"] = stopper.best
        if stats["ptx_loss"]:
            final["ptx_loss"] = _mean(stats["ptx_loss"])
        final = {k: (v if not (isinstance(v, float) and math.isnan(v)) else 0.0) for k, v in final.items()}
        steps_done = step
        if log:
            log("ppo", step, final)
        bar.update(1)
        bar.set_postfix(score=f"{final['score']:.2f}", kl=f"{mean_kl:.2f}", len=f"{final['response_length']:.0f}")
    bar.close()
    kept = 0
    if cfg.keep_best and best_state is not None and stopper.keep_step <= steps_done:
        kept = stopper.keep_step  # the policy before update ``kept``: 1 means the one PPO started from
        policy.load_state_dict(best_state, strict=False)
    final = {**final, "kept_step": kept, "stopped": stopped}
    return PPOResult(steps=steps_done, final=final, wall_s=time.perf_counter() - t0, sample_s=sample_s,
                     sampler=getattr(sampler, "name", type(sampler).__name__), stopped=stopped,
                     stop_reason=stop_reason, kept_step=kept)


def _global_means(judge_mean, eos_mean, accelerator) -> tuple[float | None, float]:
    """The judge's mean score and the end-of-answer rate over every process's rollouts."""
    if accelerator is None or accelerator.num_processes <= 1:
        return (None if judge_mean is None else float(judge_mean)), float(eos_mean)
    import torch.distributed as dist

    t = torch.stack([torch.as_tensor(0.0 if judge_mean is None else float(judge_mean)),
                     torch.as_tensor(float(eos_mean))]).to(accelerator.device)
    dist.all_reduce(t)
    t = (t / accelerator.num_processes).tolist()
    return (None if judge_mean is None else t[0]), t[1]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")
