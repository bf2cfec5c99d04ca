"""Generation: one decoding thread per loaded model that batches concurrent requests.

Why a thread of our own instead of ``model.generate``: several chat users must not wait
for one another.  Every step, the thread advances *all* active requests by one token in a
single batched forward pass (continuous batching: a request joins after its own prefill and
leaves the batch at its end-of-turn token, its stop button or its token limit).

The KV cache lives in slots: ``k[layer][slot, kv_head, position, dim]``.  Active requests
always occupy slots ``0..B-1``; when one leaves, the last one is moved into its slot, so the
batch is a view of the cache and never gathered.  Each slot has its own length; an
attention mask hides the positions beyond it.  The cache is sized to the requests in it
(``SlotDecoder.fit``: each needs its prompt plus its ``max_new_tokens``), not to the model's
context: one long chat costs one slot of its own length, and the memory is given back when
it ends (before: every slot grew to the next power of two and kept it, 2.8 GiB for one
4,200-token chat on SmolLM2-135M; ``benchmarks/kv_memory.py``).

Two decoders implement the same two calls (``prefill`` one request, ``decode`` one token
for the batch):
- ``SlotDecoder`` runs Llama-style models (Llama, Mistral, Qwen2, SmolLM) directly from the
  HF modules' weights with fused QKV and gate/up projections: fewer, larger matmuls and
  little Python per layer, which is what decides speed on a CPU.  For fp32 models up to
  ``LAYOUTS_MAX_BYTES`` on CPU it also keeps two copies of every weight in the layouts
  measured fastest (see ``_Proj``: ~1.3x at batch 1, ~1.5x at batch 4-8), so the weights
  take three times their size in memory;
- ``LoopDecoder`` serves every other architecture through the model's own forward with
  one ``DynamicCache`` per request (requests interleave token by token, unbatched).

Sampling is vectorised over the batch (``sample_batch``); each seeded request draws from its
own generator, so its answer does not depend on what else is in the batch.
``Engine.stats`` counts steps and decoded tokens, which shows whether requests were batched.
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
    ignore_eos: bool = False  # benchmarks only: run to max_new_tokens past end-of-turn

    def as_dict(self) -> dict:
        d = {"temperature": self.temperature, "top_p": self.top_p,
             "max_new_tokens": self.max_new_tokens, "seed": self.seed}
        if self.ignore_eos:
            d["ignore_eos"] = True
        return d


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
    def done(self) -> bool:
        return self.finished_at is not None

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token_at is None else 1000 * (self.first_token_at - self.submitted_at)

    @property
    def latency_ms(self) -> float | None:
        return None if self.finished_at is None else 1000 * (self.finished_at - self.submitted_at)


# ----------------------------------------------------------------------------- sampling
NUCLEUS_TOPK = 128  # top-p looks at the k most likely tokens first; a full sort only if they hold < top_p


def _uniform(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


def sample_batch(logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> list[int]:
    """Samples one token per row of ``logits`` [B, V], each row with its own parameters.

    Greedy rows (T <= 0) take the argmax.  The others draw by inverse CDF with one uniform
    number from their own generator (so a seed reproduces an answer whatever else is in the
    batch): softmax at their temperature, then, for top-p, the nucleus found among the
    ``NUCLEUS_TOPK`` most likely tokens, which avoids sorting the whole vocabulary per row
    unless the nucleus is wider than that.
    """
    n, vocab = logits.shape
    out = [0] * n
    logits = logits.float()
    greedy = [i for i, p in enumerate(params) if p.temperature <= 0]
    if greedy:
        rows = logits if len(greedy) == n else logits[greedy]
        for i, tok in zip(greedy, rows.argmax(-1).tolist()):
            out[i] = tok
        if len(greedy) == n:
            return out
    hot = [i for i, p in enumerate(params) if p.temperature > 0]
    temps = torch.tensor([[params[i].temperature] for i in hot], dtype=logits.dtype)
    probs = torch.softmax((logits if len(hot) == n else logits[hot]) / temps, dim=-1)
    uniforms = [_uniform(generators[i]) for i in hot]
    nucleus = [j for j, i in enumerate(hot) if 0 < params[i].top_p < 1]
    full = [j for j, i in enumerate(hot) if not 0 < params[i].top_p < 1]
    if full:
        cum = probs[full].cumsum(-1)
        target = torch.tensor(uniforms, dtype=cum.dtype)[full, None] * cum[:, -1:]
        picks = torch.searchsorted(cum, target, right=True).clamp_(max=vocab - 1)[:, 0].tolist()
        for j, tok in zip(full, picks):
            out[hot[j]] = tok
    if nucleus:
        top_p = torch.tensor([[params[hot[j]].top_p] for j in nucleus], dtype=probs.dtype)
        sub = probs[nucleus]
        vals, idx = sub.topk(min(NUCLEUS_TOPK, vocab), dim=-1)
        cum = vals.cumsum(-1)
        wide = set((cum[:, -1] < top_p[:, 0]).nonzero()[:, 0].tolist())  # nucleus beyond the top k
        for r in wide:
            out[hot[nucleus[r]]] = _nucleus_one(sub[r], float(top_p[r, 0]), uniforms[nucleus[r]])
        keep = (cum - vals) < top_p  # always keeps the top token
        kept = (vals * keep).cumsum(-1)
        target = torch.tensor([uniforms[j] for j in nucleus], dtype=kept.dtype)[:, None] * kept[:, -1:]
        pos = torch.searchsorted(kept, target, right=True).clamp_(max=vals.shape[1] - 1)
        picks = idx.gather(1, pos)[:, 0].tolist()
        for r, (j, tok) in enumerate(zip(nucleus, picks)):
            if r not in wide:
                out[hot[j]] = tok
    return out


def _nucleus_one(probs: torch.Tensor, top_p: float, u: float) -> int:
    vals, order = torch.sort(probs, descending=True)
    cum = vals.cumsum(-1)
    kept = (vals * ((cum - vals) < top_p)).cumsum(-1)
    pos = int(torch.searchsorted(kept, kept[-1:] * u, right=True).clamp_(max=len(vals) - 1))
    return int(order[pos])


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Temperature then nucleus (top-p) sampling of one row of logits; greedy at T=0."""
    return sample_batch(logits.reshape(1, -1), [params], [generator])[0]


