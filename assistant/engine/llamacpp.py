"""``LlamaCppDecoder``: the engine's decoder on llama.cpp (``llama-cpp-python``'s C API), for
CPU serving of a model that has a GGUF (the embedded one does: it *is* a GGUF).

Why: on a CPU the torch decoder runs the 135M model at about a quarter of llama.cpp's speed
at batch 1 (docs/serving.md): per-token time there is spent in ~15 small ops per layer and in
reading fp32 weights, where llama.cpp runs fused quantised kernels.  This decoder keeps
everything else of the engine (continuous batching, chunked prefill, the fair scheduler,
seeded per-request sampling in ``sampling.sample_batch`` on the logits it returns, hot swap
by building a new engine) and gives llama.cpp only the forward passes:

- one ``llama_context`` holds every slot of the batch as a sequence (``seq_id`` = slot) in a
  unified KV cache of ``kv_tokens`` cells shared by all of them; ``move`` re-labels a
  sequence's cells (``llama_memory_seq_cp`` then ``seq_rm``), no copy of the cache;
- ``decode`` is one ``llama_decode`` over a batch of one token per slot, with logits for
  every row; ``prefill`` feeds a prompt chunk into one slot, with logits for its last token;
- a PPO version (a PEFT LoRA on the base) is served as the base GGUF plus the adapter in
  fp32, applied by llama.cpp at run time (``gguf.cached_lora_gguf``): merging it into the
  4-bit weights would round away most of what PPO changed.

``llama-cpp-python`` is an optional dependency (the ``fast`` extra, built by pip from
source); without it, or for a model without a GGUF, the torch decoders serve.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import weakref
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

_BACKEND = threading.Lock()
_backend_ready = False


def available() -> bool:
    """Whether ``llama-cpp-python`` can be imported here."""
    try:
        import llama_cpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


def _init_backend():
    import llama_cpp as L

    global _backend_ready
    with _BACKEND:
        if not _backend_ready:
            L.llama_backend_init()
            L.llama_log_set(_QUIET, ctypes.c_void_p(0))
            _backend_ready = True
    return L


def _quiet(level, text, data):  # llama.cpp logs every load at INFO on stderr; keep warnings and errors
    message = text.decode(errors="replace").rstrip()
    if level >= 3 and message.strip(". ") and "n_ctx_seq" not in message:  # WARN = 3, ERROR = 4
        log.warning("llama.cpp: %s", message)  # (a unified cache is larger than one sequence's context: fine)


try:
    import llama_cpp as _L

    _QUIET = _L.llama_log_callback(_quiet)
except (ImportError, OSError):
    _QUIET = None


def _free(L, model, ctx, batch, adapters: list) -> None:
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    for adapter in adapters:
        L.llama_adapter_lora_free(adapter)
    L.llama_model_free(model)


class LlamaCppDecoder:
    """The ``Decoder`` protocol on llama.cpp: ``prefill``, ``decode``, ``move``, ``release``,
    ``fit``; returns float32 logits as torch tensors."""

    def __init__(self, gguf_path: str | Path, max_batch: int, max_context: int, *, lora: str | Path | None = None,
                 threads: int = 0, n_batch: int = 512, kv_tokens: int | None = None, unified_kv: bool = True):
        L = self._L = _init_backend()
        self.max_context = max_context
        self.max_batch = max_batch
        self.n_batch = max(n_batch, max_batch)
        self.kv_tokens = kv_tokens or max(max_context, 1024 * max_batch)
        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = 0
        model = L.llama_model_load_from_file(str(gguf_path).encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {gguf_path}")
        cparams = L.llama_context_default_params()
        cparams.n_ctx = self.kv_tokens
        cparams.n_batch = cparams.n_ubatch = self.n_batch
        cparams.n_seq_max = max_batch
        cparams.kv_unified = unified_kv
        cparams.no_perf = True
        n_threads = threads or os.cpu_count() or 1
        cparams.n_threads = cparams.n_threads_batch = n_threads
        ctx = L.llama_init_from_model(model, cparams)
        if not ctx:
            L.llama_model_free(model)
            raise RuntimeError("llama.cpp could not create a context")
        self._model, self._ctx = model, ctx
        self._adapters: list = []  # the one in use (at most one), freed with the model
        self.lora: Path | None = None  # its file
        self._mem = L.llama_get_memory(ctx)
        self.vocab_size = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
        self._batch = L.llama_batch_init(self.n_batch, 0, 1)
        self._finalizer = weakref.finalize(self, _free, L, model, ctx, self._batch, self._adapters)
        self.lengths = [0] * max_batch
        self.threads = n_threads
        if lora is not None:
            try:
                self.set_lora(lora)
            except RuntimeError:
                self.close()
                raise

    def set_lora(self, lora: str | Path | None) -> None:
        """Applies the LoRA adapter GGUF ``lora`` on the base weights in place of the one in
        use (None: the base alone).  The retrain calls it once per PPO step with the policy's
        current adapter; it also empties every slot (their caches were the old weights')."""
        L = self._L
        adapter = None
        if lora is not None:
            adapter = L.llama_adapter_lora_init(self._model, str(lora).encode())
            if not adapter:
                raise RuntimeError(f"llama.cpp could not load the LoRA adapter {lora}")
        listed = (L.llama_adapter_lora_p_ctypes * 1)(adapter) if adapter else None
        if L.llama_set_adapters_lora(self._ctx, listed, 1 if adapter else 0,
                                     (ctypes.c_float * 1)(1.0) if adapter else None) != 0:
            if adapter:
                L.llama_adapter_lora_free(adapter)
            raise RuntimeError(f"llama.cpp could not apply the LoRA adapter {lora}")
        while self._adapters:
            L.llama_adapter_lora_free(self._adapters.pop())
        if adapter:
            self._adapters.append(adapter)
        self.lora = Path(lora) if lora is not None else None
        for slot in range(self.max_batch):
            self.release(slot)

    def close(self) -> None:
        self._finalizer()

    # -- the forward pass ---------------------------------------------------------------
    def _forward(self, tokens: list[int], positions, seqs, outputs: list[bool]) -> torch.Tensor:
        """One ``llama_decode`` per ``n_batch`` tokens; returns the logits the last one asked
        for (a prompt chunk longer than a llama.cpp batch wants only its last token's)."""
        L, b = self._L, self._batch
        for start in range(0, len(tokens), self.n_batch):
            n = min(self.n_batch, len(tokens) - start)
            for i in range(n):
                j = start + i
                b.token[i] = tokens[j]
                b.pos[i] = positions[j]
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seqs[j]
                b.logits[i] = outputs[j]
            b.n_tokens = n
            rc = L.llama_decode(self._ctx, b)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed ({rc}): "
                                   + ("no room in the KV cache" if rc == 1 else "see the log"))
        n_out = sum(outputs[start:start + n])
        ptr = L.llama_get_logits(self._ctx)
        return torch.from_numpy(np.ctypeslib.as_array(ptr, shape=(n_out, self.vocab_size)).copy())

    def prefill(self, slot: int, ids: list[int], start: int = 0) -> torch.Tensor:
        if start == 0:
            self._L.llama_memory_seq_rm(self._mem, slot, -1, -1)
        n = len(ids)
        logits = self._forward(ids, range(start, start + n), [slot] * n, [False] * (n - 1) + [True])
        self.lengths[slot] = start + n
        return logits[0]

    def decode(self, tokens: list[int]) -> torch.Tensor:
        n = len(tokens)
        logits = self._forward(tokens, self.lengths[:n], range(n), [True] * n)
        for i in range(n):
            self.lengths[i] += 1
        return logits

    def teacher_forced(self, ids: list[int], slot: int = 0) -> torch.Tensor:
        """Logits at every position of ``ids`` (for quality checks against fp32); frees the slot."""
        self.release(slot)
        out = []
        for i in range(0, len(ids), self.n_batch):
            chunk = ids[i:i + self.n_batch]
            out.append(self._forward(chunk, range(i, i + len(chunk)), [slot] * len(chunk), [True] * len(chunk)))
        self.release(slot)
        return torch.cat(out)

    # -- slots --------------------------------------------------------------------------
    def move(self, src: int, dst: int) -> None:
        L = self._L
        L.llama_memory_seq_rm(self._mem, dst, -1, -1)
        L.llama_memory_seq_cp(self._mem, src, dst, -1, -1)
        L.llama_memory_seq_rm(self._mem, src, -1, -1)
        self.lengths[dst], self.lengths[src] = self.lengths[src], 0

    def release(self, slot: int) -> None:
        self._L.llama_memory_seq_rm(self._mem, slot, -1, -1)
        self.lengths[slot] = 0

    def fit(self, needs: list[int]) -> None:
        """The cache is allocated once (``kv_tokens`` cells shared by all slots); a batch that
        needs more than that fails its decode with "no room in the KV cache"."""
        if sum(needs) > self.kv_tokens:
            log.warning("the requests in flight need %d KV cells, the llama.cpp cache has %d", sum(needs),
                        self.kv_tokens)
