"""Reward model: the SFT backbone with a scalar head, trained with the Bradley-Terry loss.

Design (what makes it affordable on two CPU cores):
- Only the top ``train_layers`` decoder layers are adapted (LoRA on those layers, or full
  fine-tuning of them with ``lora=False``); the layers below stay frozen at the SFT weights.
  Their hidden states are computed **once** per sequence without gradients (``lower``) and
  reused for every epoch, for the held-out evaluation and for normalisation; PPO reuses the
  same trick (the policy, the reference, the value model and the reward model all share the
  frozen lower stack, see ``retrain.ppo``).
- The score is read at the **last token of the response** (its end-of-turn token, which
  every scored response carries), through a linear head on the final-norm hidden state.
- Loss ``-log sigmoid(r_chosen - r_rejected)``; ties never reach it (``retrain.data``).
- Normalisation: mean 0 / std 1 on reference samples (SFT answers to prompts, ``ref_samples``);
  without them the answers of the training pairs are used (in this product those are the
  served model's own samples, so the same distribution on a first run).
- Held-out pairwise accuracy with a Wilson 95% interval, mean normalised margin.

Artifact directory: ``reward_config.json`` (base, split, normalisation, metrics),
``adapter/`` (PEFT LoRA adapter on the SFT base) or ``layers.safetensors`` (full
fine-tuning of the top layers), ``head.safetensors``, ``normalization.json``, tokenizer.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from assistant import models
from retrain.data import Pair

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- two-stage forward
def decoder_of(model) -> torch.nn.Module:
    """The inner decoder (``LlamaModel``-like: embed_tokens, layers, norm, rotary_emb) of a
    causal LM, a PEFT model around one, or a bare decoder."""
    m = model
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    if hasattr(m, "model") and hasattr(m.model, "layers"):
        return m.model
    if hasattr(m, "layers"):
        return m
    raise TypeError(f"unsupported architecture {type(model).__name__}: needs model.layers (Llama-style)")


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids for left-padded rows: 0 at each row's first real token."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive [B, 1, T, T] mask: causal and no attention to padding.  A padding query
    attends to itself so that no softmax row is empty (its output is masked later)."""
    T = mask.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=mask.device).tril()
    allowed = causal[None] & mask.bool()[:, None, :]
    allowed = allowed | torch.eye(T, dtype=torch.bool, device=mask.device)[None]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=mask.device)
    bias.masked_fill_(~allowed, torch.finfo(dtype).min)
    return bias[:, None]


@dataclass
class Lower:
    """Hidden states after the first ``split`` layers (frozen, no grad) for a padded batch."""

    h: torch.Tensor  # [B, T, H]
    mask: torch.Tensor  # [B, T]
    split: int


