"""Reward model: the SFT backbone with a scalar head, trained on every kind of judgement.

Losses (``docs/rlhf.md`` has the derivations and hand-computed values):
- pairs, tie-aware Bradley-Terry: binary cross-entropy of ``sigmoid(r_chosen - r_rejected)``
  against the pair's label, 1 for a preference and 0.5 for a tie
  (``preference_loss``); a tie is minimised when both answers score the same;
- unpaired labels (thumbs, "both bad"), KTO-style: a logistic term on the score itself,
  ``-log sigmoid(r)`` for a good answer and ``-log sigmoid(-r)`` for a bad one
  (``pointwise_loss``), weighted by ``unpaired_coef``;
- each item carries its weight (rewrites and reasoned thumbs count more, ``retrain.data``).

Design (what makes it affordable on two CPU cores): only the top ``train_layers`` layers
are adapted; the frozen layers below are computed once per sequence and shared
(``retrain.backbone.StateCache``) by both cross-fitted reward models, their evaluation and
the normalisation.  The score is read at the response's end-of-turn token.

Normalisation: mean 0 / std 1 on samples of the reference (SFT) policy, the answers it gave
in the log (``Snapshot.reference``); on a cold start without any, the training answers.

This module trains and evaluates models it is given; ``retrain.job`` loads and saves them.
Artifact directory (``RewardModel.save``): ``reward_config.json``, ``adapter/`` (PEFT LoRA on
the SFT base) or ``layers.safetensors``, ``head.safetensors``, ``normalization.json``, tokenizer.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from assistant import models
from retrain.backbone import (
    Lower,
    StateCache,
    decoder_of,
    encode,
    frozen_dtype,
    lower_forward,
    pad_hidden_left,
    pad_left,
    upper_forward,
)
from retrain.data import Pair, Point

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n (z = 1.96: two-sided 95%; 1.645: the lower
    bound is a one-sided 95% bound)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n))) / den
    return max(0.0, centre - half), min(1.0, centre + half)


# ----------------------------------------------------------------------------- losses
def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


def preference_loss(chosen: torch.Tensor, rejected: torch.Tensor, label: torch.Tensor,
                    weight: torch.Tensor | None = None, margin: float = 0.0) -> torch.Tensor:
    """Tie-aware Bradley-Terry: weighted mean of
    ``-[y log sigmoid(d) + (1 - y) log sigmoid(-d)]`` with ``d = r_chosen - r_rejected`` and
    ``y`` the label (1 preferred, 0.5 tie).  The margin applies to decisive pairs only."""
    d = chosen - rejected - margin * (label != 0.5).to(chosen.dtype)
    per = -(label * F.logsigmoid(d) + (1 - label) * F.logsigmoid(-d))
    w = torch.ones_like(per) if weight is None else weight
    return (per * w).sum() / w.sum().clamp(min=1e-8)


def pointwise_loss(score: torch.Tensor, label: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Unpaired labels on the score itself: weighted mean of
    ``-[y log sigmoid(r) + (1 - y) log sigmoid(-r)]`` (y = 1 good, 0 bad)."""
    per = -(label * F.logsigmoid(score) + (1 - label) * F.logsigmoid(-score))
    w = torch.ones_like(per) if weight is None else weight
    return (per * w).sum() / w.sum().clamp(min=1e-8)


