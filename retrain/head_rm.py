"""The feature reward model: an ensemble of small heads on frozen SFT features.

Why (measured in ``benchmarks/reward_curve.py``, table in ``docs/rlhf.md`` §2): with a few
hundred judgements, a LoRA reward model on the top layers memorises its pairs (training loss
0.3, test accuracy 0.58 on a style taste), while a head on pooled frozen hidden states
generalises from 64 pairs.  The representation the SFT model already has is the prior; the
head only picks a direction in it.

- **Features** (``retrain.features``): pooled hidden states of the frozen SFT model over the
  answer, standardised with the training answers' mean and std (kept with the model).
- **A member** is a linear head (or a one-hidden-layer MLP, ``head="mlp"``), trained full-batch
  with Adam from zero on the same losses as the LoRA model (``retrain.reward``: tie-aware
  Bradley-Terry for pairs, the pointwise term for unpaired labels, per-item weights), for at
  most ``head_max_steps`` steps, **early-stopped on an inner validation split** of its training
  data: training ends when the validation loss has not improved for ``head_patience`` steps,
  and the best state is kept.  Steps and the validation curve are returned.
- **The ensemble** has ``ensemble`` members; member m validates on inner fold m (a stable hash
  of the prompt) and trains on the others, so every item is used for training by all but one
  member and for stopping by one: no fixed share of the data is set aside (Coste et al. 2024
  for ensembles against over-optimisation).  The score is the members' mean.
- The score is normalised to mean 0 / std 1 on the reference model's answers, as before.

PPO's critic starts as this model: a trainable copy of the heads reading the features of every
prefix of the answer (``prefix_features``), whose value at the end-of-turn token *is* the
reward model's score (``as_value_model``).

Artifact directory (``save``): ``reward_config.json`` (``design: "features"``, the feature spec,
normalisation, precision, the SFT base), ``heads.safetensors`` (members and the feature
standardisation), tokenizer.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from retrain.features import FeatureCache, FeatureSpec, layer_states, prefix_features


# ----------------------------------------------------------------------------- heads
class Head(torch.nn.Module):
    """One member: linear, or a one-hidden-layer MLP, on standardised features -> a score."""

    def __init__(self, dim: int, kind: str = "linear", hidden: int = 64):
        super().__init__()
        if kind not in ("linear", "mlp"):
            raise ValueError(f"head must be linear or mlp, not {kind!r}")
        self.kind = kind
        if kind == "linear":
            self.net = torch.nn.Linear(dim, 1)
            torch.nn.init.zeros_(self.net.weight)
            torch.nn.init.zeros_(self.net.bias)
        else:
            self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
            torch.nn.init.zeros_(self.net[2].weight)
            torch.nn.init.zeros_(self.net[2].bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


class Expand(torch.nn.Module):
    """The heads' input from a feature vector whose spec has ``prompt``: the answer's part, and,
    with ``interact``, the prompt-answer interaction per pooled layer: the elementwise product of
    the centred answer and prompt means, and their cosine.  A linear head on these scores
    ``sum_k w_k (p_k - c_k)(a_k - c'_k)``, an answer direction that depends on the question.
    Without ``prompt`` in the spec it passes the vector through."""

    def __init__(self, answer_dim: int, layers: int = 0, hidden: int = 0, interact: bool = False):
        super().__init__()
        self.answer_dim, self.layers, self.hidden = answer_dim, layers, hidden
        self.interact = bool(interact and layers)
        # answer, prompt; saved only when used, so models saved before the interaction still load
        self.register_buffer("center", torch.zeros(2, layers * hidden), persistent=self.interact)

    @property
    def out_dim(self) -> int:
        return self.answer_dim + (self.layers * self.hidden + self.layers if self.interact else 0)

    def fit(self, x: torch.Tensor) -> Expand:
        """Centres from the training answers' features."""
        if self.interact and len(x):
            self.center = torch.stack([x[:, :self.layers * self.hidden].mean(0), x[:, -self.layers * self.hidden:].mean(0)])
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = x[..., :self.answer_dim]
        if not self.interact:
            return base
        n = self.layers * self.hidden
        a, p = x[..., :n], x[..., -n:]
        shape = (*x.shape[:-1], self.layers, self.hidden)
        cos = torch.nn.functional.cosine_similarity(a.reshape(shape), p.reshape(shape), dim=-1)
        return torch.cat([base, (a - self.center[0]) * (p - self.center[1]), cos], -1)


class Ensemble(torch.nn.Module):
    """Expand, standardise, then the mean of the members' scores."""

    def __init__(self, members: list[Head], mean: torch.Tensor, std: torch.Tensor, expand: Expand | None = None):
        super().__init__()
        self.members = torch.nn.ModuleList(members)
        self.expand = expand if expand is not None else Expand(mean.shape[-1])
        self.register_buffer("mean", mean.float())
        self.register_buffer("std", std.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = (self.expand(x) - self.mean) / self.std
        return torch.stack([m(z) for m in self.members]).mean(0)


# ----------------------------------------------------------------------------- training
@dataclass
class HeadData:
    """Features of the training items: pairs (chosen, rejected, label, weight), unpaired points
    (features, label, weight), and each item's inner fold key."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    label: torch.Tensor
    weight: torch.Tensor
    points: torch.Tensor
    point_label: torch.Tensor
    point_weight: torch.Tensor
    pair_keys: list[str] = field(default_factory=list)
    point_keys: list[str] = field(default_factory=list)

    def subset(self, pairs: torch.Tensor, points: torch.Tensor) -> HeadData:
        return HeadData(self.chosen[pairs], self.rejected[pairs], self.label[pairs], self.weight[pairs],
                        self.points[points], self.point_label[points], self.point_weight[points])

    def all_features(self) -> torch.Tensor:
        return torch.cat([self.chosen, self.rejected, self.points])


def inner_fold(key: str, k: int) -> int:
    """A stable inner fold in [0, k) for an item's prompt key."""
    return int.from_bytes(hashlib.sha256(("inner:" + key).encode()).digest()[:4], "little") % k


def head_loss(head: torch.nn.Module, d: HeadData, unpaired_coef: float, margin: float = 0.0) -> torch.Tensor:
    from retrain.reward import pointwise_loss, preference_loss

    loss = torch.zeros(())
    if len(d.label):
        loss = loss + preference_loss(head(d.chosen), head(d.rejected), d.label, d.weight, margin)
    if len(d.point_label):
        loss = loss + unpaired_coef * pointwise_loss(head(d.points), d.point_label, d.point_weight)
    return loss


def pair_accuracy(head: torch.nn.Module, d: HeadData) -> float:
    dec = d.label != 0.5
    if not dec.any():
        return float("nan")
    with torch.no_grad():
        m = head(d.chosen[dec]) - head(d.rejected[dec])
    return float(((m > 0).float() + 0.5 * (m == 0).float()).mean())


@dataclass
class MemberMetrics:
    steps: int
    best_step: int
    stopped: str  # "early" (validation stopped improving) | "max_steps" | "no_validation"
    val_loss: float
    val_accuracy: float
    train_loss: float
    curve: list  # [step, train loss, validation loss, validation accuracy] every ``log_every`` steps


def train_member(head: Head, train: HeadData, val: HeadData | None, *, lr: float, weight_decay: float,
                 max_steps: int, patience: int, unpaired_coef: float, margin: float = 0.0,
                 log_every: int = 10) -> MemberMetrics:
    """Full-batch Adam on ``train`` until ``val``'s loss has not improved for ``patience``
    steps (or ``max_steps``); ``head`` ends at its best validation state.  Returns the metrics."""
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    best, best_step, best_state = math.inf, 0, copy.deepcopy(head.state_dict())
    curve, step, stopped = [], 0, "max_steps" if val is not None else "no_validation"
    val_loss = float("nan")
    for step in range(1, max_steps + 1):
        loss = head_loss(head, train, unpaired_coef, margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if val is None:
            continue
        with torch.no_grad():
            val_loss = float(head_loss(head, val, unpaired_coef, margin))
        if val_loss < best - 1e-5:
            best, best_step, best_state = val_loss, step, copy.deepcopy(head.state_dict())
        if step % log_every == 0 or step == 1:
            curve.append([step, round(float(loss.detach()), 5), round(val_loss, 5), round(pair_accuracy(head, val), 4)])
        if step - best_step >= patience:
            stopped = "early"
            break
    if val is not None:
        head.load_state_dict(best_state)
    with torch.no_grad():
        train_loss = float(head_loss(head, train, unpaired_coef, margin))
    return MemberMetrics(steps=step, best_step=best_step if val is not None else step, stopped=stopped,
                         val_loss=best if val is not None else float("nan"),
                         val_accuracy=pair_accuracy(head, val) if val is not None else float("nan"),
                         train_loss=train_loss, curve=curve)


def expander(spec: FeatureSpec, hidden: int, interact: bool) -> Expand:
    return Expand(spec.answer_dim(hidden), len(spec.layers) if spec.prompt else 0, hidden, interact)


def train_selected(data: HeadData, cfg, spec: FeatureSpec, hidden: int, *, init: Ensemble | None = None, log=None,
                   phase: str = "rm") -> tuple:
    """The ensemble of ``cfg.feature_prompt``: ``off`` (the answer alone), ``on`` (with the
    prompt-answer interaction), or ``auto``: both are trained and the one whose members
    validate better (mean best inner-validation loss) is kept.  Returns (Ensemble, metrics)."""
    modes = {"off": [False], "on": [True], "auto": [False, True]}[cfg.feature_prompt] if spec.prompt else [False]
    tried = {}
    for interact in modes:
        prev = init if init is not None and init.expand.interact == interact else None
        ens, m = train_ensemble(data, cfg, init=prev, expand=expander(spec, hidden, interact), log=log, phase=phase)
        vl = [v for v in m["val_loss"] if v == v]
        tried[interact] = (sum(vl) / len(vl) if vl else math.inf, ens, m)
    pick = min(tried, key=lambda k: tried[k][0])
    _, ens, m = tried[pick]
    m["interaction"] = pick
    m["selection"] = {("interaction" if k else "answer"): round(v[0], 5) for k, v in tried.items()}
    m["wall_s"] = sum(v[2]["wall_s"] for v in tried.values())
    return ens, m


def train_ensemble(data: HeadData, cfg, *, init: Ensemble | None = None, expand: Expand | None = None, log=None,
                   phase: str = "rm") -> tuple:
    """Trains ``cfg.ensemble`` members on ``data`` (``cfg``: ``retrain.reward.RewardConfig``);
    member m early-stops on inner fold m.  ``expand``: what the heads read of the features (all
    of them by default).  ``init``: a previous ensemble of the same feature spec and expansion to
    warm-start every member from.  Returns (Ensemble, metrics dict)."""
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    expand = (expand or Expand(data.chosen.shape[-1])).fit(data.all_features())
    with torch.no_grad():
        data = HeadData(expand(data.chosen), expand(data.rejected), data.label, data.weight, expand(data.points),
                        data.point_label, data.point_weight, data.pair_keys, data.point_keys)
    X = data.all_features()
    mean = X.mean(0) if len(X) else torch.zeros(data.chosen.shape[-1])
    std = X.std(0).clamp(min=1e-4) if len(X) > 1 else torch.ones_like(mean)
    z = lambda t: (t - mean) / std  # noqa: E731
    zd = HeadData(z(data.chosen), z(data.rejected), data.label, data.weight, z(data.points), data.point_label,
                  data.point_weight, data.pair_keys, data.point_keys)
    k = max(1, cfg.ensemble)
    if k == 1:
        pf = torch.tensor([inner_fold(key, 5) == 0 for key in data.pair_keys], dtype=torch.bool)
        qf = torch.tensor([inner_fold(key, 5) == 0 for key in data.point_keys], dtype=torch.bool)
        folds = [(pf, qf)]
    else:
        pk = torch.tensor([inner_fold(key, k) for key in data.pair_keys], dtype=torch.long)
        qk = torch.tensor([inner_fold(key, k) for key in data.point_keys], dtype=torch.long)
        folds = [(pk == m, qk == m) for m in range(k)]
    members, reports = [], []
    for m, (pv, qv) in enumerate(folds):
        head = Head(X.shape[-1], cfg.head, cfg.head_hidden)
        if init is not None and len(init.members) > 0:
            head.load_state_dict(init.members[m % len(init.members)].state_dict())
        train = zd.subset(torch.nonzero(~pv).flatten(), torch.nonzero(~qv).flatten())
        val = zd.subset(torch.nonzero(pv).flatten(), torch.nonzero(qv).flatten())
        if not len(val.label) and not len(val.point_label):
            val = None
        if not len(train.label) and not len(train.point_label):
            train, val = val, None  # tiny data: nothing left to train on but the validation fold
        rep = train_member(head, train, val, lr=cfg.head_lr, weight_decay=cfg.weight_decay,
                           max_steps=cfg.head_max_steps, patience=cfg.head_patience,
                           unpaired_coef=cfg.unpaired_coef, margin=cfg.margin)
        members.append(head.requires_grad_(False))
        reports.append(rep)
        if log:
            for step, tl, vl, va in rep.curve:
                log(f"{phase}_m{m}", step, {"loss": tl, "val_loss": vl, "val_accuracy": va})
    ens = Ensemble(members, mean, std, expand)
    steps = [r.steps for r in reports]
    metrics = {"members": len(members), "steps": sum(steps), "steps_per_member": steps,
               "best_steps": [r.best_step for r in reports], "stopped": [r.stopped for r in reports],
               "val_loss": [r.val_loss for r in reports], "val_accuracy": [r.val_accuracy for r in reports],
               "train_loss": sum(r.train_loss for r in reports) / len(reports),
               "curves": [r.curve for r in reports], "wall_s": time.perf_counter() - t0}
    return ens, metrics


# ----------------------------------------------------------------------------- the model
class FeatureRewardModel:
    """Frozen SFT model + feature spec + a head ensemble; ``score`` gives one number per answer."""

    design = "features"

    def __init__(self, model, tokenizer, spec: FeatureSpec, heads: Ensemble | None = None, *, base: str = "",
                 max_length: int = 384, frozen_dtype: torch.dtype = torch.float32, norm_mean: float = 0.0,
                 norm_std: float = 1.0, lower_batch: int = 8):
        self.model, self.tokenizer, self.base = model, tokenizer, base
        n = len(_decoder_layers(model))
        self.spec = spec.clipped(n)
        self.heads = heads
        self.max_length, self.frozen_dtype = max_length, frozen_dtype
        self.norm_mean, self.norm_std = norm_mean, norm_std
        self.lower_batch = lower_batch
        self.split = max(self.spec.layers)  # how deep the frozen forward goes
        self._cache: FeatureCache | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        return self.spec.dim(self.model.config.hidden_size)

    def cache(self) -> FeatureCache:
        if self._cache is None:
            self._cache = FeatureCache(self.model, self.tokenizer, self.spec, max_length=self.max_length,
                                       batch=self.lower_batch, dtype=self.frozen_dtype)
        return self._cache

    def features(self, items: list[tuple[list[dict], str]], desc: str = "features") -> torch.Tensor:
        return self.cache().get(items, desc)

    def scores_of(self, feats: torch.Tensor, normalized: bool = True) -> torch.Tensor:
        if self.heads is None:
            raise RuntimeError("the reward model has no trained heads yet")
        with torch.no_grad():
            raw = self.heads(feats.to(self.heads.mean.device)).float().cpu()
        return (raw - self.norm_mean) / self.norm_std if normalized else raw

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str], normalized: bool = True,
              batch_size: int = 8) -> torch.Tensor:
        if not prompts:
            return torch.zeros(0)
        return self.scores_of(self.features(list(zip(prompts, responses)), "rm: scoring"), normalized)

    # -- rollouts (PPO) ---------------------------------------------------------------
    def rollout_features(self, full: torch.Tensor, fmask: torch.Tensor, P: int, L: int) -> torch.Tensor:
        """Features of every prefix of each rollout's answer: [B, L + 1, D], index t the prefix
        before response token t (t = 0: the opened assistant turn), and index L the whole
        answer closed by end-of-turn (``full`` holds it at column P + L for rows that hit the
        cap; for the others the last real token is their own end-of-turn)."""
        states = layer_states(self.model, full.to(self.device), fmask.to(self.device), self.spec.layers,
                              self.frozen_dtype)
        T = full.shape[1]
        pos = torch.arange(T, device=fmask.device)[None]
        span = (pos >= P - 1).long() * fmask.to(pos.device)
        prompt = (pos < P - 1).long() * fmask.to(pos.device)
        feats = prefix_features(states, span.to(self.device), self.spec, prompt.to(self.device))
        last = (fmask.to(pos.device) * pos).argmax(-1).to(feats.device)  # each row's last real token
        per_pos = feats[:, P - 1:P - 1 + L]
        final = feats[torch.arange(len(last)), last]
        return torch.cat([per_pos, final[:, None]], 1)

    def rollout_scores(self, feats: torch.Tensor) -> torch.Tensor:
        """Normalised scores of whole rollouts from ``rollout_features`` (on their device)."""
        with torch.no_grad():
            return ((self.heads(feats[:, -1]) - self.norm_mean) / self.norm_std).float()

    def pair_margins(self, pairs) -> torch.Tensor:
        """Normalised ``r_chosen - r_rejected`` of each pair."""
        if not pairs:
            return torch.zeros(0)
        s = self.scores_of(self.features([(p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)],
                                         "rm: evaluation"), normalized=False)
        return (s[0::2] - s[1::2]) / self.norm_std

    def point_scores(self, points) -> torch.Tensor:
        """Normalised score of each unpaired label's answer (0: a typical reference answer)."""
        if not points:
            return torch.zeros(0)
        return self.scores_of(self.features([(q.prompt, q.answer) for q in points], "rm: label scores"))

    def normalize(self, samples: list[tuple[list[dict], str]], max_samples: int = 256, seed: int = 0) -> dict:
        """Mean 0 / std 1 over ``samples`` (prompt, answer): the reference model's answers."""
        import random

        if len(samples) > max_samples:
            samples = random.Random(seed).sample(samples, max_samples)
        raw = self.scores_of(self.features(samples, "rm: reference samples"), normalized=False) if samples \
            else torch.zeros(0)
        self.norm_mean = float(raw.mean()) if len(raw) else 0.0
        self.norm_std = max(float(raw.std()) if len(raw) > 1 else 1.0, 1e-6)
        return {"norm_mean": self.norm_mean, "norm_std": self.norm_std, "norm_samples": len(samples)}

    def as_value_model(self) -> ValueHead:
        return ValueHead(self)

    # -- persistence ------------------------------------------------------------------
    def save(self, out_dir: str, extra: dict | None = None) -> None:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.heads.state_dict().items()}
        save_file(state, str(out / "heads.safetensors"))
        cfg = {"design": "features", "base": self.base, "spec": self.spec.as_dict(), "max_length": self.max_length,
               "members": len(self.heads.members), "head": self.heads.members[0].kind,
               "head_hidden": _hidden_of(self.heads.members[0]), "dim": self.dim,
               "interaction": self.heads.expand.interact, "hidden_size": self.model.config.hidden_size,
               "norm_mean": self.norm_mean, "norm_std": self.norm_std,
               "frozen_dtype": str(self.frozen_dtype).removeprefix("torch."), "split": self.split}
        cfg.update(extra or {})
        (out / "reward_config.json").write_text(json.dumps(cfg, indent=2, default=str))
        (out / "normalization.json").write_text(json.dumps({"mean": self.norm_mean, "std": self.norm_std}, indent=2))
        self.tokenizer.save_pretrained(out)

    @classmethod
    def load(cls, path: str, device: str = "cpu", model=None) -> FeatureRewardModel:
        """Loads the heads; ``model``: an already loaded SFT model to share (else it is loaded)."""
        from safetensors.torch import load_file

        from assistant import models
        from retrain.backbone import frozen_dtype

        cfg = json.loads(Path(path, "reward_config.json").read_text())
        if model is None:
            model = models.load(cfg["base"], Path(cfg["base"]).parent, device=device, dtype="float32").model
            model.config.use_cache = False
            model.eval().requires_grad_(False)
        tok = models.load_tokenizer(path)
        spec = FeatureSpec.from_dict(cfg["spec"])
        heads = empty_ensemble(spec, cfg.get("hidden_size", model.config.hidden_size), cfg["members"],
                               cfg.get("head", "linear"), cfg.get("head_hidden", 64), cfg.get("interaction", False))
        heads.load_state_dict(load_file(str(Path(path, "heads.safetensors"))))
        heads.requires_grad_(False)
        dev = next(model.parameters()).device
        return cls(model, tok, spec, heads.to(dev), base=cfg["base"],
                   max_length=cfg.get("max_length", 384), frozen_dtype=frozen_dtype(cfg.get("frozen_dtype", "float32"),
                                                                                      dev),
                   norm_mean=cfg["norm_mean"], norm_std=cfg["norm_std"])


