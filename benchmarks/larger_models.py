"""What a larger model costs to serve on a CPU: memory per stream and for the weights, and a
random-weight copy of it to run the serving benchmark on (no download: the configs below
are the published ones, written out).

    python benchmarks/larger_models.py                                 # the memory plan
    python benchmarks/larger_models.py --build smollm2-360m --out /tmp/smollm2-360m-random
    python benchmarks/serving.py --model /tmp/smollm2-360m-random --threads 2 --vs-llamacpp \
        --llamacpp-gguf /tmp/smollm2-360m-random.q4_1.gguf

``--build`` also writes, as the embedded model gets them, an fp16 GGUF in the directory
(``model-f16.gguf``: what the app's llama.cpp decoder serves) and a Q4_1 GGUF beside it
(``DIR.q4_1.gguf``: what a llama.cpp user would run instead); ``--no-gguf`` skips both.

Memory per stream is its KV cache: 2 (k, v) x layers x kv heads x head dim x bytes per
value, per token of prompt plus answer (the engine sizes each slot to its request).  The
weights are held once, plus, for fp32 models up to ``LAYOUTS_MAX_BYTES``, two more copies in
the layouts the decoder found fastest (``assistant/engine/decoders.py: Proj``).  The llama.cpp
decoder holds the fp16 GGUF once, and an fp16 KV cache.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Published configs (config.json on the Hugging Face Hub), the fields that size the model.
CONFIGS = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0),
    "smollm2-360m": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15,
                         num_key_value_heads=5, vocab_size=49152, rope_theta=100000.0),
    "smollm2-1.7b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=49152, rope_theta=130000.0),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, rope_theta=1000000.0),
}
GIB = 1024 ** 3


def parameters(c: dict) -> int:
    """Weights of a Llama-style model with a tied LM head."""
    h, i, n = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    d = h // c["num_attention_heads"]
    attn = h * h * 2 + 2 * h * c["num_key_value_heads"] * d  # q, o; k, v
    return c["vocab_size"] * h + n * (attn + 3 * h * i + 2 * h) + h


def kv_bytes_per_token(c: dict, bytes_per_value: int) -> int:
    d = c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * d * bytes_per_value


def plan(context: int, streams: int) -> str:
    from assistant.engine import LAYOUTS_MAX_BYTES

    rows = ["| model | parameters | torch: fp32 weights | + layout copies | KV per token (fp32) | "
            f"one {context}-token stream (fp32) | {streams} such streams + weights (torch, fp32) | "
            f"llama.cpp: fp16 GGUF | KV per token (fp16) | {streams} streams + weights (llama.cpp) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name, c in CONFIGS.items():
        p = parameters(c)
        fp32 = 4 * p
        copies = fp32 <= LAYOUTS_MAX_BYTES
        held = fp32 * (3 if copies else 1)
        kv, kv16 = kv_bytes_per_token(c, 4), kv_bytes_per_token(c, 2)
        rows.append(f"| {name} | {p / 1e6:.0f} M | {fp32 / GIB:.2f} GiB | "
                    f"{'yes: ' + format(held / GIB, '.2f') + ' GiB' if copies else 'no (over the limit)'} | "
                    f"{kv / 1024:.0f} KiB | {kv * context / GIB:.2f} GiB | "
                    f"{(held + streams * kv * context) / GIB:.1f} GiB | {2 * p / GIB:.2f} GiB | "
                    f"{kv16 / 1024:.0f} KiB | {(2 * p + streams * kv16 * context) / GIB:.1f} GiB |")
    return "\n".join(rows)


def build(name: str, out: Path, with_gguf: bool = True) -> None:
    """A random-weight model of ``name``'s shape with the embedded model's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from assistant import models

    c = CONFIGS[name]
    if c["vocab_size"] != 49152:
        raise SystemExit(f"{name} has another vocabulary than the embedded tokenizer; choose a SmolLM2 shape")
    tokenizer_src = models.load("embedded", ROOT / "data" / "models").path
    cfg = LlamaConfig(**c, max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5,
                      bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tokenizer_src).save_pretrained(out)
    for extra in ("generation_config.json",):
        src = Path(tokenizer_src) / extra
        if src.exists():
            shutil.copy(src, out / extra)
    print(f"wrote a random {name} ({parameters(c) / 1e6:.0f} M parameters) to {out}")
    if with_gguf:
        from assistant.engine import gguf

        vocab = models.embedded_gguf_path()
        served = gguf.hf_to_gguf(out, out / "model-f16.gguf", vocab, "float16")
        user = gguf.hf_to_gguf(out, out.with_name(out.name + ".q4_1.gguf"), vocab, "q4_1")
        print(f"wrote {served} (served by the llama.cpp decoder) and {user} (a llama.cpp user's Q4_1)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--context", type=int, default=4096, help="tokens per stream (prompt + answer) in the plan")
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams in the plan")
    ap.add_argument("--build", choices=sorted(CONFIGS), help="write a random-weight model of this shape")
    ap.add_argument("--out", help="directory for --build")
    ap.add_argument("--no-gguf", action="store_true", help="--build writes no GGUF files")
    args = ap.parse_args(argv)
    print(plan(args.context, args.streams))
    if args.build:
        if not args.out:
            ap.error("--build needs --out")
        build(args.build, Path(args.out), with_gguf=not args.no_gguf)
    return 0


if __name__ == "__main__":
    sys.exit(main())