# ----------------------------------------------------------------------------- config / metrics
@dataclass
class RewardConfig:
    design: str = "features"
    """``features``: an ensemble of heads on pooled frozen SFT features (``retrain.head_rm``),
    chosen by the curve in docs/rlhf.md §2; ``lora``: LoRA (or full fine-tuning) of the top
    layers with a scalar head read at the end-of-turn token (this module)."""
    feature_layers: str = "2,4,6,8,12,16,20,24"
    """``features``: the decoder layers whose states are mean-pooled over the answer."""
    feature_last: bool = False
    """``features``: add the top pooled layer's state at the end-of-turn token."""
    feature_length: bool = True
    """``features``: add log(1 + answer tokens)."""
    feature_prompt: str = "auto"
    """``features``: whether the heads also read the prompt-answer interaction (the centred
    product of the prompt's and the answer's pooled states, per layer, and their cosine), for
    tastes about how an answer relates to its question.  ``auto``: train the ensemble both ways
    and keep the one that validates better on the inner folds (docs/rlhf.md §2); ``on``; ``off``."""
    head: str = "linear"
    """``features``: each member is ``linear`` or ``mlp`` (one hidden layer of ``head_hidden``)."""
    head_hidden: int = 64
    """``features``: hidden units of an ``mlp`` member."""
    ensemble: int = 5
    """``features``: members; member m early-stops on inner fold m and trains on the rest."""
    head_max_steps: int = 2000
    """``features``: most full-batch optimiser steps per member."""
    head_patience: int = 100
    """``features``: steps without a better validation loss before a member stops; the best
    state is kept."""
    val_fraction: float = 0.2
    """``lora``: the inner validation split of the training data (by prompt) for early stopping."""
    eval_every: int = 4
    """``lora``: optimiser steps between validation evaluations."""
    lora_patience: int = 6
    """``lora``: evaluations without a better validation loss before training stops."""
    lora: bool = True
    """LoRA on the top layers (True) or full fine-tuning of them (False)."""
    train_layers: int = 4
    """Top decoder layers adapted; the ones below stay frozen at SFT and are cached."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA alpha (scale alpha / r)."""
    lora_dropout: float = 0.0
    """LoRA dropout: off, as everywhere in RLHF."""
    lr: float = 5e-4
    """Learning rate of the adapted layers (full fine-tuning: use ~1e-5)."""
    head_lr: float = 1e-3
    """Learning rate of the scalar head (``lora``) or of every member (``features``)."""
    epochs: int = 8
    """``lora``: most passes over the training items (early stopping usually ends sooner)."""
    batch_size: int = 8
    """Pairs per step (2x sequences), plus as many unpaired items."""
    max_length: int = 384
    """Tokens of prompt + response (cut from the left, the scored last token always stays)."""
    margin: float = 0.0
    """Optional Bradley-Terry margin on decisive pairs."""
    unpaired_coef: float = 0.5
    """Weight of the unpaired (thumbs, both-bad) loss beside the pairwise loss."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip."""
    seed: int = 0
    """Shuffling and head initialisation."""
    lower_batch: int = 8
    """Sequences per no-grad forward of the frozen layers."""
    max_ref_samples: int = 256
    """Reference answers used for the normalisation (a random subset)."""
    frozen_dtype: str = "auto"
    """Precision of the frozen layers' forward, whose states every reward-model step reuses:
    ``auto`` is bf16 where the device computes it natively (AVX-512 BF16 / AMX CPUs, CUDA) and
    fp32 elsewhere; ``float32``; ``bfloat16``.  Kept with the model, which scores the same way."""

    def feature_spec(self):
        from retrain.features import FeatureSpec

        layers = tuple(int(x) for x in str(self.feature_layers).split(",") if x.strip())
        if not layers:
            raise ValueError("reward.feature_layers: name at least one layer, e.g. 8,16,24")
        if self.feature_prompt not in ("auto", "on", "off"):
            raise ValueError(f"reward.feature_prompt: auto, on or off, not {self.feature_prompt!r}")
        return FeatureSpec(layers=layers, last=self.feature_last, length=self.feature_length,
                           prompt=self.feature_prompt != "off")


@dataclass
class RewardMetrics:
    """What one reward model's training reports (``rm/...`` in the run's metrics)."""

    n_pairs: int = 0
    n_ties: int = 0
    n_points: int = 0
    first_loss: float = float("nan")
    train_loss: float = float("nan")
    wall_s: float = 0.0
    losses: list = field(default_factory=list)
    norm: dict = field(default_factory=dict)  # normalisation (set by ``normalize``'s caller)
    steps: int = 0  # optimiser steps taken
    best_step: int = 0  # the step whose state was kept (best validation loss)
    stopped: str = ""  # "early" | "max_steps" | "no_validation"
    val_curve: list = field(default_factory=list)  # [step, validation loss, validation accuracy]


