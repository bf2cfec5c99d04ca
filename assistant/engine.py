"""Generation: one decoding thread per loaded model that batches concurrent requests.

Why a thread of our own instead of ``model.generate``: several chat users must not wait
for one another.  Every step, the thread advances *all* active requests by one token in a
single batched forward pass (continuous batching: a request joins after its own prefill and
leaves the batch at its end-of-turn token, its stop button or its token limit).

The KV cache lives in slots: ``k[layer][slot, kv_head, position, dim]``.  Active requests
always occupy slots ``0..B-1``; when one leaves, the last one is moved into its slot, so the
batch is a view of the cache and never gathered.  Each slot has its own length; an
attention mask hides the positions beyond it.

Two decoders implement the same two calls (``prefill`` one request, ``decode`` one token
for the batch):
- ``SlotDecoder`` runs Llama-style models (Llama, Mistral, Qwen2, SmolLM) directly from the
  HF modules' weights with fused QKV and gate/up projections: fewer, larger matmuls and
  little Python per layer, which is what decides speed on a CPU;
- ``LoopDecoder`` serves every other architecture through the model's own forward with
  one ``DynamicCache`` per request (requests interleave token by token, unbatched).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int | None = None

    def as_dict(self) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p,
                "max_new_tokens": self.max_new_tokens, "seed": self.seed}


class ContextTooLong(ValueError):
    """The prompt plus the answer budget does not fit the model's context."""


_DONE = object()


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    output: queue.Queue[object] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: BaseException | None = None
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Asks the engine to stop this request; takes effect before its next token."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[int]:
        """Yields token ids as the engine produces them; raises if generation failed."""
        while True:
            item = self.output.get()
            if item is _DONE:
                if self.error is not None:
                    raise RuntimeError(f"generation failed: {self.error}") from self.error
                return
            yield item  # type: ignore[misc]

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else 1000 * (self.first_token_at - self.submitted_at)

    @property
    def latency_ms(self) -> float | None:
        return None if self.finished_at is None else 1000 * (self.finished_at - self.submitted_at)


# ----------------------------------------------------------------------------- sampling
def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Temperature then nucleus (top-p) sampling of one row of logits; greedy at T=0."""
    logits = logits.float()
    if params.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if 0 < params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        keep = cumulative - sorted_probs < params.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


# ----------------------------------------------------------------------------- decoders
class Decoder(Protocol):
    max_context: int

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor: ...
    def decode(self, tokens: list[int]) -> torch.Tensor: ...
    def move(self, src: int, dst: int) -> None: ...
    def release(self, slot: int) -> None: ...


SUPPORTED_FAST = {"llama", "mistral", "qwen2"}


def fast_path_supported(model: torch.nn.Module) -> bool:
    cfg = model.config
    if getattr(cfg, "model_type", None) not in SUPPORTED_FAST:
        return False
    try:
        layer = model.model.layers[0]
        attn, mlp = layer.self_attn, layer.mlp
        needed = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj,
                  mlp.down_proj, model.model.rotary_emb, model.model.norm, model.lm_head)
    except AttributeError:
        return False
    if hasattr(attn, "q_norm") or getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
        return False
    return all(m is not None for m in needed)


def _fuse(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Concatenates projection weights and turns the modules' weights into views of the
    fused tensor, so fusing costs no extra memory and the HF model stays usable."""
    weight = torch.cat([m.weight.data for m in linears], dim=0)
    bias = None
    if any(m.bias is not None for m in linears):
        bias = torch.cat([m.bias.data if m.bias is not None else weight.new_zeros(m.out_features)
                          for m in linears])
    start = 0
    for m in linears:
        n = m.weight.shape[0]
        m.weight.data = weight[start:start + n]
        if bias is not None and m.bias is not None:
            m.bias.data = bias[start:start + n]
        start += n
    return weight, bias


