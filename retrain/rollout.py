"""Sampling answers inside the retrain: PPO's rollouts and the gate's answers.

Two samplers, one method (``sample(prompts, ...)`` -> prompt ids [B, P] left-padded, their
mask, response tokens [B, L] padded after the first stop token, and the response mask
including that stop token):

- ``TorchSampler``: the model itself, batched, left padding with position ids from the mask
  and a KV cache; a PEFT policy's adapter is merged into the weights while it samples.  Any
  device.
- ``LlamaCppSampler``: llama.cpp (``assistant.engine.llamacpp``, the app's CPU decoder) on the
  base model's GGUF with a LoRA adapter on top -- the policy's adapter as it is at this PPO
  step (written as a llama.cpp adapter before each batch, a few MB in milliseconds), or a
  published version's.  Tokens are drawn by the server's own sampler
  (``assistant.engine.sampling.sample_batch``), one seeded generator per answer, and
  finished answers leave the batch at once.  PPO's log-probabilities are still computed in
  torch on the sampled tokens, so only the behaviour policy moves: the fp16 GGUF agrees with
  fp32 on 1.000 of teacher-forced tokens at 3e-6 nats/token (``benchmarks/quant_quality.py``).

``make_sampler`` chooses as the server does: llama.cpp on a CPU where llama-cpp-python is
installed and the base model has a GGUF (``assistant.engine.gguf.llamacpp_base``), else torch.
The phase times before and after are in docs/rlhf.md (``benchmarks/retrain_speed.py``).
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Protocol

import torch

from retrain.backbone import pad_left

log = logging.getLogger(__name__)

Sampled = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class Sampler(Protocol):
    def sample(self, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float,
               stop_ids: set[int], pad_id: int, generator: torch.Generator | None = None) -> Sampled: ...


def response_mask(tokens: torch.Tensor, stop_ids: set[int] | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, L] keeping tokens up to and including the first stop token; and whether each
    row ended (had a stop token)."""
    stop = torch.zeros_like(tokens, dtype=torch.bool)
    for s in stop_ids:
        stop |= tokens == s
    before = stop.long().cumsum(-1) - stop.long()  # stop tokens strictly before t
    mask = (before == 0).long()
    return mask, stop.any(-1)


def _masked(resp: torch.Tensor, stop_ids: set[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    rmask, _ = response_mask(resp, stop_ids)
    return torch.where(rmask.bool(), resp, torch.full_like(resp, pad_id)), rmask


# ----------------------------------------------------------------------------- torch
@torch.no_grad()
def sample(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, top_p: float = 1.0,
           stop_ids: set[int], pad_id: int, generator: torch.Generator | None = None,
           device: torch.device | None = None) -> Sampled:
    """Batched sampling with ``model`` from left-padded prompts, with position ids from the
    mask and a KV cache."""
    from transformers import DynamicCache

    device = device or next(model.parameters()).device
    ids, pmask = pad_left(prompts, pad_id)
    ids, pmask = ids.to(device), pmask.to(device)
    B = ids.shape[0]
    cache = DynamicCache()
    attn = pmask.clone()
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
    tokens = []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    next_pos = attn.sum(-1, keepdim=True)
    stop = torch.tensor(sorted(stop_ids), device=device)
    for _ in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        if temperature > 0:
            probs = torch.softmax(logits / temperature, -1)
            if 0 < top_p < 1:
                sp, order = torch.sort(probs, descending=True, dim=-1)
                keep = sp.cumsum(-1) - sp < top_p
                sp = sp * keep
                choice = torch.multinomial(sp, 1, generator=generator)
                tok = order.gather(-1, choice)[:, 0]
            else:
                tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            tok = logits.argmax(-1)
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        done = done | torch.isin(tok, stop)
        if bool(done.all()):
            break
        attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], -1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos, past_key_values=cache,
                    use_cache=True)
        next_pos = next_pos + 1
    resp, rmask = _masked(torch.stack(tokens, 1), stop_ids, pad_id)
    return ids, pmask, resp, rmask


class TorchSampler:
    """Samples with the torch model; a PEFT model's adapter is merged while it samples."""

    name = "torch"

    def __init__(self, model):
        self.model = model

    def sample(self, prompts, *, max_new_tokens, temperature, top_p, stop_ids, pad_id, generator=None) -> Sampled:
        peft = hasattr(self.model, "merge_adapter") and hasattr(self.model, "peft_config")
        if peft:
            self.model.merge_adapter()
        try:
            return sample(self.model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                          stop_ids=stop_ids, pad_id=pad_id, generator=generator)
        finally:
            if peft:
                self.model.unmerge_adapter()