# ----------------------------------------------------------------------------- the model
class RewardModel:
    """A scalar-head model over the SFT backbone; ``score`` gives one number per response."""

    design = "lora"
    state_cache: StateCache | None = None  # the frozen states it evaluates from (``pair_margins``)

    def __init__(self, model, head: torch.nn.Linear, tokenizer, split: int, *, norm_mean: float = 0.0,
                 norm_std: float = 1.0, max_length: int = 384, base: str = "", lora: bool = True,
                 frozen_dtype: torch.dtype = torch.float32):
        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.split, self.norm_mean, self.norm_std = split, norm_mean, norm_std
        self.max_length, self.base, self.lora = max_length, base, lora
        self.frozen_dtype = frozen_dtype  # the frozen layers' precision, in training and scoring

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def parameters(self):
        return [p for p in list(self.model.parameters()) + list(self.head.parameters()) if p.requires_grad]

    def values(self, lower: Lower, normalized: bool = True) -> torch.Tensor:
        """Per-position scores [B, T] from cached lower hidden states."""
        h = upper_forward(self.model, lower, max(self.split, lower.split))
        v = self.head(h).squeeze(-1)
        return (v - self.norm_mean) / self.norm_std if normalized else v

    def lower(self, ids: torch.Tensor, mask: torch.Tensor) -> Lower:
        return lower_forward(self.model, ids.to(self.device), mask.to(self.device), self.split, self.frozen_dtype)

    def encode(self, prompt: list[dict], response: str) -> list[int]:
        return encode(self.tokenizer, prompt, response, self.max_length)

    def cache(self, batch: int = 8) -> StateCache:
        """A frozen-state cache valid for this model (and any other with the same split)."""
        return StateCache(self.split, self.tokenizer.pad_token_id, batch, self.frozen_dtype)

    def scores_of(self, states: list[torch.Tensor], normalized: bool = False, batch: int = 16) -> torch.Tensor:
        """Scores of sequences given their cached frozen states (no grad)."""
        out = []
        with torch.no_grad():
            for j in range(0, len(states), batch):
                out.append(self.values(pad_hidden_left(states[j:j + batch], self.split), normalized)[:, -1]
                           .float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str], normalized: bool = True,
              batch_size: int = 8) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), batch_size):
            seqs = [self.encode(p, r) for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
            ids, mask = pad_left(seqs, self.tokenizer.pad_token_id)
            out.append(self.values(self.lower(ids, mask), normalized)[:, -1].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def pair_margins(self, pairs: list[Pair]) -> torch.Tensor:
        self.state_cache = self.state_cache or self.cache()
        return pair_margins(self, pairs, self.state_cache)

    def point_scores(self, points: list[Point]) -> torch.Tensor:
        self.state_cache = self.state_cache or self.cache()
        return point_scores(self, points, self.state_cache)

    def as_value_model(self) -> RewardModel:
        """A trainable copy to serve as PPO's critic: the normalisation folded into the head so
        that values start in normalised reward units (the recipe's critic-from-RM)."""
        value = copy.deepcopy(self)
        with torch.no_grad():
            value.head.weight /= value.norm_std
            value.head.bias.sub_(value.norm_mean).div_(value.norm_std)
        value.norm_mean, value.norm_std = 0.0, 1.0
        value.head.requires_grad_(True)
        if value.lora:
            for name, p in value.model.named_parameters():
                p.requires_grad_("lora_" in name)
        else:
            dec = decoder_of(value.model)
            for i in range(value.split, len(dec.layers)):
                dec.layers[i].requires_grad_(True)
        return value

    # -- persistence ------------------------------------------------------------------
    def save(self, out_dir: str, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if self.lora:
            self.model.peft_config["default"].base_model_name_or_path = self.base
            self.model.save_pretrained(out / "adapter")
        else:
            dec = decoder_of(self.model)
            state = {f"layers.{i}.{k}": v.detach().cpu().contiguous()
                     for i in range(self.split, len(dec.layers))
                     for k, v in dec.layers[i].state_dict().items()}
            state["norm.weight"] = dec.norm.weight.detach().cpu().contiguous()
            save_file(state, str(out / "layers.safetensors"))
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()},
                  str(out / "head.safetensors"))
        norm = {"mean": self.norm_mean, "std": self.norm_std}
        (out / "normalization.json").write_text(json.dumps(norm, indent=2))
        cfg = {"base": self.base, "split": self.split, "lora": self.lora, "max_length": self.max_length,
               "hidden_size": self.head.in_features, "norm_mean": self.norm_mean, "norm_std": self.norm_std,
               "frozen_dtype": str(self.frozen_dtype).removeprefix("torch.")}
        cfg.update(extra or {})
        (out / "reward_config.json").write_text(json.dumps(cfg, indent=2, default=str))
        self.tokenizer.save_pretrained(out)

    @classmethod
    def load(cls, path: str, device: str = "cpu", trainable: bool = False) -> RewardModel:
        from safetensors.torch import load_file

        path = str(path)
        cfg = json.loads(Path(path, "reward_config.json").read_text())
        loaded = models.load(cfg["base"], Path(cfg["base"]).parent, device=device, dtype="float32")
        base = loaded.model
        base.config.use_cache = False
        if cfg.get("lora", True):
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(Path(path, "adapter")), is_trainable=trainable)
        else:
            model = base
            dec = decoder_of(model)
            state = load_file(str(Path(path, "layers.safetensors")))
            dec.load_state_dict(state, strict=False)
            for p in model.parameters():
                p.requires_grad_(False)
            if trainable:
                for i in range(cfg["split"], len(dec.layers)):
                    dec.layers[i].requires_grad_(True)
        model.eval()
        head = torch.nn.Linear(cfg["hidden_size"], 1)
        head.load_state_dict(load_file(str(Path(path, "head.safetensors"))))
        head.to(models.pick_device(device)).requires_grad_(trainable)
        tok = models.load_tokenizer(path)
        return cls(model, head, tok, cfg["split"], norm_mean=cfg["norm_mean"], norm_std=cfg["norm_std"],
                   max_length=cfg.get("max_length", 384), base=cfg["base"], lora=cfg.get("lora", True),
                   frozen_dtype=frozen_dtype(cfg.get("frozen_dtype", "float32"), head.weight.device))