class ValueHead:
    """PPO's critic for a feature reward model: a trainable copy of its heads, the normalisation
    folded in, reading the features of every prefix (``rollout_features``).  It starts as the
    reward model: its value at the whole answer is the normalised score."""

    design = "features"

    def __init__(self, rm: FeatureRewardModel):
        self.net = copy.deepcopy(rm.heads).requires_grad_(True)
        self.norm_mean, self.norm_std = rm.norm_mean, rm.norm_std
        self.split = rm.split

    def parameters(self):
        return [p for p in self.net.parameters() if p.requires_grad]

    def values(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, L] values at the positions before each response token (grad flows to the heads)."""
        return (self.net(feats[:, :-1]) - self.norm_mean) / self.norm_std


def head_data(rm: FeatureRewardModel, pairs, points, desc: str = "rm") -> HeadData:
    """The training items as features (``retrain.data.Pair`` / ``Point``)."""
    from retrain.data import _key

    dim = rm.dim
    pf = rm.features([(p.prompt, a) for p in pairs for a in (p.chosen, p.rejected)], f"{desc}: pairs") \
        if pairs else torch.zeros(0, dim)
    qf = rm.features([(q.prompt, q.answer) for q in points], f"{desc}: labels") if points else torch.zeros(0, dim)
    return HeadData(pf[0::2], pf[1::2], torch.tensor([p.label for p in pairs], dtype=torch.float32),
                    torch.tensor([p.weight for p in pairs], dtype=torch.float32), qf,
                    torch.tensor([q.label for q in points], dtype=torch.float32),
                    torch.tensor([q.weight for q in points], dtype=torch.float32),
                    [_key(p.prompt) for p in pairs], [_key(q.prompt) for q in points])


def fit_feature_model(sft_path: str, pairs, points, reference, cfg, init_from: str | None, shared: dict, *,
                      log=None, phase: str = "rm"):
    """A feature reward model for one role: the frozen SFT model (loaded once into ``shared``
    and shared by both roles, with its feature cache), heads trained on ``pairs`` / ``points``
    (warm-started from ``init_from`` when it is a feature model of the same spec and base), and
    normalised on ``reference``.  Returns (model, ``retrain.reward.RewardMetrics``)."""
    import os

    from assistant import models
    from retrain.backbone import frozen_dtype
    from retrain.reward import RewardMetrics

    if not pairs and not points:
        raise ValueError("no training data for the reward model")
    t0 = time.perf_counter()
    if "sft" not in shared:
        loaded = models.load(sft_path, Path(sft_path).parent, device="cpu", dtype="float32")
        loaded.model.config.use_cache = False
        shared["sft"] = (loaded.model.eval().requires_grad_(False), loaded.tokenizer)
    model, tok = shared["sft"]
    rm = FeatureRewardModel(model, tok, cfg.feature_spec(), base=str(sft_path), max_length=cfg.max_length,
                            frozen_dtype=frozen_dtype(cfg.frozen_dtype, next(model.parameters()).device),
                            lower_batch=cfg.lower_batch)
    if "features" in shared and shared["features"].spec == rm.spec:
        rm._cache = shared["features"]
    shared["features"] = rm.cache()
    init = None
    if init_from and Path(init_from, "reward_config.json").exists():
        prev = json.loads(Path(init_from, "reward_config.json").read_text())
        if (prev.get("design") == "features" and prev.get("spec") == rm.spec.as_dict()
                and prev.get("head", "linear") == cfg.head and prev.get("dim") == rm.dim
                and os.path.realpath(prev["base"]) == os.path.realpath(sft_path)):
            init = FeatureRewardModel.load(init_from, model=model).heads
    rm.heads, m = train_selected(head_data(rm, pairs, points, phase), cfg, rm.spec, model.config.hidden_size,
                                 init=init, log=log, phase=phase)
    metrics = RewardMetrics(n_pairs=len(pairs), n_ties=sum(not p.decisive for p in pairs), n_points=len(points),
                            train_loss=m["train_loss"], wall_s=time.perf_counter() - t0, steps=m["steps"],
                            best_step=max(m["best_steps"]), stopped=",".join(m["stopped"]), val_curve=m["curves"])
    metrics.norm = rm.normalize(reference, cfg.max_ref_samples, cfg.seed)
    metrics.norm.update(warm_start=init is not None, members=m["members"], val_accuracy=m["val_accuracy"],
                        interaction=m["interaction"], selection=m["selection"],
                        feature_tokens=rm.cache().tokens)
    return rm, metrics


def empty_ensemble(spec: FeatureSpec, hidden_size: int, members: int, kind: str = "linear", hidden: int = 64,
                   interact: bool = False) -> Ensemble:
    expand = expander(spec, hidden_size, interact)
    dim = expand.out_dim
    return Ensemble([Head(dim, kind, hidden) for _ in range(members)], torch.zeros(dim), torch.ones(dim), expand)


def _hidden_of(head: Head) -> int:
    return head.net[0].out_features if head.kind == "mlp" else 0


def _decoder_layers(model):
    from retrain.backbone import decoder_of

    return decoder_of(model).layers