# ----------------------------------------------------------------------------- decoders
class Decoder(Protocol):
    max_context: int

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor: ...
    def decode(self, tokens: list[int]) -> torch.Tensor: ...
    def move(self, src: int, dst: int) -> None: ...
    def release(self, slot: int) -> None: ...
    def fit(self, needs: list[int]) -> None: ...


SUPPORTED_FAST = {"llama", "mistral", "qwen2"}
_DYNAMIC_ROPE = {"dynamic", "longrope"}  # their tables change with the sequence length


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
    if getattr(model.model.rotary_emb, "rope_type", "default") in _DYNAMIC_ROPE:
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


class _Proj:
    """One (fused) projection ``x @ w.T + b`` for x of shape [rows, in], in the fastest
    layout measured on CPUs per row count (fp32, AVX2, MKL):
    - one row (batch-1 decoding, memory-bound): MKL's GEMV over an [in, out] copy streams
      the weights ~1.3x faster than ``F.linear`` over [out, in];
    - several rows: oneDNN with the weight reordered once into its blocked layout, ~1.5x
      faster than ``F.linear`` (MKL's small-M GEMM is slow on AMD CPUs).
    Both are copies (the HF weight stays as it is), so they are only made when ``layouts``.
    """

    __slots__ = ("w", "b", "wt", "packed")

    def __init__(self, w: torch.Tensor, b: torch.Tensor | None, layouts: bool, pack_rows: int):
        self.w, self.b = w.detach(), None if b is None else b.detach()
        self.wt = self.packed = None
        if layouts:
            self.wt = self.w.t().contiguous()
            try:
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.w, pack_rows)
            except Exception:  # noqa: BLE001 - no oneDNN here: F.linear for several rows
                self.packed = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and self.wt is not None:
            y = x @ self.wt
            return y if self.b is None else y + self.b
        if self.packed is not None:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.b, "none", [], "")
        return F.linear(x, self.w, self.b)