def load_reward_model(path: str, device: str = "cpu", model=None):
    """A saved reward model of either design (``reward_config.json`` says which); ``model``: an
    SFT model already loaded, which a feature model shares."""
    cfg = json.loads(Path(path, "reward_config.json").read_text())
    if cfg.get("design", "lora") == "features":
        from retrain.head_rm import FeatureRewardModel

        return FeatureRewardModel.load(path, device=device, model=model)
    return RewardModel.load(path, device=device)


def new_reward_model(sft_path: str, cfg: RewardConfig, init_from: str | None, device: str) -> RewardModel:
    if init_from and Path(init_from, "reward_config.json").exists():
        prev = json.loads(Path(init_from, "reward_config.json").read_text())
        if prev.get("design", "lora") == "lora" and prev.get("lora", True) == cfg.lora and os.path.realpath(prev["base"]) == os.path.realpath(sft_path):
            rm = RewardModel.load(init_from, device=device, trainable=True)
            rm.norm_mean, rm.norm_std = 0.0, 1.0  # re-normalised after training
            rm.frozen_dtype = frozen_dtype(cfg.frozen_dtype, rm.device)
            return rm
    loaded = models.load(sft_path, Path(sft_path).parent, device=device, dtype="float32")
    base = loaded.model
    base.config.use_cache = False
    n = len(decoder_of(base).layers)
    k = max(1, min(cfg.train_layers, n))
    split = n - k
    for p in base.parameters():
        p.requires_grad_(False)
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                          target_modules=LORA_TARGETS, layers_to_transform=list(range(split, n)), bias="none")
        model = get_peft_model(base, lcfg)
    else:
        model = base
        for i in range(split, n):
            decoder_of(model).layers[i].requires_grad_(True)
        decoder_of(model).norm.requires_grad_(True)
    model.eval()  # dropout off
    hidden = base.config.hidden_size
    head = torch.nn.Linear(hidden, 1)
    torch.nn.init.normal_(head.weight, std=1 / math.sqrt(hidden + 1))
    torch.nn.init.zeros_(head.bias)
    head.to(models.pick_device(device))
    return RewardModel(model, head, loaded.tokenizer, split, max_length=cfg.max_length, base=str(sft_path),
                       lora=cfg.lora, frozen_dtype=frozen_dtype(cfg.frozen_dtype, head.weight.device))


def _items(pairs: list[Pair], points: list[Point], cfg: RewardConfig, rng: random.Random) -> list[list]:
    """Shuffled batches, each holding up to ``batch_size`` pairs and as many points."""
    p_order, q_order = list(range(len(pairs))), list(range(len(points)))
    rng.shuffle(p_order)
    rng.shuffle(q_order)
    n = max(math.ceil(len(pairs) / cfg.batch_size), math.ceil(len(points) / cfg.batch_size), 1)
    return [[p_order[j * cfg.batch_size:(j + 1) * cfg.batch_size], q_order[j * cfg.batch_size:(j + 1) * cfg.batch_size]]
            for j in range(n)]


def _val_split(keys: list[str], fraction: float) -> list[bool]:
    from retrain.head_rm import inner_fold

    return [inner_fold(k, 1000) < fraction * 1000 for k in keys]