# ----------------------------------------------------------------------------- llama.cpp
class LlamaCppSampler:
    """Samples on llama.cpp: the base GGUF plus a LoRA adapter -- a trained policy's, synced
    before every batch (``follow``), or a published version's (``use_version``)."""

    name = "llamacpp"

    def __init__(self, base_gguf: str | Path, n_head: int, n_head_kv: int, *, threads: int = 0,
                 work_dir: str | Path | None = None):
        self.base_gguf, self.n_head, self.n_head_kv = Path(base_gguf), n_head, n_head_kv
        self.threads = threads
        self._tmp = None if work_dir else tempfile.TemporaryDirectory(prefix="rollout-lora-")
        self.work_dir = Path(work_dir or self._tmp.name)
        self._decoder = None
        self._lora: Path | None = None
        self._policy = None
        self.sync_s = 0.0  # time spent writing and loading the policy's adapter, summed

    def follow(self, policy) -> LlamaCppSampler:
        """Sample from ``policy`` (a PEFT model, adapter 'default') as it is at each call."""
        self._policy = policy
        return self

    def use_version(self, path: str | Path | None, models_dir: str | Path) -> LlamaCppSampler:
        """Sample from a published version: its adapter directory (None: the base model)."""
        from assistant import models
        from assistant.engine import gguf

        self._policy = None
        path = Path(path) if path is not None and models.is_adapter(Path(path)) else None
        self._set_lora(gguf.cached_lora_gguf(path, models_dir, self.n_head, self.n_head_kv) if path else None)
        return self

    def _set_lora(self, lora: Path | None) -> None:
        self._lora = lora
        if self._decoder is not None:
            self._decoder.set_lora(lora)

    def _sync_policy(self) -> None:
        import time

        from peft import get_peft_model_state_dict

        from assistant.engine import gguf

        t = time.perf_counter()
        state = get_peft_model_state_dict(self._policy)
        weights = {k: v.detach().float().cpu().numpy() for k, v in state.items()}
        alpha = float(self._policy.peft_config["default"].lora_alpha)
        out = gguf.lora_weights_to_gguf(weights, alpha, self.work_dir / "policy-lora.gguf", self.n_head,
                                        self.n_head_kv)
        self._set_lora(out)
        self.sync_s += time.perf_counter() - t

    def _decoder_for(self, batch: int, cells: int):
        """A decoder with room for ``batch`` sequences and ``cells`` KV cells, built once and
        rebuilt only to grow."""
        from assistant.engine.llamacpp import LlamaCppDecoder

        d = self._decoder
        if d is None or d.max_batch < batch or d.kv_tokens < cells:
            if d is not None:
                d.close()
            batch = max(batch, d.max_batch if d else 0)
            cells = max(cells, d.kv_tokens if d else 0)
            self._decoder = d = LlamaCppDecoder(self.base_gguf, batch, cells, lora=self._lora,
                                                threads=self.threads, kv_tokens=cells)
        return d

    @torch.no_grad()
    def sample(self, prompts, *, max_new_tokens, temperature, top_p, stop_ids, pad_id, generator=None) -> Sampled:
        from assistant.engine.sampling import SamplingParams, sample_batch

        if self._policy is not None:
            self._sync_policy()
        B = len(prompts)
        d = self._decoder_for(B, sum(len(p) for p in prompts) + B * (max_new_tokens + 1))
        # one generator per answer, seeded from the batch's: an answer does not depend on
        # when the others finish
        seeds = torch.randint(0, 2**62, (B,), generator=generator).tolist()
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        params = SamplingParams(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        # every slot is empty here (released below, or by set_lora); prefill starts each afresh
        logits = torch.stack([d.prefill(slot, p) for slot, p in enumerate(prompts)])
        rows = list(range(B))  # slot -> answer
        answers: list[list[int]] = [[] for _ in range(B)]
        for step in range(max_new_tokens):
            toks = sample_batch(logits, [params] * len(rows), [gens[r] for r in rows])
            going = []
            for slot, (row, tok) in enumerate(zip(rows, toks)):
                answers[row].append(tok)
                if tok not in stop_ids:
                    going.append(slot)
            if not going or step == max_new_tokens - 1:
                break
            for new, old in enumerate(going):  # finished answers leave; the rest move down
                if new != old:
                    d.move(old, new)
            for slot in range(len(going), len(rows)):
                d.release(slot)
            rows = [rows[s] for s in going]
            logits = d.decode([toks[s] for s in going])
        for slot in range(d.max_batch):
            d.release(slot)
        ids, pmask = pad_left(prompts, pad_id)
        L = max(len(a) for a in answers)
        resp = torch.full((B, L), pad_id, dtype=torch.long)
        for i, a in enumerate(answers):
            resp[i, :len(a)] = torch.tensor(a)
        resp, rmask = _masked(resp, stop_ids, pad_id)
        return ids, pmask, resp, rmask

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._tmp is not None:
            self._tmp.cleanup()


def make_sampler(backend: str, base_path: str | Path, model, cache_dir: str | Path, *, threads: int = 0,
                 work_dir: str | Path | None = None) -> LlamaCppSampler | None:
    """The llama.cpp sampler for a model on the base ``base_path`` when ``backend`` ('auto',
    'llamacpp', 'torch': the app's ``--backend``) allows it and it can; None means torch.
    'llamacpp' raises with the reason when it cannot."""
    from assistant.engine import gguf

    if backend not in ("auto", "llamacpp", "torch"):
        raise ValueError(f"sampler backend must be auto, llamacpp or torch, not {backend!r}")
    if backend == "torch":
        return None
    cfg = model.config
    on_cpu = next(model.parameters()).device.type == "cpu"
    base, why = gguf.llamacpp_base(base_path, cache_dir, on_cpu=on_cpu)
    if base is None:
        if backend == "llamacpp":
            raise ValueError(f"the retrain cannot sample with llama.cpp: {why}")
        log.info("retrain samples with torch: %s", why)
        return None
    threads = threads or torch.get_num_threads() or os.cpu_count() or 1
    log.info("retrain samples with llama.cpp (%s, %d threads)", base.name, threads)
    return LlamaCppSampler(base, cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", None)
                           or cfg.num_attention_heads, threads=threads, work_dir=work_dir)