class SlotDecoder:
    """Batched decoding of Llama-style models with a slot KV cache (see module doc)."""

    def __init__(self, model: torch.nn.Module, max_batch: int, max_context: int):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        self.apply_rope = apply_rotary_pos_emb
        cfg = model.config
        self.model = model
        self.max_batch = max_batch
        self.max_context = max_context
        self.n_heads = cfg.num_attention_heads
        self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.eps = cfg.rms_norm_eps
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            qkv_w, qkv_b = _fuse(a.q_proj, a.k_proj, a.v_proj)
            gu_w, _ = _fuse(m.gate_proj, m.up_proj)
            self.layers.append(dict(
                ln1=layer.input_layernorm.weight, ln2=layer.post_attention_layernorm.weight,
                qkv_w=qkv_w, qkv_b=qkv_b, o_w=a.o_proj.weight, o_b=a.o_proj.bias,
                gu_w=gu_w, down_w=m.down_proj.weight, act=m.act_fn))
        self.embed = model.model.embed_tokens
        self.norm_w = model.model.norm.weight
        self.lm_head = model.lm_head
        self.rotary = model.model.rotary_emb
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.lengths = [0] * max_batch
        self.active = 0  # slots 0..active-1 hold live sequences
        self._grow(256)

    def _grow(self, needed: int) -> None:
        """Doubles the cache's position capacity until ``needed`` fits (copying old data)."""
        if needed <= self.capacity:
            return
        cap = max(self.capacity, 256)
        while cap < needed:
            cap *= 2
        cap = min(cap, self.max_context)
        shape = (self.max_batch, self.n_kv, cap, self.head_dim)
        new_k = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        new_v = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in self.layers]
        for i in range(len(self.k)):
            new_k[i][:, :, :self.capacity] = self.k[i]
            new_v[i][:, :, :self.capacity] = self.v[i]
        self.k, self.v, self.capacity = new_k, new_v, cap

    def _forward(self, x: torch.Tensor, positions: torch.Tensor, slots: slice,
                 mask: torch.Tensor | None, write_at: torch.Tensor | None, kv_len: int) -> torch.Tensor:
        """x: [B, T] token ids.  Prefill (B=1, T=n, causal) or decode (T=1, masked)."""
        B, T = x.shape
        h = self.embed(x)
        cos, sin = self.rotary(h, positions)
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        for i, L in enumerate(self.layers):
            r = F.rms_norm(h, (h.shape[-1],), L["ln1"], self.eps)
            qkv = F.linear(r, L["qkv_w"], L["qkv_b"])
            q, k, v = qkv.split((H * D, KV * D, KV * D), dim=-1)
            q = q.view(B, T, H, D).transpose(1, 2)
            k = k.view(B, T, KV, D).transpose(1, 2)
            v = v.view(B, T, KV, D).transpose(1, 2)
            q, k = self.apply_rope(q, k, cos, sin)
            kc, vc = self.k[i], self.v[i]
            if write_at is None:  # prefill of one slot: positions 0..T-1
                kc[slots, :, :T] = k
                vc[slots, :, :T] = v
                attn = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=KV != H)
            else:  # decode: each row writes at its own length
                rows = torch.arange(B, device=self.device)
                kc[rows, :, write_at] = k[:, :, 0]
                vc[rows, :, write_at] = v[:, :, 0]
                attn = F.scaled_dot_product_attention(
                    q, kc[slots, :, :kv_len], vc[slots, :, :kv_len], attn_mask=mask, enable_gqa=KV != H)
            attn = attn.transpose(1, 2).reshape(B, T, H * D)
            h = h + F.linear(attn, L["o_w"], L["o_b"])
            r = F.rms_norm(h, (h.shape[-1],), L["ln2"], self.eps)
            g, u = F.linear(r, L["gu_w"]).chunk(2, dim=-1)
            h = h + F.linear(L["act"](g) * u, L["down_w"])
        h = F.rms_norm(h[:, -1], (h.shape[-1],), self.norm_w, self.eps)
        return self.lm_head(h)

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        self._grow(len(ids) + 1)
        x = torch.tensor([ids], device=self.device)
        positions = torch.arange(len(ids), device=self.device)[None]
        logits = self._forward(x, positions, slice(slot, slot + 1), None, None, len(ids))
        self.lengths[slot] = len(ids)
        return logits[0]

    def decode(self, tokens: list[int]) -> torch.Tensor:
        B = len(tokens)
        lengths = self.lengths[:B]
        kv_len = max(lengths) + 1
        self._grow(kv_len)
        pos = torch.tensor(lengths, device=self.device)
        mask = torch.arange(kv_len, device=self.device)[None, :] <= pos[:, None]  # [B, kv_len]
        x = torch.tensor(tokens, device=self.device)[:, None]
        logits = self._forward(x, pos[:, None], slice(0, B), mask[:, None, None, :], pos, kv_len)
        for b in range(B):
            self.lengths[b] += 1
        return logits

    def move(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        for kc, vc in zip(self.k, self.v):
            kc[dst, :, :n] = kc[src, :, :n]
            vc[dst, :, :n] = vc[src, :, :n]
        self.lengths[dst] = n

    def release(self, slot: int) -> None:
        self.lengths[slot] = 0


class LoopDecoder:
    """Any architecture: the model's own forward and one DynamicCache per request."""

    def __init__(self, model: torch.nn.Module, max_batch: int, max_context: int):
        self.model = model
        self.max_context = max_context
        self.device = next(model.parameters()).device
        self.caches: list[object | None] = [None] * max_batch

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True)
        self.caches[slot] = out.past_key_values
        return out.logits[0, -1]

    def decode(self, tokens: list[int]) -> torch.Tensor:
        rows = []
        for b, tok in enumerate(tokens):
            out = self.model(input_ids=torch.tensor([[tok]], device=self.device),
                             past_key_values=self.caches[b], use_cache=True)
            self.caches[b] = out.past_key_values
            rows.append(out.logits[0, -1])
        return torch.stack(rows)

    def move(self, src: int, dst: int) -> None:
        self.caches[dst] = self.caches[src]

    def release(self, slot: int) -> None:
        self.caches[slot] = None