# Extra weight layouts (see _Proj) triple the weights' memory: only for models up to this size.
LAYOUTS_MAX_BYTES = 2 << 30


def _layouts_wanted(model: torch.nn.Module) -> bool:
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    return sum(t.numel() * t.element_size() for t in model.parameters()) <= LAYOUTS_MAX_BYTES


class SlotDecoder:
    """Batched decoding of Llama-style models with a slot KV cache (see module doc).

    Per decoded token the Python work is what costs on a CPU, so the decode path is lean:
    RoPE from tables built once (through the model's own rotary module, so the values are
    HF's) and applied to q and k together with a roll instead of ``rotate_half``'s cat, the
    attention scale folded into q's tables, one write of the new k and v into a joint cache,
    and grouped-query attention as a plain batched matmul with the query heads of one
    kv-head as its rows (no repeat of k/v).
    """

    def __init__(self, model: torch.nn.Module, max_batch: int, max_context: int,
                 layouts: bool | None = None):
        cfg = model.config
        self.model = model
        self.max_batch = max_batch
        self.max_context = max_context
        H = self.n_heads = cfg.num_attention_heads
        KV = self.n_kv = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        D = self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.group = H // KV
        self.hidden = cfg.hidden_size
        self.eps = cfg.rms_norm_eps
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if layouts is None:
            layouts = _layouts_wanted(model)
        self.layouts = layouts

        def proj(w: torch.Tensor, b: torch.Tensor | None) -> _Proj:
            return _Proj(w, b, layouts, max(max_batch, 2))

        self.layers = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            qkv_w, qkv_b = _fuse(a.q_proj, a.k_proj, a.v_proj)
            gu_w, gu_b = _fuse(m.gate_proj, m.up_proj)
            self.layers.append((
                layer.input_layernorm.weight, proj(qkv_w, qkv_b), proj(a.o_proj.weight, a.o_proj.bias),
                layer.post_attention_layernorm.weight, proj(gu_w, gu_b),
                proj(m.down_proj.weight, m.down_proj.bias), m.act_fn))
        self.intermediate = self.layers[0][4].w.shape[0] // 2
        self.embed = model.model.embed_tokens
        self.norm_w = model.model.norm.weight
        self.lm_head = proj(model.lm_head.weight, model.lm_head.bias)
        # RoPE tables for every position, computed by the model's rotary module itself.
        positions = torch.arange(max_context, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            cos, sin = model.model.rotary_emb(probe, positions)
        self.cos = cos[0].contiguous()  # [positions, D]
        half = torch.ones(D, device=self.device, dtype=self.dtype)
        half[: D // 2] = -1
        self.sin = (sin[0] * half).contiguous()  # rotate_half(x) * sin == roll(x, D/2) * (sign * sin)
        scale = torch.ones(H + KV, 1, device=self.device, dtype=self.dtype)
        scale[:H] = D ** -0.5  # attention scale folded into q
        self.head_scale = scale
        self.capacity = 0  # positions per slot in the cache
        self.slots = 0  # slots in the cache (at most max_batch)
        self.kv: list[torch.Tensor] = []  # per layer [2 (k, v), slots, KV, capacity, D]
        self.lengths = [0] * max_batch
        self.active = 0  # slots 0..active-1 hold live sequences
        self._resize(*self._target(0, 0))

    # The old two-list cache view, for callers that inspect it.
    @property
    def k(self) -> list[torch.Tensor]:
        return [kv[0] for kv in self.kv]

    @property
    def v(self) -> list[torch.Tensor]:
        return [kv[1] for kv in self.kv]

    BLOCK = 256  # positions are allocated in blocks of this many

    def _target(self, n: int, need: int) -> tuple[int, int]:
        """(slots, positions) for ``n`` sequences of at most ``need`` positions: positions
        rounded up to a block; up to one block, every slot (cheap: the cache at start);
        beyond it, only the slots in use (rounded up to a power of two), so one long chat
        does not pay for ``max_batch`` of itself."""
        block = min(self.BLOCK, self.max_context)
        positions = min(self.max_context, -(-max(need, 1) // block) * block)
        slots = self.max_batch if positions <= block else min(self.max_batch, 1 << max(n - 1, 0).bit_length())
        return slots, positions

    def fit(self, needs: list[int]) -> None:
        """Sizes the cache to the live sequences, ``needs[i]`` positions for slot ``i``
        (prompt + answer budget): grows it when they do not fit, shrinks it when it holds more
        than twice what they need (the slack avoids resizing at every join and leave)."""
        need = max(needs, default=0)
        slots, positions = self._target(len(needs), need)
        fits = len(needs) <= self.slots and need <= self.capacity
        if fits and self.slots * self.capacity <= 2 * slots * positions:
            return
        self._resize(max(slots, len(needs)), max(positions, min(need, self.max_context)))

    def _resize(self, slots: int, capacity: int) -> None:
        """Reallocates the cache as ``slots`` x ``capacity``, copying what fits of the old one
        (callers keep every live sequence inside the new size)."""
        shape = (2, slots, self.n_kv, capacity, self.head_dim)
        self.kv, old = [], self.kv  # the old cache can go as soon as it is copied
        keep_slots, keep = min(self.slots, slots), min(self.capacity, capacity)
        for layer in range(len(self.layers)):
            kv = torch.zeros(shape, device=self.device, dtype=self.dtype)
            if keep_slots and keep:
                kv[:, :keep_slots, :, :keep] = old[layer][:, :keep_slots, :, :keep]
                old[layer] = None
            self.kv.append(kv)
        self.slots, self.capacity = slots, capacity

    def _grow(self, needed: int, slot: int = 0) -> None:
        """Makes room for ``needed`` positions (and slot ``slot``) when a caller did not ``fit``
        first: doubles the positions (copying old data)."""
        if needed <= self.capacity and slot < self.slots:
            return
        if needed > self.max_context:
            raise ContextTooLong(f"{needed} positions exceed the context of {self.max_context}")
        cap = max(self.capacity, min(self.BLOCK, self.max_context))
        while cap < needed:
            cap *= 2
        self._resize(max(self.slots, slot + 1), min(cap, self.max_context))

    def _norm(self, h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(h, (self.hidden,), w, self.eps)

    def _mlp(self, h: torch.Tensor, ln2, gu: _Proj, down: _Proj, act) -> torch.Tensor:
        x = gu(self._norm(h, ln2))
        return h + down(act(x[..., : self.intermediate]) * x[..., self.intermediate:])

    def decode(self, tokens: list[int]) -> torch.Tensor:
        """One token for each of the slots 0..B-1; returns logits [B, vocab]."""
        B = len(tokens)
        H, KV, D, G = self.n_heads, self.n_kv, self.head_dim, self.group
        lengths = self.lengths[:B]
        kv_len = max(lengths) + 1
        self._grow(kv_len, B - 1)
        cap = self.capacity
        pos = torch.tensor(lengths, device=self.device)
        cos = self.cos[pos][:, None] * self.head_scale  # [B, H+KV, D]
        sin = self.sin[pos][:, None] * self.head_scale
        mask = torch.zeros(B, 1, 1, kv_len, device=self.device, dtype=self.dtype)
        mask.masked_fill_(torch.arange(kv_len, device=self.device) > pos[:, None, None, None], float("-inf"))
        # where the new k and v go in the cache viewed as [2 * slots, KV * cap, D]
        rows = (torch.arange(2, device=self.device) * self.slots)[None, :, None] \
            + torch.arange(B, device=self.device)[:, None, None]  # [B, 2, 1]
        cols = (torch.arange(KV, device=self.device) * cap)[None, None] + pos[:, None, None]  # [B, 1, KV]
        h = self.embed(torch.tensor(tokens, device=self.device))  # [B, hidden]
        nq, nqk = H * D, (H + KV) * D
        for (ln1, qkv_p, o_p, ln2, gu_p, down_p, act), kv in zip(self.layers, self.kv):
            qkv = qkv_p(self._norm(h, ln1))  # [B, (H+2KV)*D]
            qk = qkv[:, :nqk].view(B, H + KV, D)
            torch.add(qk * cos, torch.roll(qk, D // 2, -1) * sin, out=qk)
            kv.view(2 * self.slots, KV * cap, D)[rows, cols] = qkv[:, nq:].view(B, 2, KV, D)
            q = qkv[:, :nq].view(B, KV, G, D)
            scores = torch.matmul(q, kv[0, :B, :, :kv_len].transpose(2, 3)) + mask  # [B, KV, G, L]
            attn = torch.matmul(torch.softmax(scores, dim=-1), kv[1, :B, :, :kv_len])
            h = h + o_p(attn.view(B, nq))
            h = self._mlp(h, ln2, gu_p, down_p, act)
        for b in range(B):
            self.lengths[b] += 1
        return self.lm_head(self._norm(h, self.norm_w))

    def prefill(self, slot: int, ids: list[int]) -> torch.Tensor:
        """The whole prompt of one slot (causal attention); returns the last position's logits."""
        T = len(ids)
        self._grow(T + 1, slot)
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        cos = self.cos[:T, None] * self.head_scale  # [T, H+KV, D]
        sin = self.sin[:T, None] * self.head_scale
        h = self.embed(torch.tensor(ids, device=self.device))  # [T, hidden]
        nq, nqk = H * D, (H + KV) * D
        for (ln1, qkv_p, o_p, ln2, gu_p, down_p, act), kv in zip(self.layers, self.kv):
            qkv = qkv_p(self._norm(h, ln1))  # [T, (H+2KV)*D]
            qk = qkv[:, :nqk].view(T, H + KV, D)
            torch.add(qk * cos, torch.roll(qk, D // 2, -1) * sin, out=qk)
            heads = qkv.view(T, H + 2 * KV, D).transpose(0, 1)  # [H+2KV, T, D]
            kv[:, slot, :, :T] = heads[H:].view(2, KV, T, D)
            attn = F.scaled_dot_product_attention(heads[None, :H], heads[None, H:H + KV], heads[None, H + KV:],
                                                  is_causal=True, scale=1.0, enable_gqa=KV != H)
            h = h + o_p(attn[0].transpose(0, 1).reshape(T, nq))
            h = self._mlp(h, ln2, gu_p, down_p, act)
        self.lengths[slot] = T
        return self.lm_head(self._norm(h[-1:], self.norm_w))[0]

    def move(self, src: int, dst: int) -> None:
        n = self.lengths[src]
        for kv in self.kv:
            kv[:, dst, :, :n] = kv[:, src, :, :n]
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

    def fit(self, needs: list[int]) -> None:
        """Nothing to size: each request's DynamicCache grows with it and goes with it."""


# ----------------------------------------------------------------------------- engine
@dataclass
class EngineStats:
    """What the decoding thread did: lets tests and benchmarks see that requests were batched."""

    steps: int = 0  # batched decode steps
    decoded_tokens: int = 0  # tokens produced by decode steps (sum of the batch sizes)
    prefills: int = 0
    peak_batch: int = 0  # the largest batch one decode step advanced
    model_s: float = 0.0  # seconds in the decoder's forward passes (prefill and decode)
    busy_s: float = 0.0  # seconds the thread spent working (forward passes, sampling, bookkeeping)

    @property
    def mean_batch(self) -> float:
        return self.decoded_tokens / self.steps if self.steps else 0.0


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

        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.version = version
        self.max_batch = max_batch
        limit = getattr(model.config, "max_position_embeddings", None) or 2048
        self.max_context = min(max_context or limit, limit)
        self.stop_ids = stop_ids if stop_ids is not None else stop_token_ids(model, tokenizer)
        use_fast = fast_path_supported(model) if fast is None else fast
        cls = SlotDecoder if use_fast else LoopDecoder
        with torch.inference_mode():
            self.decoder: Decoder = cls(model, max_batch, self.max_context)
        self.threads = threads
        self.stats = EngineStats()
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
        if not prompt_ids:
            raise ValueError("empty prompt")
        if params.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        self.check_fits(prompt_ids, params)
        req = Request(prompt_ids=list(prompt_ids), params=params)
        if params.seed is not None:
            req.generator = torch.Generator(device="cpu").manual_seed(int(params.seed))
        with self._lock:  # no request can slip in after retire() and never be served
            if self._retired.is_set():
                raise RuntimeError(f"engine for version {self.version} is retired")
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
        with self._lock:
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
        if token in self.stop_ids and not req.params.ignore_eos:
            req.finish_reason = "stop"
            return True
        req.tokens.append(token)
        req.output.put(token)
        if len(req.tokens) >= req.params.max_new_tokens:
            req.finish_reason = "length"
            return True
        return False

    @staticmethod
    def _close_request(req: Request, reason: str, error: BaseException | None = None) -> None:
        if error is not None:
            req.error = error
        req.finish_reason = req.finish_reason or reason
        req.finished_at = time.perf_counter()
        req.output.put(_DONE)

    def _finish(self, slot: int, reason: str | None = None, error: BaseException | None = None) -> None:
        """Ends the request in ``slot`` and keeps slots 0..B-1 dense (the last one moves in)."""
        req = self._slots[slot]
        if reason is not None:
            req.finish_reason = reason
        last = len(self._slots) - 1
        try:
            if slot != last:
                self.decoder.move(last, slot)
                self._slots[slot] = self._slots[last]
            self.decoder.release(last)
        finally:
            self._slots.pop()
            if isinstance(self.decoder, SlotDecoder):
                self.decoder.active = len(self._slots)
            self._close_request(req, reason or "error", error)
        self._fit()

    def _fit(self) -> None:
        """Sizes the decoder's cache to the requests in the slots (prompt + answer budget)."""
        self.decoder.fit([len(r.prompt_ids) + r.params.max_new_tokens for r in self._slots])

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
                self._close_request(req, "cancelled")
                continue
            slot = len(self._slots)
            self._slots.append(req)
            started = time.perf_counter()
            try:
                self._fit()
                logits = self.decoder.prefill(slot, req.prompt_ids)
                self.stats.model_s += time.perf_counter() - started
                token = sample_batch(logits[None], [req.params], [req.generator])[0]
            except Exception as exc:  # noqa: BLE001 - reported to the request, engine lives on
                log.exception("prefill failed")
                self._finish(slot, "error", exc)
                continue
            self.stats.prefills += 1
            if self._emit(req, token):
                self._finish(slot)
            self.stats.busy_s += time.perf_counter() - started

    def _step(self) -> None:
        for slot in reversed(range(len(self._slots))):
            if self._slots[slot].cancelled.is_set():
                self._finish(slot, "cancelled")
        if not self._slots:
            return
        batch = list(self._slots)
        started = time.perf_counter()
        logits = self.decoder.decode([r.tokens[-1] for r in batch])
        stats = self.stats
        stats.model_s += time.perf_counter() - started
        tokens = sample_batch(logits, [r.params for r in batch], [r.generator for r in batch])
        stats.steps += 1
        stats.decoded_tokens += len(batch)
        stats.peak_batch = max(stats.peak_batch, len(batch))
        done = [self._emit(r, tok) for r, tok in zip(batch, tokens)]
        for slot in reversed(range(len(done))):
            if done[slot]:
                self._finish(slot)
        stats.busy_s += time.perf_counter() - started

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)
        fatal: BaseException | None = None
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
                                self._finish(slot, "error", exc)
                    elif self._retired.is_set() and self._pending.empty():
                        break
        except BaseException as exc:  # the thread itself broke: nobody may wait forever
            log.exception("engine %s stopped", self.version)
            fatal = exc
        finally:
            with self._lock:
                self._retired.set()
                self._stopped.set()
            error = fatal or RuntimeError(f"engine for version {self.version} stopped")
            for req in self._slots:
                self._close_request(req, "error", error)
            self._slots.clear()
            while True:
                try:
                    req = self._pending.get_nowait()
                except queue.Empty:
                    break
                if req is not None:
                    self._close_request(req, "error", error)


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
