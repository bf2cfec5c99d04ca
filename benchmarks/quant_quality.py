"""Quality of approximate weight paths against the fp32 model, and their matmul speed.

Any quantised or approximate serving path must keep, against fp32 on teacher-forced
held-out text (the fp32 model's own greedy answers to ``benchmarks/heldout_prompts.txt``):
top-1 token agreement >= 0.98 and mean KL(fp32 || path) <= 0.01 nats per token.  This
script measures both for each candidate, plus the time of one decode-sized (1 row) and one
batch-sized (8 rows) matmul of every projection shape of the model, as ratios to fp32 in
the same run:

- ``bf16``: weights and activations in bfloat16 (oneDNN on CPUs with AVX-512 BF16);
- ``int8-dynamic``: PyTorch's dynamic quantisation (int8 per-channel weights, activations
  quantised per tensor at run time, fbgemm kernels);
- ``llamacpp``: the llama.cpp decoder the app serves with on a CPU (``--backend``): the
  model's GGUF (the embedded one's own Q4_1 file) plus, for a PPO version, its LoRA adapter
  in fp32 (its speed is end to end, in ``benchmarks/serving.py``).

It also prints each path's greedy answers beside fp32's for the first ``--side-by-side``
prompts.

    python benchmarks/quant_quality.py                      # embedded model, 20 prompts x 32 tokens
    python benchmarks/quant_quality.py --prompts 40 --tokens 64 --json /tmp/quant.json
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from assistant import models  # noqa: E402

PATHS = ("bf16", "int8-dynamic", "llamacpp")
MATMUL_PATHS = ("bf16", "int8-dynamic")  # paths whose projections are timed here


def build(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """A copy of ``model`` with its linear layers (LM head included) on ``path``."""
    if path == "bf16":
        return copy.deepcopy(model).to(torch.bfloat16)
    if path == "int8-dynamic":
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear: per_channel_dynamic_qconfig},
                                    dtype=torch.qint8)
    raise ValueError(f"unknown path {path!r}; choose from {', '.join(PATHS)}")


class Candidate:
    """A path's logits for a whole sequence, and its greedy answer to a prompt."""

    def __init__(self, reference: torch.nn.Module, path: str, loaded=None, data_dir: str = "data"):
        self.path = path
        if path == "llamacpp":
            from assistant.serve import llamacpp_decoder
            from assistant.settings import Settings

            self.decoder = llamacpp_decoder(Settings(backend="llamacpp", data_dir=data_dir, max_batch=1), loaded)
        else:
            self.model = reference if path == "fp32" else build(reference, path)

    def logits(self, seq: torch.Tensor) -> torch.Tensor:
        if self.path == "llamacpp":
            return self.decoder.teacher_forced(seq.tolist())
        return self.model(seq[None]).logits[0]

    def greedy(self, ids: list[int], n: int, stop: set[int]) -> list[int]:
        out = [int(self.logits(torch.tensor(ids))[-1].argmax())] if self.path != "llamacpp" else \
            [int(self.decoder.prefill(0, ids).argmax())]
        while len(out) < n and out[-1] not in stop:
            if self.path == "llamacpp":
                out.append(int(self.decoder.decode([out[-1]])[0].argmax()))
            else:
                out.append(int(self.logits(torch.tensor(ids + out))[-1].argmax()))
        if self.path == "llamacpp":
            self.decoder.release(0)
        return [t for t in out if t not in stop]


def agreement(reference: torch.nn.Module, candidate: Candidate, sequences: list[torch.Tensor],
              answer_starts: list[int]) -> dict:
    """Top-1 agreement and mean KL(reference || candidate) over the answer positions."""
    agree = total = 0
    kl = 0.0
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seq, start in zip(sequences, answer_starts):
            ref = reference(seq[None]).logits[0, start - 1:-1].float().log_softmax(-1)
            got = candidate.logits(seq)[start - 1:-1].float().log_softmax(-1)
            kl += (ref.exp() * (ref - got)).sum().item()
            agree += (ref.argmax(-1) == got.argmax(-1)).sum().item()
            total += ref.shape[0]
    return {"top1_agreement": agree / total, "kl_nats_per_token": kl / total, "tokens": total}