def _batch_loss(rm: RewardModel, pairs, points, p_idx, q_idx, h_pairs, h_points, cfg: RewardConfig):
    """The loss of one batch (pairs ``p_idx``, points ``q_idx``) and its decisive accuracy."""
    states = [h_pairs[2 * i] for i in p_idx] + [h_pairs[2 * i + 1] for i in p_idx] + [h_points[i] for i in q_idx]
    r = rm.values(pad_hidden_left(states, rm.split), normalized=False)[:, -1]
    n = len(p_idx)
    loss = r.new_zeros(())
    metrics = {}
    if n:
        label = torch.tensor([pairs[i].label for i in p_idx], dtype=r.dtype)
        weight = torch.tensor([pairs[i].weight for i in p_idx], dtype=r.dtype)
        rc, rr = r[:n], r[n:2 * n]
        loss = loss + preference_loss(rc, rr, label, weight, cfg.margin)
        decisive = label != 0.5
        if decisive.any():
            metrics["accuracy"] = float((rc > rr)[decisive].float().mean())
    if q_idx:
        label = torch.tensor([points[i].label for i in q_idx], dtype=r.dtype)
        weight = torch.tensor([points[i].weight for i in q_idx], dtype=r.dtype)
        loss = loss + cfg.unpaired_coef * pointwise_loss(r[2 * n:], label, weight)
    return loss, metrics


