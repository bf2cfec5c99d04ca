"""GGUF files for the llama.cpp decoder (``assistant.engine.llamacpp``).

- ``serving_gguf``: the GGUF a model directory is served from: its own ``*.gguf``, or for
  the embedded model an fp16 conversion of its weights, made once.
- ``hf_to_gguf``: a Hugging Face Llama-style directory as an fp32 (or fp16) GGUF, taking the
  tokenizer's metadata from a GGUF with the same vocabulary (the engine tokenizes with the
  Hugging Face tokenizer; llama.cpp only needs a vocabulary to load the model).  The tests
  use it to check the llama.cpp decoder against torch on a tiny random model, exactly;
- ``lora_to_gguf``: a PEFT LoRA adapter (what the retrain publishes) as a llama.cpp LoRA
  adapter, applied at run time on top of the base GGUF.  Its weights stay in fp32: merging
  a PPO adapter into 4-bit weights would round most of what PPO learned away.  Written
  with ``gguf`` (ggml-org's own GGUF writer) in the layout of llama.cpp's
  ``convert_lora_to_gguf.py``: ``blk.N.attn_q.weight.lora_a`` (ne ``[n_in, r]``) and
  ``.lora_b`` (ne ``[r, n_out]``), ``adapter.lora.alpha``.  llama.cpp's Llama layout
  interleaves each attention head's rotary halves differently from Hugging Face's, so the
  rows of the ``q`` and ``k`` B matrices are permuted as ``convert_hf_to_gguf.py`` permutes
  the weights.

Converted adapters are cached by the SHA-256 of the adapter's weights, outside the version's
directory (whose manifest lists exactly its files).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
logging.getLogger("gguf.gguf_writer").setLevel(logging.WARNING)  # an INFO line per file written (each PPO step)

# PEFT module name -> GGUF tensor name (llama.cpp's Llama architecture)
_GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
_LORA_KEY = re.compile(r"layers\.(\d+)\.(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])\.weight$")


def serving_gguf(model_dir: str | Path, cache_dir: str | Path) -> Path | None:
    """The GGUF the llama.cpp decoder serves ``model_dir`` from, or None (then torch serves):

    - a ``*.gguf`` in the directory (a user's own conversion), as it is;
    - the embedded model: its safetensors (the dequantised Q4_1 GGUF) converted once to an
      fp16 GGUF under ``cache_dir``.  fp16 holds those weights exactly (teacher-forced top-1
      agreement with fp32 1.000, KL 3e-6 nats/token), where llama.cpp's own Q4_1 kernels
      quantise the activations to int8 and agree on 0.973 of tokens, under the 0.98 bar
      (``benchmarks/quant_quality.py``; docs/serving.md has the speed of each).
    """
    from assistant import models

    path = Path(model_dir)
    if not path.is_dir():
        return None
    own = sorted(path.glob("*.gguf"))
    if own:
        return own[0]
    if path.resolve().name != models.EMBEDDED_CACHE_NAME:
        return None
    try:
        vocab = models.embedded_gguf_path()
    except FileNotFoundError:
        return None
    out = Path(cache_dir) / f"{path.name}-f16.gguf"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".convert-", suffix=".gguf", dir=out.parent)
        os.close(fd)
        try:
            log.info("converting %s to an fp16 GGUF for llama.cpp (once)", path)
            hf_to_gguf(path, tmp, vocab, "float16")
            os.replace(tmp, out)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return out


def llamacpp_base(base: str | Path, cache_dir: str | Path, *, on_cpu: bool) -> tuple[Path | None, str]:
    """The GGUF llama.cpp runs the model directory ``base`` from, and "" -- or None and why
    it cannot (not on the CPU, llama-cpp-python missing, no GGUF of the model).  The server
    and the retrain's sampler both ask here."""
    from assistant.engine import llamacpp

    if not on_cpu:
        return None, "the model is not on the CPU"
    if not llamacpp.available():
        return None, "llama-cpp-python is not installed (pip install -e '.[fast]')"
    path = serving_gguf(base, cache_dir)
    return (path, "") if path else (None, f"no GGUF of {base} (a *.gguf in its directory would be served)")


def permute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face's rotary row order to llama.cpp's, per head (``convert_hf_to_gguf``'s
    ``LlamaModel.permute``; it acts on the output rows, so on a LoRA's B)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_HF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             **_GGUF_NAMES}


def hf_to_gguf(model_dir: str | Path, out: str | Path, vocab_from: str | Path, dtype: str = "float32") -> Path:
    """Writes the Llama-style model in ``model_dir`` (safetensors) as a GGUF at ``out``, with
    the tokenizer metadata of the GGUF ``vocab_from`` (same vocabulary size required)."""
    import gguf
    from safetensors.numpy import load_file

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    rope = {"rope_theta": cfg.get("rope_theta", 10000.0), "rope_type": "default",
            **(cfg.get("rope_parameters") or {}), **(cfg.get("rope_scaling") or {})}  # transformers 5 / 4
    if cfg.get("model_type") not in ("llama", "mistral") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{model_dir}: only plain Llama-style models (no RoPE scaling) are converted")
    ref = gguf.GGUFReader(str(vocab_from))
    n_vocab = len(ref.fields["tokenizer.ggml.tokens"].contents())
    if n_vocab != cfg["vocab_size"]:
        raise ValueError(f"{vocab_from} has {n_vocab} tokens, the model {cfg['vocab_size']}")
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    quantized = {"bfloat16": gguf.GGMLQuantizationType.BF16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
                 "q4_1": gguf.GGMLQuantizationType.Q4_1}
    if dtype not in ("float32", "float16", *quantized):
        raise ValueError(f"dtype must be float32, float16, bfloat16, q8_0 or q4_1, not {dtype!r}")
    tensors: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    out = Path(out)
    writer = gguf.GGUFWriter(str(out), arch="llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(cfg.get("max_position_embeddings", 2048))
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(n_head)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type({"float32": gguf.LlamaFileType.ALL_F32, "float16": gguf.LlamaFileType.MOSTLY_F16,
                          "bfloat16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                          "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[dtype])
    for name, field in ref.fields.items():
        if name.startswith("tokenizer."):
            kind = field.types[0]
            writer.add_key_value(name, field.contents(), kind, field.types[-1] if kind == gguf.GGUFValueType.ARRAY
                                 else None)
    for key, value in tensors.items():
        key = key.removeprefix("model.")
        if key == "embed_tokens.weight":
            name = "token_embd.weight"
        elif key == "norm.weight":
            name = "output_norm.weight"
        elif key == "lm_head.weight":
            name = "output.weight"
        else:
            m = re.fullmatch(r"layers\.(\d+)\.(.+)\.weight", key)
            if m is None or m.group(2) not in _HF_NAMES:
                raise ValueError(f"{key} has no llama.cpp counterpart")
            name = f"blk.{m.group(1)}.{_HF_NAMES[m.group(2)]}.weight"
            if m.group(2) == "self_attn.q_proj":
                value = permute_rows(value, n_head)
            elif m.group(2) == "self_attn.k_proj":
                value = permute_rows(value, n_kv)
        value = np.ascontiguousarray(value.astype(np.float32))
        if name.endswith("norm.weight") or dtype == "float32":  # llama.cpp keeps norms in fp32
            writer.add_tensor(name, value)
        elif dtype == "float16":
            writer.add_tensor(name, value.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(value, quantized[dtype]), raw_dtype=quantized[dtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def lora_to_gguf(adapter_dir: str | Path, out: str | Path, n_head: int, n_head_kv: int) -> Path:
    """Writes the PEFT LoRA adapter in ``adapter_dir`` as a llama.cpp LoRA GGUF at ``out``."""
    from safetensors.numpy import load_file

    adapter_dir = Path(adapter_dir)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    if config.get("use_rslora") or config.get("use_dora"):
        raise ValueError("rsLoRA and DoRA adapters are not supported by the llama.cpp decoder")
    return lora_weights_to_gguf(load_file(str(adapter_dir / "adapter_model.safetensors")),
                                float(config["lora_alpha"]), out, n_head, n_head_kv)


def lora_weights_to_gguf(weights: dict[str, np.ndarray], alpha: float, out: str | Path, n_head: int,
                         n_head_kv: int) -> Path:
    """Writes LoRA weights named as PEFT names them (``...layers.N.self_attn.q_proj.lora_A.weight``)
    with scaling ``alpha / r`` as a llama.cpp LoRA GGUF at ``out`` (atomically).  The retrain
    writes its policy's adapter this way at every PPO step, to sample its rollouts on llama.cpp."""
    import gguf

    pairs: dict[tuple[int, str], dict[str, np.ndarray]] = {}
    for key, value in weights.items():
        m = _LORA_KEY.search(key)
        if m is None:
            raise ValueError(f"adapter tensor {key} has no llama.cpp counterpart")
        pairs.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = np.asarray(value, dtype=np.float32)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lora-", suffix=".gguf", dir=out.parent)
    os.close(fd)
    try:
        writer = gguf.GGUFWriter(tmp, arch="llama")
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for (layer, module), ab in sorted(pairs.items()):
            a, b = ab["A"], ab["B"]
            if module == "self_attn.q_proj":
                b = permute_rows(b, n_head)
            elif module == "self_attn.k_proj":
                b = permute_rows(b, n_head_kv)
            name = f"blk.{layer}.{_GGUF_NAMES[module]}.weight"
            writer.add_tensor(f"{name}.lora_a", np.ascontiguousarray(a))
            writer.add_tensor(f"{name}.lora_b", np.ascontiguousarray(b))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def cached_lora_gguf(adapter_dir: str | Path, cache_dir: str | Path, n_head: int, n_head_kv: int) -> Path:
    """``lora_to_gguf`` once per adapter content, under ``cache_dir``."""
    digest = hashlib.sha256(Path(adapter_dir, "adapter_model.safetensors").read_bytes()).hexdigest()[:24]
    out = Path(cache_dir) / f"lora-{digest}.gguf"
    return out if out.exists() else lora_to_gguf(adapter_dir, out, n_head, n_head_kv)
