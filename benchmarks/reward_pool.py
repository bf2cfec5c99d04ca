"""A fixed, seeded pool of answer pairs: the reward-model benchmark's data, sampled once.

The learning benchmark's users chat a training prompt, regenerate and vote on the two answers.
This pool holds the same kind of pairs, sampled from the app's own serving path (the engine
and decoder the app builds for a version, ``assistant.serve.engine_factory``) over the same
training prompts (the retrain's shipped seed prompts, ``retrain/seed_prompts.txt``), with the
same sampling settings (temperature 0.7, top-p 0.9, 128-token cap, the app's system prompt).
Every answer has its own seed, so the same ``--seed`` gives the same pairs.

The pool's prompts are checked against the learning benchmark's held-out prompts exactly as
the learning benchmark checks its own (``benchmarks/leakcheck.py``): no held-out prompt, and
no near-paraphrase of one, is in the pool.

The pool is cached as JSON lines under the data directory
(``<data-dir>/reward_pool/pool-<key>.jsonl``, the key a hash of everything that shapes it),
so building it costs once per machine and settings:

    python benchmarks/reward_pool.py --pairs 800          # ~10 min on 2 CPU cores, once

A pool can also be what users already saw (``logged_pool``): the answer pairs logged in
learning runs' data directories where both answers came from the SFT model, whatever the
vote said, each taste relabelling them (``reward_curve.py --logged DIR,DIR``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.leakcheck import check_disjoint  # noqa: E402

SYSTEM = "You are a helpful AI assistant."  # the app's default system prompt, as the learning benchmark uses


def load_heldout() -> list[str]:
    path = ROOT / "benchmarks" / "heldout_prompts.txt"
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def pair_seeds(seed: int, i: int) -> tuple[int, int]:
    """The sampling seeds of pair ``i``'s two answers."""
    h = hashlib.sha256(f"{seed}:{i}".encode()).digest()
    return int.from_bytes(h[:4], "little"), int.from_bytes(h[4:8], "little")


def pool_key(model_path: str, prompts: list[str], pairs: int, seed: int, sampling: dict, backend: str) -> str:
    blob = json.dumps({"model": os.path.realpath(model_path), "prompts": prompts, "pairs": pairs, "seed": seed,
                       "sampling": sampling, "backend": backend, "system": SYSTEM}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_pool(settings, prompts: list[str], pairs: int, seed: int, *, heldout: list[str] | None = None,
               concurrency: int | None = None, rebuild: bool = False, progress: bool = True) -> Path:
    """Samples ``pairs`` answer pairs (pair ``i`` on prompt ``i mod len(prompts)``) with the
    app's engine for ``settings.model``, or returns the cached pool.  Returns its path."""
    from tqdm.auto import tqdm

    from assistant import models
    from assistant.engine import SamplingParams
    from assistant.serve import engine_factory

    check_disjoint(load_heldout() if heldout is None else heldout, prompts)
    model_path = models.resolve(settings.model, settings.models_dir)
    sampling = {"temperature": settings.temperature, "top_p": settings.top_p,
                "max_new_tokens": settings.max_new_tokens}
    key = pool_key(model_path, prompts, pairs, seed, sampling, settings.backend)
    out = settings.data_path / "reward_pool" / f"pool-{key}.jsonl"
    if out.exists() and not rebuild:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    engine = engine_factory(settings)("pool", model_path)
    try:
        def answer(prompt: str, s: int, client: str) -> str:
            msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
            req = engine.submit(engine.encode_chat(msgs), SamplingParams(**sampling, seed=s), client=client)
            return engine.tokenizer.decode(list(req), skip_special_tokens=True).strip()

        def one(i: int) -> dict:
            prompt = prompts[i % len(prompts)]
            sa, sb = pair_seeds(seed, i)
            return {"id": f"pool-{i}", "prompt": [{"role": "system", "content": SYSTEM},
                                                   {"role": "user", "content": prompt}],
                    "a": answer(prompt, sa, f"pool-{i}"), "b": answer(prompt, sb, f"pool-{i}"), "seeds": [sa, sb]}

        t0 = time.perf_counter()
        with ThreadPoolExecutor(concurrency or settings.max_batch) as ex:
            rows = list(tqdm(ex.map(one, range(pairs)), total=pairs, desc="answer pairs", disable=not progress))
    finally:
        engine.close()
    tmp = out.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    tmp.rename(out)
    if progress:
        print(f"pool of {pairs} pairs in {time.perf_counter() - t0:.0f} s -> {out}", flush=True)
    return out


def logged_pool(data_dirs: list[str], out_dir: str | Path, version: str = "sft") -> Path:
    """The answer pairs logged in ``data_dirs`` (in that order) whose two answers both came from
    ``version``, a pair seen twice kept once, as pool rows; cached under ``out_dir/reward_pool``
    by a hash of the rows.  Returns its path."""
    from feedback.store import FeedbackStore

    rows, seen = [], set()
    for d in data_dirs:
        path = Path(d) / "feedback.sqlite"
        if not path.exists():
            raise FileNotFoundError(f"no feedback.sqlite in {d}")
        for r in FeedbackStore(path).answer_pairs_of_version(version):
            a, b = r["a_text"] or "", r["b_text"] or ""
            if not a or not b or a == b or (a, b) in seen:
                continue
            seen.add((a, b))
            rows.append({"id": f"logged-{len(rows)}", "prompt": json.loads(r["context"]), "a": a, "b": b})
    if not rows:
        raise ValueError(f"no answer pairs of version {version!r} in {', '.join(data_dirs)}")
    blob = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    out = Path(out_dir) / "reward_pool" / f"logged-{hashlib.sha256(blob.encode()).hexdigest()[:12]}.jsonl"
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(blob)
    return out


def load_pool(path: str | Path) -> list[dict]:
    return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]


def pool_settings(args: argparse.Namespace):
    from assistant.settings import Settings

    return Settings(data_dir=args.data_dir, model=args.model, temperature=args.temperature, top_p=args.top_p,
                    max_new_tokens=args.max_new_tokens, backend=args.backend, max_batch=args.concurrency)


def add_pool_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--data-dir", default="data", help="the pool is cached under DATA_DIR/reward_pool (default data)")
    ap.add_argument("--model", default="embedded", help="model that answers (default: the embedded one)")
    ap.add_argument("--pairs", type=int, default=800, help="answer pairs in the pool (default 800, at least 600)")
    ap.add_argument("--seed", type=int, default=0, help="the pool's seed (default 0)")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=0.9)
    ap.add_argument("--max-new-tokens", type=int, default=128, help="answer cap (the learning benchmark's, 128)")
    ap.add_argument("--backend", default="auto", help="the app's decoder: auto, llamacpp or torch")
    ap.add_argument("--concurrency", type=int, default=16, help="answers decoded together (the app's --max-batch)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pool_args(ap)
    ap.add_argument("--rebuild", action="store_true", help="sample again even when the pool is cached")
    args = ap.parse_args(argv)
    from retrain.data import load_seed_prompts

    path = build_pool(pool_settings(args), load_seed_prompts(), args.pairs, args.seed, rebuild=args.rebuild)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
