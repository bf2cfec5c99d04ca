"""Decoders: the forward passes behind the engine, ``prefill`` one request and ``decode``
one token for the whole batch.

The KV cache lives in slots: ``kv[layer][k or v, slot, kv_head, position, dim]``.  Active
requests always occupy slots ``0..B-1``; when one leaves, the last one is moved into its
slot, so the batch is a view of the cache and never gathered.  Each slot has its own length;
an attention mask hides the positions beyond it.  The cache is sized to the requests in it
(``SlotDecoder.fit``: each needs its prompt plus its ``max_new_tokens``), not to the model's
context: one long chat costs one slot of its own length, and the memory is given back when
it ends (before: every slot grew to the next power of two and kept it, 2.8 GiB for one
4,200-token chat on SmolLM2-135M; ``benchmarks/kv_memory.py``).

- ``SlotDecoder`` runs Llama-style models (Llama, Mistral, Qwen2, SmolLM) directly from the
  HF modules' weights with fused QKV and gate/up projections: fewer, larger matmuls and
  little Python per layer, which is what decides speed on a CPU.  For fp32 models up to
  ``LAYOUTS_MAX_BYTES`` on CPU it also keeps two copies of every weight in the layouts
  measured fastest (see ``Proj``: ~1.3x at batch 1, ~1.5x at batch 4-8), so the weights
  take three times their size in memory;
- ``LoopDecoder`` serves every other architecture through the model's own forward with
  one ``DynamicCache`` per request (requests interleave token by token, unbatched).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from assistant.engine.request import ContextTooLong


class Decoder(Protocol):
    """What the engine needs from a decoder."""

    max_context: int

    def prefill(self, slot: int, ids: list[int], start: int = 0) -> torch.Tensor: ...
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


class Proj:
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


# Extra weight layouts (see Proj) triple the weights' memory: only for models up to this size.
LAYOUTS_MAX_BYTES = 2 << 30


def _layouts_wanted(model: torch.nn.Module) -> bool:
    p = next(model.parameters())
    if p.device.type != "cpu" or p.dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    return sum(t.numel() * t.element_size() for t in model.parameters()) <= LAYOUTS_MAX_BYTES




class Layer(NamedTuple):
    """One transformer block's weights as the decoder uses them."""

    ln1: torch.Tensor  # RMSNorm weight before attention
    qkv: Proj  # fused q, k and v projections
    o: Proj
    ln2: torch.Tensor  # RMSNorm weight before the MLP
    gate_up: Proj  # fused gate and up projections
    down: Proj
    act: Callable[[torch.Tensor], torch.Tensor]


class SlotDecoder:
    """Batched decoding of Llama-style models with a slot KV cache (see module doc).

    Per decoded token the Python work is what costs on a CPU, so the decode path is lean:
    RoPE from tables built once (through the model's own rotary module, so the values are
    HF's) and applied to q and k together with a roll instead of ``rotate_half``'s cat, the
    attention scale folded into q's tables, one write of the new k and v into a joint cache,
    and grouped-query attention as a plain batched matmul with the query heads of one
    kv-head as its rows (no repeat of k/v).
    """

    BLOCK = 256  # positions are allocated in blocks of this many

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

        def proj(w: torch.Tensor, b: torch.Tensor | None) -> Proj:
            return Proj(w, b, layouts, max(max_batch, 2))

        self.layers: list[Layer] = []
        for layer in model.model.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(Layer(
                ln1=layer.input_layernorm.weight, qkv=proj(*_fuse(a.q_proj, a.k_proj, a.v_proj)),
                o=proj(a.o_proj.weight, a.o_proj.bias), ln2=layer.post_attention_layernorm.weight,
                gate_up=proj(*_fuse(m.gate_proj, m.up_proj)), down=proj(m.down_proj.weight, m.down_proj.bias),
                act=m.act_fn))
        self.intermediate = self.layers[0].gate_up.w.shape[0] // 2
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
        self._resize(*self._target(0, 0))

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

    def _mlp(self, h: torch.Tensor, layer: Layer) -> torch.Tensor:
        x = layer.gate_up(self._norm(h, layer.ln2))
        return h + layer.down(layer.act(x[..., : self.intermediate]) * x[..., self.intermediate:])

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
        for layer, kv in zip(self.layers, self.kv):
            qkv = layer.qkv(self._norm(h, layer.ln1))  # [B, (H+2KV)*D]
            qk = qkv[:, :nqk].view(B, H + KV, D)
            torch.add(qk * cos, torch.roll(qk, D // 2, -1) * sin, out=qk)
            kv.view(2 * self.slots, KV * cap, D)[rows, cols] = qkv[:, nq:].view(B, 2, KV, D)
            q = qkv[:, :nq].view(B, KV, G, D)
            scores = torch.matmul(q, kv[0, :B, :, :kv_len].transpose(2, 3)) + mask  # [B, KV, G, L]
            attn = torch.matmul(torch.softmax(scores, dim=-1), kv[1, :B, :, :kv_len])
            h = h + layer.o(attn.view(B, nq))
            h = self._mlp(h, layer)
        for b in range(B):
            self.lengths[b] += 1
        return self.lm_head(self._norm(h, self.norm_w))

    def prefill(self, slot: int, ids: list[int], start: int = 0) -> torch.Tensor:
        """Prompt tokens ``ids`` of one slot at positions ``start..``, after the ``start``
        positions already in its cache (a prompt may come in chunks); returns the logits of
        the chunk's last position."""
        T, L = len(ids), start + len(ids)
        self._grow(L + 1, slot)
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        cos = self.cos[start:L, None] * self.head_scale  # [T, H+KV, D]
        sin = self.sin[start:L, None] * self.head_scale
        # causal over the chunk, everything before it visible
        mask = None if not start else \
            torch.arange(L, device=self.device)[None] <= torch.arange(start, L, device=self.device)[:, None]
        h = self.embed(torch.tensor(ids, device=self.device))  # [T, hidden]
        nq, nqk = H * D, (H + KV) * D
        for layer, kv in zip(self.layers, self.kv):
            qkv = layer.qkv(self._norm(h, layer.ln1))  # [T, (H+2KV)*D]
            qk = qkv[:, :nqk].view(T, H + KV, D)
            torch.add(qk * cos, torch.roll(qk, D // 2, -1) * sin, out=qk)
            heads = qkv.view(T, H + 2 * KV, D).transpose(0, 1)  # [H+2KV, T, D]
            kv[:, slot, :, start:L] = heads[H:].view(2, KV, T, D)
            keys, values = kv[0, slot, :, :L], kv[1, slot, :, :L]
            attn = F.scaled_dot_product_attention(heads[None, :H], keys[None], values[None], attn_mask=mask,
                                                  is_causal=mask is None, scale=1.0, enable_gqa=KV != H)
            h = h + layer.o(attn[0].transpose(0, 1).reshape(T, nq))
            h = self._mlp(h, layer)
        self.lengths[slot] = L
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

    def prefill(self, slot: int, ids: list[int], start: int = 0) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids], device=self.device),
                         past_key_values=self.caches[slot] if start else None, use_cache=True)
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