def run_layers(dec, h: torch.Tensor, mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    pos = positions_from_mask(mask)
    pe = dec.rotary_emb(h, position_ids=pos)
    bias = attention_bias(mask, h.dtype)
    for layer in dec.layers[start:end]:
        out = layer(h, attention_mask=bias, position_ids=pos, position_embeddings=pe)
        h = out[0] if isinstance(out, tuple) else out
    return h


def lower_forward(model, ids: torch.Tensor, mask: torch.Tensor, split: int) -> Lower:
    dec = decoder_of(model)
    with torch.no_grad():
        h = dec.embed_tokens(ids)
        h = run_layers(dec, h, mask, 0, split)
    return Lower(h=h.detach(), mask=mask, split=split)


def upper_forward(model, lower: Lower, start: int | None = None) -> torch.Tensor:
    """Layers ``start..n`` (default: from the split) and the final norm -> [B, T, H]."""
    dec = decoder_of(model)
    start = lower.split if start is None else start
    if start < lower.split:
        raise ValueError("cannot start above the cached split")
    h = lower.h
    if start > lower.split:  # the model's own layers between the two splits (frozen)
        with torch.no_grad():
            h = run_layers(dec, h, lower.mask, lower.split, start)
    h = run_layers(dec, h, lower.mask, start, len(dec.layers))
    return dec.norm(h)


def pad_left(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
    return ids, mask


def pad_hidden_left(hs: list[torch.Tensor], split: int) -> Lower:
    T = max(h.shape[0] for h in hs)
    H = hs[0].shape[-1]
    out = hs[0].new_zeros((len(hs), T, H))
    mask = torch.zeros((len(hs), T), dtype=torch.long, device=hs[0].device)
    for i, h in enumerate(hs):
        out[i, T - h.shape[0]:] = h
        mask[i, T - h.shape[0]:] = 1
    return Lower(h=out, mask=mask, split=split)


def end_of_turn_id(tokenizer) -> int:
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if marker in vocab:
            return int(vocab[marker])
    return int(tokenizer.eos_token_id)


def prompt_ids(tokenizer, prompt: list[dict]) -> list[int]:
    enc = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(enc["input_ids"])


def encode(tokenizer, prompt: list[dict], response: str, max_length: int) -> list[int]:
    """Prompt (chat template, assistant turn opened) + response + end-of-turn token, cut from
    the left when too long so that the scored last token always stays."""
    ids = prompt_ids(tokenizer, prompt) + tokenizer(response, add_special_tokens=False)["input_ids"]
    ids.append(end_of_turn_id(tokenizer))
    return ids[-max_length:]


def wilson(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Mean of -log sigmoid(r_chosen - r_rejected - margin)."""
    return -F.logsigmoid(chosen - rejected - margin).mean()


# ----------------------------------------------------------------------------- config / report
@dataclass
class RewardConfig:
    lora: bool = True  # LoRA on the top layers (True) or full fine-tuning of them (False)
    train_layers: int = 4  # top decoder layers adapted; the ones below stay frozen and cached
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0  # dropout off, as everywhere in RLHF
    lr: float = 5e-4  # LoRA / head learning rate (full fine-tuning: use ~1e-5)
    head_lr: float = 1e-3
    epochs: int = 2
    batch_size: int = 8  # pairs per step (2x sequences)
    max_length: int = 384  # tokens of prompt + response (cut from the left)
    margin: float = 0.0  # optional BT margin
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 0  # torch threads (0: leave as set by the caller)
    lower_batch: int = 8  # sequences per no-grad forward of the frozen layers
    max_ref_samples: int = 256  # reference answers used for the normalisation (a random subset)


@dataclass
class RewardReport:
    path: str
    accuracy: float
    ci_low: float
    ci_high: float
    margin: float
    norm_mean: float
    norm_std: float
    n_train: int
    n_heldout: int
    train_loss: float = float("nan")
    first_loss: float = float("nan")
    wall_s: float = 0.0
    losses: list = field(default_factory=list)


# ----------------------------------------------------------------------------- the model
class RewardModel:
    """A scalar-head model over the SFT backbone; ``score`` gives one number per response."""

    def __init__(self, model, head: torch.nn.Linear, tokenizer, split: int, *, norm_mean: float = 0.0,
                 norm_std: float = 1.0, max_length: int = 384, base: str = "", lora: bool = True):
        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.split, self.norm_mean, self.norm_std = split, norm_mean, norm_std
        self.max_length, self.base, self.lora = max_length, base, lora

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
        return lower_forward(self.model, ids.to(self.device), mask.to(self.device), self.split)

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str], normalized: bool = True,
              batch_size: int = 8) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), batch_size):
            seqs = [encode(self.tokenizer, p, r, self.max_length)
                    for p, r in zip(prompts[i:i + batch_size], responses[i:i + batch_size])]
            ids, mask = pad_left(seqs, self.tokenizer.pad_token_id)
            out.append(self.values(self.lower(ids, mask), normalized)[:, -1].float().cpu())
        return torch.cat(out) if out else torch.zeros(0)

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
               "hidden_size": self.head.in_features, "norm_mean": self.norm_mean, "norm_std": self.norm_std}
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
                   max_length=cfg.get("max_length", 384), base=cfg["base"], lora=cfg.get("lora", True))


def _new_model(sft_path: str, cfg: RewardConfig, init_from: str | None, device: str) -> RewardModel:
    if init_from and Path(init_from, "reward_config.json").exists():
        prev = json.loads(Path(init_from, "reward_config.json").read_text())
        if prev.get("lora", True) == cfg.lora and os.path.realpath(prev["base"]) == os.path.realpath(sft_path):
            rm = RewardModel.load(init_from, device=device, trainable=True)
            rm.norm_mean, rm.norm_std = 0.0, 1.0  # re-normalised after training
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
                       lora=cfg.lora)


def _lower_all(rm: RewardModel, seqs: list[list[int]], batch: int, desc: str) -> list[torch.Tensor]:
    """Frozen-layer hidden states of every sequence, computed once (sorted by length)."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out: list[torch.Tensor | None] = [None] * len(seqs)
    for j in tqdm(range(0, len(order), batch), desc=desc, leave=False, disable=len(order) <= batch):
        idx = order[j:j + batch]
        ids, mask = pad_left([seqs[i] for i in idx], rm.tokenizer.pad_token_id)
        low = rm.lower(ids, mask)
        for r, i in enumerate(idx):
            out[i] = low.h[r, low.h.shape[1] - len(seqs[i]):].clone()
    return out  # type: ignore[return-value]


def _scores(rm: RewardModel, hs: list[torch.Tensor], batch: int = 16) -> torch.Tensor:
    out = []
    with torch.no_grad():
        for j in range(0, len(hs), batch):
            low = pad_hidden_left(hs[j:j + batch], rm.split)
            out.append(rm.values(low, normalized=False)[:, -1].float().cpu())
    return torch.cat(out) if out else torch.zeros(0)


def train_reward_model(sft_path: str, train: list[Pair], heldout: list[Pair], out_dir: str, cfg: RewardConfig, *,
                       init_from: str | None = None, ref_samples: list[tuple[list[dict], str]] | None = None,
                       log=None, device: str = "cpu") -> RewardReport:
    """Trains the RM on ``train``, evaluates on ``heldout``, normalises on ``ref_samples`` and
    writes the artifact to ``out_dir`` (via a temporary directory renamed into place)."""
    t0 = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    if not train:
        raise ValueError("no training pairs for the reward model")
    rm = _new_model(str(sft_path), cfg, init_from, device)
    tok = rm.tokenizer
    enc = [(encode(tok, p.prompt, p.chosen, cfg.max_length), encode(tok, p.prompt, p.rejected, cfg.max_length))
           for p in train]
    flat = [s for pair in enc for s in pair]
    h_train = _lower_all(rm, flat, cfg.lower_batch, "rm: frozen layers (train)")
    h_held = _lower_all(rm, [s for p in heldout for s in (encode(tok, p.prompt, p.chosen, cfg.max_length),
                                                           encode(tok, p.prompt, p.rejected, cfg.max_length))],
                        cfg.lower_batch, "rm: frozen layers (held-out)")
    params_lora = [p for p in rm.model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": params_lora, "lr": cfg.lr},
                             {"params": list(rm.head.parameters()), "lr": cfg.head_lr}],
                            weight_decay=cfg.weight_decay, eps=1e-8)
    steps_per_epoch = math.ceil(len(train) / cfg.batch_size)
    total = max(1, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    losses: list[float] = []
    step = 0
    bar = tqdm(total=total, desc="reward model", leave=False)
    for _epoch in range(cfg.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for j in range(0, len(order), cfg.batch_size):
            idx = order[j:j + cfg.batch_size]
            low = pad_hidden_left([h_train[2 * i] for i in idx] + [h_train[2 * i + 1] for i in idx], rm.split)
            r = rm.values(low, normalized=False)[:, -1]
            rc, rr = r[:len(idx)], r[len(idx):]
            loss = bradley_terry_loss(rc, rr, cfg.margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params_lora + list(rm.head.parameters()), cfg.grad_clip)
            opt.step()
            sched.step()
            step += 1
            acc = float((rc > rr).float().mean())
            losses.append(loss.item())
            if log:
                log("reward", step, {"loss": losses[-1], "accuracy": acc, "margin": float((rc - rr).mean().detach())})
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()
    # normalisation on reference samples (SFT answers), else on the training answers
    if ref_samples:
        ref = list(ref_samples)
        if len(ref) > cfg.max_ref_samples:
            ref = random.Random(cfg.seed).sample(ref, cfg.max_ref_samples)
        ref_seqs = [encode(tok, p, r, cfg.max_length) for p, r in ref]
        known = {tuple(s): h for s, h in zip(flat, h_train)}  # answers already in the pairs
        todo = [s for s in ref_seqs if tuple(s) not in known]
        for s, h in zip(todo, _lower_all(rm, todo, cfg.lower_batch, "rm: reference samples") if todo else []):
            known[tuple(s)] = h
        ref_scores = _scores(rm, [known[tuple(s)] for s in ref_seqs])
    else:
        ref_scores = _scores(rm, h_train)
    rm.norm_mean = float(ref_scores.mean())
    rm.norm_std = float(ref_scores.std()) if len(ref_scores) > 1 else 1.0
    rm.norm_std = max(rm.norm_std, 1e-6)
    if heldout:
        s = _scores(rm, h_held)
        sc, sr = s[0::2], s[1::2]
        wins = float((sc > sr).sum() + 0.5 * (sc == sr).sum())
        acc = wins / len(heldout)
        lo, hi = wilson(wins, len(heldout))
        margin = float(((sc - sr) / rm.norm_std).mean())
    else:
        acc, lo, hi, margin = float("nan"), 0.0, 1.0, float("nan")
    report = RewardReport(path=str(out_dir), accuracy=acc, ci_low=lo, ci_high=hi, margin=margin,
                          norm_mean=rm.norm_mean, norm_std=rm.norm_std, n_train=len(train), n_heldout=len(heldout),
                          train_loss=float(sum(losses[-steps_per_epoch:]) / max(1, len(losses[-steps_per_epoch:]))),
                          first_loss=losses[0] if losses else float("nan"), wall_s=time.perf_counter() - t0,
                          losses=losses)
    if log:
        log("reward_eval", step, {"accuracy": acc, "ci_low": lo, "ci_high": hi, "margin": margin,
                                  "norm_mean": rm.norm_mean, "norm_std": rm.norm_std})
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".rm-", dir=out.parent))
    try:
        rm.save(str(tmp), extra={"report": {k: v for k, v in asdict(report).items() if k != "losses"},
                                 "config": asdict(cfg), "init_from": init_from})
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _replace_dir(tmp: Path, out: Path) -> None:
    """Renames ``tmp`` to ``out``; an existing ``out`` is moved aside first, then removed."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}-{time.time_ns()}")
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