# ----------------------------------------------------------------------------- engine
class Engine:
    """Owns one loaded model and its decoding thread.

    ``submit`` is thread-safe and returns at once; the request's tokens arrive on its queue.
    ``retire`` stops intake and lets requests in flight finish, which is how a hot swap
    keeps streams on the weights they started with.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, *, version: str = "unversioned",
                 max_batch: int = 8, max_context: int | None = None, stop_ids: set[int] | None = None,
                 fast: bool | None = None, threads: int = 0):
        from assistant.models import stop_token_ids

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.version = version
        self.max_batch = max_batch
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_context = min(max_context or limit, limit)
        self.stop_ids = stop_ids if stop_ids is not None else stop_token_ids(model, tokenizer)
        use_fast = fast_path_supported(model) if fast is None else fast
        cls = SlotDecoder if use_fast else LoopDecoder
        self.decoder: Decoder = cls(model, max_batch, self.max_context)
        self.threads = threads
        self._pending: queue.Queue[Request | None] = queue.Queue()
        self._slots: list[Request] = []
        self._retired = threading.Event()
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"engine-{version}", daemon=True)
        self._thread.start()

    # -- public API -------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The tokenizer's own chat template with the assistant turn opened."""
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=True)
        return list(enc["input_ids"])

    def check_fits(self, prompt_ids: list[int], params: SamplingParams) -> None:
        need = len(prompt_ids) + params.max_new_tokens
        if need > self.max_context:
            raise ContextTooLong(
                f"the conversation is too long for the model: {len(prompt_ids)} prompt tokens + "
                f"{params.max_new_tokens} answer tokens exceed its context of {self.max_context} tokens; "
                "start a new chat or shorten the message")

    def submit(self, prompt_ids: list[int], params: SamplingParams) -> Request:
        if self._retired.is_set():
            raise RuntimeError(f"engine for version {self.version} is retired")
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.check_fits(prompt_ids, params)
        req = Request(prompt_ids=list(prompt_ids), params=params)
        if params.seed is not None:
            req.generator = torch.Generator(device="cpu").manual_seed(int(params.seed))
        self._pending.put(req)
        return req

    def generate_text(self, messages: list[dict], params: SamplingParams) -> str:
        req = self.submit(self.encode_chat(messages), params)
        return self.tokenizer.decode(list(req), skip_special_tokens=True)

    @property
    def load(self) -> int:
        return len(self._slots) + self._pending.qsize()

    def retire(self) -> None:
        """No new requests; the thread exits once the ones in flight are done."""
        self._retired.set()
        self._pending.put(None)

    def close(self, timeout: float | None = 30) -> None:
        self.retire()
        self._thread.join(timeout)

    @property
    def finished(self) -> bool:
        return self._stopped.is_set()

    # -- decoding thread ------------------------------------------------------------------
    def _emit(self, req: Request, token: int) -> bool:
        """Records one sampled token; returns True when the request is over."""
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
        if token in self.stop_ids:
            req.finish_reason = "stop"
            return True
        req.tokens.append(token)
        req.output.put(token)
        if len(req.tokens) >= req.params.max_new_tokens:
            req.finish_reason = "length"
            return True
        return False

    def _finish(self, slot: int) -> None:
        req = self._slots[slot]
        req.finished_at = time.perf_counter()
        req.output.put(_DONE)
        last = len(self._slots) - 1
        if slot != last:
            self.decoder.move(last, slot)
            self._slots[slot] = self._slots[last]
        self.decoder.release(last)
        self._slots.pop()
        if isinstance(self.decoder, SlotDecoder):
            self.decoder.active = len(self._slots)

    def _admit(self, block: bool) -> None:
        while len(self._slots) < self.max_batch:
            try:
                req = self._pending.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            block = False
            if req is None:
                continue
            if req.cancelled.is_set():
                req.finish_reason = "cancelled"
                req.finished_at = time.perf_counter()
                req.output.put(_DONE)
                continue
            slot = len(self._slots)
            self._slots.append(req)
            try:
                logits = self.decoder.prefill(slot, req.prompt_ids)
                token = sample(logits, req.params, req.generator)
            except Exception as exc:  # noqa: BLE001 - reported to the request, engine lives on
                log.exception("prefill failed")
                req.error = exc
                req.finish_reason = "error"
                self._finish(slot)
                continue
            if self._emit(req, token):
                self._finish(slot)

    def _step(self) -> None:
        for slot in reversed(range(len(self._slots))):
            if self._slots[slot].cancelled.is_set():
                self._slots[slot].finish_reason = "cancelled"
                self._finish(slot)
        if not self._slots:
            return
        last = [r.tokens[-1] for r in self._slots]
        logits = self.decoder.decode(last)
        done = [self._emit(r, sample(logits[b], r.params, r.generator)) for b, r in enumerate(self._slots)]
        for slot in reversed(range(len(done))):
            if done[slot]:
                self._finish(slot)

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                while True:
                    self._admit(block=not self._slots)
                    if self._slots:
                        try:
                            self._step()
                        except Exception as exc:  # noqa: BLE001 - fail the batch, keep serving
                            log.exception("decode step failed")
                            for slot in reversed(range(len(self._slots))):
                                self._slots[slot].error = exc
                                self._slots[slot].finish_reason = "error"
                                self._finish(slot)
                    elif self._retired.is_set() and self._pending.empty():
                        break
        finally:
            self._stopped.set()


class TextStream:
    """Turns a request's token ids into growing text, holding back half a UTF-8 character."""

    def __init__(self, tokenizer, request: Request):
        self.tokenizer = tokenizer
        self.request = request
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        ids: list[int] = []
        for tok in self.request:
            ids.append(tok)
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):
                continue
            self.text = text
            yield text
        final = self.tokenizer.decode(ids, skip_special_tokens=True)
        if final != self.text:
            self.text = final
            yield final