def train_reward_model(rm: RewardModel, pairs: list[Pair], points: list[Point], cfg: RewardConfig, *,
                       cache: StateCache | None = None, log=None, phase: str = "rm") -> RewardMetrics:
    """Trains ``rm`` in place on ``pairs`` (tie-aware) and ``points`` (unpaired labels) for at
    most ``cfg.epochs`` passes, early-stopped on an inner validation split (``val_fraction`` of
    the prompts): every ``eval_every`` steps the validation loss is measured, training ends after
    ``lora_patience`` evaluations without improvement, and the best state is kept.  Returns the
    training metrics.  Logs ``{phase}/loss``-style metrics per step."""
    from retrain.data import _key

    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if not pairs and not points:
        raise ValueError("no training data for the reward model")
    cache = cache or rm.cache(cfg.lower_batch)
    h_pairs = cache.get(rm.model, [s for p in pairs for s in (rm.encode(p.prompt, p.chosen),
                                                               rm.encode(p.prompt, p.rejected))], f"{phase}: pairs")
    h_points = cache.get(rm.model, [rm.encode(q.prompt, q.answer) for q in points], f"{phase}: labels")
    p_val = _val_split([_key(p.prompt) for p in pairs], cfg.val_fraction)
    q_val = _val_split([_key(q.prompt) for q in points], cfg.val_fraction)
    if all(p_val) and all(q_val):  # everything fell in the validation split: train on it all
        p_val, q_val = [False] * len(pairs), [False] * len(points)
    val_p = [i for i, v in enumerate(p_val) if v]
    val_q = [i for i, v in enumerate(q_val) if v]
    tr_pairs = [p for p, v in zip(pairs, p_val) if not v]
    tr_points = [q for q, v in zip(points, q_val) if not v]
    tr_hp = [h for i, p in enumerate(pairs) if not p_val[i] for h in (h_pairs[2 * i], h_pairs[2 * i + 1])]
    tr_hq = [h_points[i] for i, v in enumerate(q_val) if not v]
    lora_params = [p for p in rm.model.parameters() if p.requires_grad]
    head_params = list(rm.head.parameters())
    trainable = lora_params + head_params
    opt = torch.optim.AdamW([{"params": lora_params, "lr": cfg.lr}, {"params": head_params, "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay, eps=1e-8)
    steps_per_epoch = len(_items(tr_pairs, tr_points, cfg, random.Random(0)))
    total = max(1, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))

    def val_loss() -> tuple[float, float]:
        with torch.no_grad():
            loss, acc, n = 0.0, [], 0
            for j in range(0, max(len(val_p), len(val_q)), cfg.batch_size):
                pi, qi = val_p[j:j + cfg.batch_size], val_q[j:j + cfg.batch_size]
                lo, m = _batch_loss(rm, pairs, points, pi, qi, h_pairs, h_points, cfg)
                loss += float(lo) * (len(pi) + len(qi))
                n += len(pi) + len(qi)
                if "accuracy" in m:
                    acc.append(m["accuracy"])
            return loss / max(1, n), (sum(acc) / len(acc) if acc else float("nan"))

    has_val = bool(val_p or val_q)
    best, best_step, best_state, bad = math.inf, 0, None, 0
    val_curve: list = []
    losses: list[float] = []
    step, stopped = 0, "max_steps" if has_val else "no_validation"
    bar = tqdm(total=total, desc=phase, leave=False)
    for _epoch in range(cfg.epochs):
        for p_idx, q_idx in _items(tr_pairs, tr_points, cfg, rng):
            loss, metrics = _batch_loss(rm, tr_pairs, tr_points, p_idx, q_idx, tr_hp, tr_hq, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            losses.append(loss.item())
            if has_val and (step % cfg.eval_every == 0 or step == total):
                vl, va = val_loss()
                val_curve.append([step, round(vl, 5), round(va, 4)])
                metrics.update(val_loss=vl, val_accuracy=va)
                if vl < best - 1e-5:
                    best, best_step, bad = vl, step, 0
                    best_state = [p.detach().clone() for p in trainable]
                else:
                    bad += 1
            if log:
                log(phase, step, {"loss": losses[-1], **metrics})
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            if has_val and bad >= cfg.lora_patience:
                stopped = "early"
                break
        if stopped == "early":
            break
    bar.close()
    if best_state is not None:
        with torch.no_grad():
            for p, b in zip(trainable, best_state):
                p.copy_(b)
    last = losses[-max(1, steps_per_epoch):]
    return RewardMetrics(n_pairs=len(pairs), n_ties=sum(not p.decisive for p in pairs), n_points=len(points),
                         first_loss=losses[0], train_loss=sum(last) / len(last), wall_s=time.perf_counter() - t0,
                         losses=losses, steps=step, best_step=best_step if has_val else step, stopped=stopped,
                         val_curve=val_curve)


def normalize(rm: RewardModel, samples: list[tuple[list[dict], str]], cache: StateCache, max_samples: int = 256,
              seed: int = 0) -> dict:
    """Sets ``rm``'s normalisation to mean 0 / std 1 over ``samples`` (prompt, answer)."""
    if len(samples) > max_samples:
        samples = random.Random(seed).sample(samples, max_samples)
    raw = rm.scores_of(cache.get(rm.model, [rm.encode(p, a) for p, a in samples], "rm: reference samples"))
    rm.norm_mean = float(raw.mean()) if len(raw) else 0.0
    rm.norm_std = max(float(raw.std()) if len(raw) > 1 else 1.0, 1e-6)
    return {"norm_mean": rm.norm_mean, "norm_std": rm.norm_std, "norm_samples": len(samples)}


def pair_margins(rm: RewardModel, pairs: list[Pair], cache: StateCache) -> torch.Tensor:
    """Normalised ``r_chosen - r_rejected`` of each pair."""
    if not pairs:
        return torch.zeros(0)
    states = cache.get(rm.model, [s for p in pairs for s in (rm.encode(p.prompt, p.chosen),
                                                              rm.encode(p.prompt, p.rejected))], "rm: evaluation")
    s = rm.scores_of(states)
    return (s[0::2] - s[1::2]) / rm.norm_std



def point_scores(rm: RewardModel, points: list[Point], cache: StateCache) -> torch.Tensor:
    """Normalised score of each unpaired label's answer (0: a typical reference answer)."""
    if not points:
        return torch.zeros(0)
    s = rm.scores_of(cache.get(rm.model, [rm.encode(q.prompt, q.answer) for q in points], "rm: label scores"))
    return (s - rm.norm_mean) / rm.norm_std

def accuracy_of(margins: torch.Tensor, pairs: list[Pair], z: float = 1.96) -> dict:
    """Pairwise accuracy over the decisive pairs (a zero margin counts half), with its Wilson
    interval, and the mean |margin| over ties (how close the model keeps tied answers)."""
    dec = [i for i, p in enumerate(pairs) if p.decisive]
    ties = [i for i, p in enumerate(pairs) if not p.decisive]
    m = margins[dec] if dec else torch.zeros(0)
    wins = float((m > 0).sum() + 0.5 * (m == 0).sum())
    lo, hi = wilson(wins, len(dec), z)
    return {"accuracy": wins / len(dec) if dec else float("nan"), "ci_low": lo, "ci_high": hi, "n": len(dec),
            "margin": float(m.mean()) if dec else float("nan"),
            "tie_gap": float(margins[ties].abs().mean()) if ties else float("nan"), "n_ties": len(ties)}
