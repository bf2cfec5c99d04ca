"""How many votes does a reward model need?  A learning curve per oracle, from logged answers.

The learning benchmark (``benchmarks/learning.py``) asks each oracle for 300 votes.  When an
oracle calls most of them ties, the reward model sees only a few dozen decisive pairs; this
script measures what that costs and what more votes would buy, without running the app:

1. read the decided comparisons (answer A, answer B, context) from one or more feedback
   stores, e.g. the data directories the learning benchmark left behind;
2. re-label every pair with each oracle: its decisive-vote rate on these very answers;
3. hold out a fixed test set of decisive pairs (a stable hash of the prompt, so a prompt is
   never on both sides);
4. for each training size n, train a fresh reward model exactly as the retrain does
   (``retrain.reward``, same config) on n decisive pairs plus the ties that came with them,
   and measure its accuracy on the test set, with a Wilson 95% interval;
5. print a table: oracle, decisive rate, n, accuracy (CI), and the votes that n decisive
   pairs cost at that rate.

    python benchmarks/reward_curve.py --store /tmp/bench/lists1 --store /tmp/bench/lists2 \\
        --oracle lists,concise,no_first_person --sizes 16,32,64,128

The SFT model's frozen lower layers are computed once and shared by every model trained here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import oracles  # noqa: E402
from feedback.store import FeedbackStore  # noqa: E402
from retrain.data import Pair, _messages, fold_of  # noqa: E402
from retrain.reward import RewardConfig, accuracy_of, new_reward_model, pair_margins, train_reward_model  # noqa: E402


def load_comparisons(stores: list[str]) -> list[tuple[list[dict], str, str, str]]:
    """(prompt messages, answer A, answer B, id) of every regenerate comparison with two answers."""
    out = []
    for path in stores:
        db = Path(path)
        store = FeedbackStore(db / "feedback.sqlite" if db.is_dir() else db)
        for r in store.usable_comparisons():
            prompt = _messages(r["context"])
            if r["verdict"] in ("a", "b", "tie") and r["a_text"] and r["b_text"] and r["a_text"] != r["b_text"] \
                    and prompt and prompt[-1]["role"] == "user":
                out.append((prompt, r["a_text"], r["b_text"], r["id"]))
        store.close()
    return out


def relabel(rows, oracle) -> tuple[list[Pair], list[Pair]]:
    """Decisive pairs and ties as the oracle calls them."""
    decisive, ties = [], []
    for prompt, a, b, rid in rows:
        verdict = oracle(prompt, a, b)
        if verdict == "tie":
            ties.append(Pair(rid, "", "", prompt, b, a, "tie", 0.5, 1.0, fold_of(prompt)))
        else:
            chosen, rejected = (a, b) if verdict == "a" else (b, a)
            decisive.append(Pair(rid, "", "", prompt, chosen, rejected, "regenerate", 1.0, 1.0, fold_of(prompt)))
    return decisive, ties


def curve(sft: str, decisive: list[Pair], ties: list[Pair], sizes: list[int], n_test: int, cfg: RewardConfig,
          cache_holder: dict) -> list[dict]:
    """Test accuracy of a fresh reward model per training size."""
    test = [p for p in decisive if p.fold == 1][:n_test]
    pool = [p for p in decisive if p.fold == 0]
    tie_pool = [p for p in ties if p.fold == 0]
    ratio = len(ties) / max(1, len(decisive))
    rows = []
    for n in sizes:
        if n > len(pool):
            rows.append({"n": n, "skipped": f"only {len(pool)} decisive training pairs"})
            continue
        train = pool[:n] + tie_pool[:min(len(tie_pool), round(n * ratio), cfg.batch_size * 32)]
        rm = new_reward_model(sft, cfg, None, "cpu")
        cache = cache_holder.setdefault("cache", rm.cache(cfg.lower_batch))
        t0 = time.perf_counter()
        metrics = train_reward_model(rm, train, [], cfg, cache=cache, phase="curve")
        acc = accuracy_of(pair_margins(rm, test, cache), test)
        rows.append({"n": n, "n_ties": len(train) - n, "accuracy": acc["accuracy"], "ci_low": acc["ci_low"],
                     "ci_high": acc["ci_high"], "n_test": acc["n"], "train_loss": metrics.train_loss,
                     "wall_s": round(time.perf_counter() - t0, 1)})
        print(f"  n={n}: accuracy {acc['accuracy']:.2f} ({acc['ci_low']:.2f}-{acc['ci_high']:.2f}), "
              f"{rows[-1]['wall_s']} s", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", action="append", required=True, help="feedback.sqlite or a data directory; repeatable")
    ap.add_argument("--oracle", default="lists,concise,no_first_person,no_markdown,question_back",
                    help="comma-separated oracle names or module:function")
    ap.add_argument("--sizes", default="16,32,64,128", help="decisive training pairs per point of the curve")
    ap.add_argument("--test", type=int, default=80, help="decisive test pairs at most")
    ap.add_argument("--model", default=None, help="SFT model directory (default: the embedded model, converted)")
    ap.add_argument("--reward-config", default=None, help="JSON with RewardConfig fields to override")
    ap.add_argument("--out", default=None, help="write the results as JSON here too")
    args = ap.parse_args(argv)

    from assistant import models
    from assistant.settings import Settings

    sft = args.model or str(models.convert_embedded(Settings().data_path / "models"))
    cfg = RewardConfig(**json.loads(Path(args.reward_config).read_text())) if args.reward_config else RewardConfig()
    rows = load_comparisons(args.store)
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"{len(rows)} answer pairs from {len(args.store)} store(s); reward config {dataclasses.asdict(cfg)}")
    results, holder = {}, {}
    for name in args.oracle.split(","):
        decisive, ties = relabel(rows, oracles.get(name))
        rate = len(decisive) / max(1, len(rows))
        print(f"{name}: {len(decisive)} decisive of {len(rows)} ({rate:.0%})", flush=True)
        results[name] = {"decisive": len(decisive), "pairs": len(rows), "rate": rate,
                         "curve": curve(sft, decisive, ties, sizes, args.test, cfg, holder)}
    print("\n| oracle | decisive rate | decisive train pairs | votes at that rate | accuracy (95% CI), test n |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        for pt in r["curve"]:
            if "skipped" in pt:
                print(f"| {name} | {r['rate']:.0%} | {pt['n']} | {pt['n'] / max(r['rate'], 1e-9):.0f} | {pt['skipped']} |")
            else:
                print(f"| {name} | {r['rate']:.0%} | {pt['n']} | {pt['n'] / max(r['rate'], 1e-9):.0f} | "
                      f"{pt['accuracy']:.2f} ({pt['ci_low']:.2f}-{pt['ci_high']:.2f}), n={pt['n_test']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