def matmul_times(model: torch.nn.Module, path: str, rows: int, repeats: int = 200) -> float:
    """Seconds for one pass over every distinct projection shape of one layer plus the LM head."""
    layer = model.model.layers[0]
    shapes = {tuple(m.weight.shape) for m in layer.modules() if isinstance(m, torch.nn.Linear)}
    shapes.add(tuple(model.lm_head.weight.shape))
    total = 0.0
    for out_f, in_f in sorted(shapes):
        lin = torch.nn.Linear(in_f, out_f, bias=False)
        mod = build(torch.nn.Sequential(lin), path) if path != "fp32" else lin
        x = torch.randn(rows, in_f, dtype=torch.bfloat16 if path == "bf16" else torch.float32)
        with torch.inference_mode():
            for _ in range(10):
                mod(x)
            start = time.perf_counter()
            for _ in range(repeats):
                mod(x)
        total += (time.perf_counter() - start) / repeats
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("--model", default="embedded", help="model spec as the app takes it")
    ap.add_argument("--data-dir", default="data", help="the app's data directory (model cache in <dir>/models)")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated candidates")
    ap.add_argument("--prompts", type=int, default=20, help="held-out prompts")
    ap.add_argument("--tokens", type=int, default=32, help="greedy answer tokens per prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--side-by-side", type=int, default=3, help="prompts whose greedy answers are printed")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = models.load(args.model, Path(args.data_dir).expanduser() / "models")
    model, tok = loaded.model.eval(), loaded.tokenizer
    prompts = [p.strip() for p in (ROOT / "benchmarks" / "heldout_prompts.txt").read_text().splitlines()
               if p.strip() and not p.lstrip().startswith("#")][: args.prompts]  # (the file's header is comments)
    sequences, starts = [], []
    with torch.inference_mode():
        for p in prompts:
            ids = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True)["input_ids"]
            out = model.generate(torch.tensor([ids]), max_new_tokens=args.tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
            sequences.append(out[0])
            starts.append(len(ids))
    results = {}
    fp32 = {rows: matmul_times(model, "fp32", rows) for rows in (1, 8)}
    print(f"{'path':14s}{'top-1 agree':>12s}{'KL nats/tok':>13s}{'matmul x fp32 (1 row)':>23s}{'(8 rows)':>10s}  verdict")
    candidates = {}
    for path in [p for p in args.paths.split(",") if p]:
        cand = candidates[path] = Candidate(model, path, loaded, args.data_dir)
        q = agreement(model, cand, sequences, starts)
        speed = ({rows: fp32[rows] / matmul_times(model, path, rows) for rows in (1, 8)} if path in MATMUL_PATHS
                 else {1: float("nan"), 8: float("nan")})
        ok = q["top1_agreement"] >= 0.98 and q["kl_nats_per_token"] <= 0.01
        results[path] = {**q, "speedup_1_row": speed[1], "speedup_8_rows": speed[8], "acceptable": ok}
        print(f"{path:14s}{q['top1_agreement']:12.4f}{q['kl_nats_per_token']:13.4f}{speed[1]:23.2f}{speed[8]:10.2f}  "
              f"{'ok' if ok else 'REJECTED (needs agreement >= 0.98 and KL <= 0.01)'}", flush=True)
    print(f"({results and next(iter(results.values()))['tokens']} answer tokens teacher-forced; speed: one layer's "
          f"projections plus the LM head, {args.threads} thread(s); nan: timed end to end in serving.py)")
    stop = models.stop_token_ids(model, tok)
    reference = Candidate(model, "fp32")
    for p, seq, start in list(zip(prompts, sequences, starts))[: args.side_by_side]:
        ids = seq[:start].tolist()
        print(f"\n## {p}")
        with torch.inference_mode():
            for name, cand in [("fp32", reference), *candidates.items()]:
                answer = tok.decode(cand.greedy(ids, args.tokens, stop), skip_special_tokens=True)
                print(f"  {name:12s} {' '.join(answer.split())}")
                results.setdefault("side_by_side", {}).setdefault(p, {})[name] = answer
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
