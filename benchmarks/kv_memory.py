"""KV cache memory of the engine for one long chat: while it streams and after it ends.

Builds a random-weight model with SmolLM2-135M-Instruct's shape (30 layers, 3 KV heads of
64, an 8192-token context; the weights do not matter for the cache) and an ``Engine`` with
the app's default ``--max-batch 8``, submits one chat of ``--prompt-tokens`` prompt tokens
that decodes exactly ``--max-new-tokens`` answer tokens, and reports:

- the bytes the decoder's KV cache holds at its peak during the chat and after it ended;
- the process's resident memory (VmRSS) before the chat, its peak (VmHWM) and after.

    python benchmarks/kv_memory.py                       # 4200 prompt + 64 answer tokens
    python benchmarks/kv_memory.py --prompt-tokens 1000 --layers 4 --json /tmp/kv.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from assistant.engine import Engine, SamplingParams  # noqa: E402

GIB = 1 << 30


def proc_status(field: str) -> int:
    """A memory figure of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def kv_bytes(engine: Engine) -> int:
    """Bytes of the decoder's KV cache (SlotDecoder: one tensor per layer)."""
    return sum(t.numel() * t.element_size() for t in getattr(engine.decoder, "kv", []))


def smollm2_shaped(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-tokens", type=int, default=4200)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)

    model = smollm2_shaped(args.layers)
    engine = Engine(model, None, max_batch=args.max_batch, stop_ids=set(), threads=args.threads)
    try:
        before = kv_bytes(engine)
        rss_before = proc_status("VmRSS")
        prompt = [int(i) for i in torch.randint(100, 40000, (args.prompt_tokens,), generator=torch.Generator()
                                                .manual_seed(1))]
        started = time.perf_counter()
        request = engine.submit(prompt, SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0,
                                                       ignore_eos=True))
        peak = 0
        for _ in request:
            peak = max(peak, kv_bytes(engine))
        wall = time.perf_counter() - started
        time.sleep(0.2)  # the decoding thread finishes the request's bookkeeping
        result = {"prompt_tokens": args.prompt_tokens, "max_new_tokens": args.max_new_tokens,
                  "max_batch": args.max_batch, "layers": args.layers, "max_context": engine.max_context,
                  "kv_bytes_idle_before": before, "kv_bytes_peak": peak, "kv_bytes_after": kv_bytes(engine),
                  "rss_before": rss_before, "rss_peak": proc_status("VmHWM"), "rss_after": proc_status("VmRSS"),
                  "wall_s": round(wall, 1)}
    finally:
        engine.close()
    for key, value in result.items():
        shown = f"{value / GIB:.3f} GiB" if key.startswith(("kv_bytes", "rss")) else value
        print(f"{key:22} {shown}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
