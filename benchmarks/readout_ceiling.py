"""How far can a linear head on the frozen features go, with far more supervision than votes give?

For an oracle whose taste is a number per answer (mean letters per word, hedges per word, mean
words per sentence, the on-topic rate), a ridge regression is told that number for every
answer outside a fold (about 1,280 answers of the reward pool, where 256 decisive pairs give
256 signs of differences), and the fold's decisive pairs are ranked by its predictions.  The
accuracy it reaches is what the features can tell of the taste when the data is no longer the
limit: a ceiling for any head on them.  Accuracy is also split by how far the pair is from the
oracle's tie threshold, where answers differ least.

    python benchmarks/readout_ceiling.py --data-dir /tmp/rmb      # the reward pool, cached
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import oracles  # noqa: E402
from benchmarks.reward_curve import features_of, label, outer_fold  # noqa: E402
from retrain.features import FeatureSpec  # noqa: E402
from retrain.reward import wilson  # noqa: E402


def _per_word(count):
    return lambda p, t: count(t) / max(1, oracles._words(t))


def _sentence_len(p, t):
    ss = oracles._sentences(t)
    return sum(oracles._words(s) for s in ss) / max(1, len(ss))


def _topic_rate(p, t):
    q = oracles._content_words(oracles._user_text(p))
    words = re.findall(r"[a-z]+", (t or "").lower())
    return sum(w in q for w in words) / max(1.0, len(words)) ** 0.5


STATS = {"plain_words": lambda p, t: oracles._letters_per_word(t), "no_hedging": _per_word(oracles._hedges),
         "no_first_person": _per_word(oracles._first_person), "short_sentences": _sentence_len,
         "on_topic": _topic_rate, "concise": lambda p, t: float(oracles._words(t))}


def ridge(X: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    mu, sd = X.mean(0), X.std(0).clamp(min=1e-4)
    Z = torch.cat([(X - mu) / sd, torch.ones(len(X), 1)], 1)
    # the dual form: features outnumber answers
    w = Z.T @ torch.linalg.solve(Z @ Z.T + lam * torch.eye(len(Z), dtype=Z.dtype), y - y.mean())
    return lambda Xn: torch.cat([(Xn - mu) / sd, torch.ones(len(Xn), 1)], 1) @ w + y.mean()


def ceiling(rows, bank, name: str, spec: FeatureSpec, k: int = 5, lams=(1.0, 10.0, 100.0, 1000.0)) -> dict:
    from retrain.head_rm import expander

    stat = STATS[name]
    y = torch.tensor([stat(r["prompt"], r[s]) for r in rows for s in ("a", "b")], dtype=torch.float64)
    X = features_of(bank, spec).double()
    if spec.prompt:
        X = expander(spec, bank["means"].shape[-1], True).double().fit(X)(X)
    labels = [x for x in label(rows, oracles.get(name)) if x[2] == 1.0]
    folds = [outer_fold(r, k) for r in rows]
    answer_fold = torch.tensor([folds[j // 2] for j in range(2 * len(rows))])
    best = None
    for lam in lams:
        pred = torch.zeros_like(y)
        for f in range(k):
            tr, te = answer_fold != f, answer_fold == f
            pred[te] = ridge(X[tr], y[tr], lam)(X[te])
        r2 = 1 - float(((pred - y) ** 2).mean() / y.var())
        if best is None or r2 > best[0]:
            best = (r2, lam, pred)
    r2, lam, pred = best
    sign = 1.0 if name != "on_topic" else -1.0  # the oracle prefers the lower number, except on_topic
    bins = {"near the tie threshold": [], "further": []}
    correct = []
    for i, c, _ in labels:
        ya, yb = float(y[2 * i + c]), float(y[2 * i + 1 - c])  # chosen, rejected
        pa, pb = float(pred[2 * i + c]), float(pred[2 * i + 1 - c])
        ok = float(sign * (pa - pb) < 0)
        correct.append(ok)
        rel = abs(ya - yb) / max(abs(ya), abs(yb), 1e-9)
        bins["near the tie threshold" if rel < 2 * _threshold(name) else "further"].append(ok)
    lo, hi = wilson(sum(correct), len(correct))
    return {"r2": r2, "lambda": lam, "accuracy": sum(correct) / len(correct), "ci": (lo, hi), "n": len(correct),
            "bins": {b: (sum(v) / max(1, len(v)), len(v)) for b, v in bins.items()}}


def _threshold(name: str) -> float:
    return {"plain_words": 0.03, "short_sentences": 0.1, "on_topic": 0.15, "concise": 0.1}.get(name, 0.0) or 0.25


def main(argv: list[str] | None = None) -> int:
    from assistant import models
    from benchmarks.reward_curve import feature_bank
    from benchmarks.reward_pool import add_pool_args, build_pool, load_pool, pool_settings
    from retrain.data import load_seed_prompts
    from retrain.reward import RewardConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pool_args(ap)
    ap.add_argument("--oracle", default=",".join(STATS), help=f"comma-separated, of {', '.join(STATS)}")
    args = ap.parse_args(argv)
    settings = pool_settings(args)
    pool_path = build_pool(settings, load_seed_prompts(), args.pairs, args.seed)
    rows = load_pool(pool_path)
    cfg = RewardConfig()
    sft = str(models.convert_embedded(settings.models_dir)) if args.model == "embedded" else \
        models.resolve(args.model, settings.models_dir)
    bank = feature_bank(sft, rows, pool_path, cfg.max_length, cfg.frozen_dtype)
    print("| oracle | features | R² of the number | pairwise accuracy (95% CI) | near the tie threshold | further |")
    print("|---|---|---|---|---|---|")
    for name in args.oracle.split(","):
        for spec, what in ((cfg.feature_spec().__class__(layers=cfg.feature_spec().layers), "answer"),
                           (cfg.feature_spec(), "answer + interaction")):
            r = ceiling(rows, bank, name, spec)
            (na, nn), (fa, fn) = r["bins"]["near the tie threshold"], r["bins"]["further"]
            print(f"| {name} | {what} | {r['r2']:.2f} | {r['accuracy']:.2f} ({r['ci'][0]:.2f}-{r['ci'][1]:.2f}), "
                  f"n={r['n']} | {na:.2f} (n={nn}) | {fa:.2f} (n={fn}) |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
