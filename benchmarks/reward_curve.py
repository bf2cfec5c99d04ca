"""The reward model's inner loop: out-of-fold accuracy against decisive training pairs, per
oracle and per design, on a fixed pool of answer pairs.  Minutes, not the half hour of a
whole learning run.

1. the pool (``benchmarks/reward_pool.py``): seeded answer pairs from the app's own serving
   path over the training prompts, disjoint from the held-out prompts; built once and cached
   under ``--data-dir`` (``--build-pool`` only builds it);
2. features of every answer from the frozen SFT model, every layer at once, cached beside it
   (any feature spec is a slice of these, equal to what ``retrain.features`` computes);
3. every oracle labels every pair (its decisive rate on these answers);
4. K outer folds by prompt (``--folds``, a stable hash; a prompt is never on both sides): for
   each fold and each size n, n decisive training pairs are drawn from the other folds (plus
   ties at the oracle's own tie rate, as a run would see them), a model of each design is
   trained, and the fold's decisive pairs are scored.  Accuracy is pooled over the folds, with
   its Wilson 95% interval; optimiser steps and wall time are per model;
5. a table, and ``--out`` JSON.

``--length-axis`` adds a second score per model: each test-fold answer (four sentences or
more) against its own first half (whole sentences, so it ends), how often the model agrees
with the oracle's decisive verdicts.  Vote-like pairs differ little in length, but PPO moves
along that axis first (``benchmarks/run_report.py`` checks the same on a run's gate answers).

``--logged DIR,DIR`` takes the pool from learning runs' data directories instead: every answer
pair their users saw where both answers came from the SFT model, relabelled by each oracle
(``reward_pool.logged_pool``).

Designs (``--designs``, comma-separated):
- ``lora``: the LoRA reward model on the top layers (``retrain.reward``), early-stopped;
- ``linear``, ``linear-ens5``, ``mlp-ens5`` ...: heads on frozen features
  (``retrain.head_rm``), one head or an ensemble of k; ``@8/16/24`` picks the pooled layers,
  ``+last`` adds the end-of-turn state, ``-nolen`` drops the length feature, ``+count`` adds each
  pooled layer's mean times sqrt(answer tokens) (between a rate and a count), ``+prompt`` /
  ``-noprompt`` always / never reads the prompt-answer interaction (by default: as
  ``reward.feature_prompt``, ``auto``, which trains both and keeps the one that validates better).

    python benchmarks/reward_curve.py                          # every shipped oracle, the default designs
    python benchmarks/reward_curve.py --oracle concise,mypkg.tastes:formal --designs linear-ens5,lora
    python benchmarks/reward_curve.py --logged runs/a,runs/b --designs linear-ens5,linear-ens5+count \
        --sizes 256 --length-axis
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks import oracles  # noqa: E402
from benchmarks.reward_pool import add_pool_args, build_pool, load_pool, logged_pool, pool_settings  # noqa: E402
from retrain.data import Pair, _key  # noqa: E402
from retrain.features import FeatureSpec  # noqa: E402
from retrain.reward import RewardConfig, wilson  # noqa: E402

DEFAULT_ORACLES = ",".join(oracles.ORACLES)
DEFAULT_DESIGNS = "linear,linear-ens5,mlp-ens5"


# ----------------------------------------------------------------------------- features of the pool
def feature_bank(sft: str, rows: list[dict], pool_path: Path, max_length: int, dtype_name: str = "auto") -> dict:
    """Per answer (a, b of every row): every layer's mean over the answer span, every layer's
    end-of-turn state, and log(1 + span tokens).  Cached beside the pool."""
    from assistant import models
    from retrain.backbone import frozen_dtype, pad_left
    from retrain.features import layer_states, prefix_features, span_mask

    loaded = models.load(sft, Path(sft).parent, device="cpu", dtype="float32")
    model, tok = loaded.model.eval().requires_grad_(False), loaded.tokenizer
    dtype = frozen_dtype(dtype_name, torch.device("cpu"))
    out = pool_path.with_name(pool_path.stem + f"-features-{str(dtype).removeprefix('torch.')}-{max_length}.pt")
    from tqdm.auto import tqdm

    from retrain.backbone import encode_with_start

    if out.exists():
        bank = torch.load(out)
        if "prompt_means" not in bank:  # a bank cached before prompt features: add them
            bank["prompt_means"] = prompt_means(model, tok, rows, max_length, dtype)
            torch.save(bank, out)
        return bank

    n_layers = model.config.num_hidden_layers
    spec = FeatureSpec(layers=tuple(range(1, n_layers + 1)), last=False, length=True)
    items = [(r["prompt"], r[k]) for r in rows for k in ("a", "b")]
    enc = [encode_with_start(tok, p, a, max_length) for p, a in items]
    order = sorted(range(len(enc)), key=lambda i: len(enc[i][0]))
    H = model.config.hidden_size
    means = torch.zeros(len(enc), n_layers, H)
    lasts = torch.zeros(len(enc), n_layers, H)
    length = torch.zeros(len(enc))
    t0 = time.perf_counter()
    for j in tqdm(range(0, len(order), 8), desc="features of the pool"):
        idx = order[j:j + 8]
        ids, mask = pad_left([enc[i][0] for i in idx], tok.pad_token_id)
        states = layer_states(model, ids, mask, spec.layers, dtype)
        feats = prefix_features(states, span_mask(mask, torch.tensor([enc[i][1] for i in idx])), spec)[:, -1]
        for r, i in enumerate(idx):
            means[i] = feats[r, :-1].view(n_layers, H)
            lasts[i] = torch.stack([states[layer][r, -1] for layer in spec.layers])
            length[i] = feats[r, -1]
    bank = {"means": means, "lasts": lasts, "length": length, "tokens": sum(len(e[0]) for e in enc),
            "seconds": time.perf_counter() - t0, "dtype": str(dtype),
            "prompt_means": prompt_means(model, tok, rows, max_length, dtype)}
    torch.save(bank, out)
    return bank


def prompt_means(model, tok, rows: list[dict], max_length: int, dtype) -> torch.Tensor:
    """[N answers, layers, H]: every layer's mean over each answer's prompt (the real tokens
    before its span, as ``retrain.features`` pools them); computed once per distinct prompt."""
    from retrain.backbone import encode_with_start
    from retrain.features import layer_states

    n_layers = model.config.num_hidden_layers
    heads, memo = [], {}
    for r in rows:
        for k in ("a", "b"):
            ids, start = encode_with_start(tok, r["prompt"], r[k], max_length)
            heads.append(tuple(ids[:start]))
    for h in set(heads):
        ids = torch.tensor([list(h)])
        states = layer_states(model, ids, torch.ones_like(ids), tuple(range(1, n_layers + 1)), dtype)
        memo[h] = torch.stack([states[layer][0].mean(0) for layer in range(1, n_layers + 1)])
    return torch.stack([memo[h] for h in heads])


def features_of(bank: dict, spec: FeatureSpec) -> torch.Tensor:
    """[N answers, D]: exactly ``retrain.features``' vector for ``spec``."""
    parts = [bank["means"][:, layer - 1] for layer in spec.layers]
    if spec.last:
        parts.append(bank["lasts"][:, spec.layers[-1] - 1])
    if spec.length:
        parts.append(bank["length"][:, None])
    if spec.prompt:
        parts += [bank["prompt_means"][:, layer - 1] for layer in spec.layers]
    return torch.cat(parts, -1)


# ----------------------------------------------------------------------------- designs
@dataclasses.dataclass
class Design:
    name: str
    kind: str  # "lora" | "linear" | "mlp"
    ensemble: int = 1
    spec: FeatureSpec = dataclasses.field(default_factory=FeatureSpec)
    prompt: str = "auto"  # RewardConfig.feature_prompt
    count: bool = False  # + each pooled mean times sqrt(tokens) (``with_counts``)


def parse_design(name: str, default_spec: FeatureSpec, default_prompt: str = "auto") -> Design:
    m = re.fullmatch(r"(lora|linear|mlp)(?:-ens(\d+))?(?:@([\d/]+))?(\+last)?(-nolen)?(\+count)?(\+prompt|-noprompt)?",
                     name)
    if not m:
        raise ValueError(f"design {name!r}: use lora, or "
                         "linear|mlp[-ensK][@L1/L2/..][+last][-nolen][+count][+prompt|-noprompt]")
    kind, ens, layers, last, nolen, count, prompt = m.groups()
    mode = {"+prompt": "on", "-noprompt": "off", None: default_prompt}[prompt]
    spec = FeatureSpec(layers=tuple(int(x) for x in layers.split("/")) if layers else default_spec.layers,
                       last=bool(last) or (default_spec.last and not layers), length=not nolen, prompt=mode != "off")
    return Design(name, kind, int(ens or 1), spec, mode, bool(count))


def with_counts(bank: dict, spec: FeatureSpec) -> tuple[dict, FeatureSpec]:
    """The bank with each layer's mean times sqrt(answer tokens) as layers L+1..2L (the prompt's
    means repeated for them), and ``spec`` reading both: a head can then weigh an answer's
    features as a rate, a count, or in between."""
    n_layers = bank["means"].shape[1]
    scale = torch.expm1(bank["length"]).clamp(min=1).sqrt()[:, None, None]
    out = dict(bank, means=torch.cat([bank["means"], bank["means"] * scale], 1),
               prompt_means=torch.cat([bank["prompt_means"], bank["prompt_means"]], 1))
    return out, dataclasses.replace(spec, layers=spec.layers + tuple(n_layers + x for x in spec.layers))


def halves(rows: list[dict]) -> list[dict]:
    """The length axis's rows: each answer of four sentences or more (a: whole) against its
    own first half (b), with the index of its pair (``src``)."""
    out = []
    for i, r in enumerate(rows):
        for k in ("a", "b"):
            h = oracles.first_half(r[k])
            if h:
                out.append({"prompt": r["prompt"], "a": r[k], "b": h, "src": i})
    return out


def label(rows: list[dict], oracle) -> list[tuple[int, float]]:
    """(row index, index of the chosen answer (0 = a, 1 = b), label: 1 decisive, 0.5 a tie)
    for every pair, as the oracle judges it."""
    out = []
    for i, r in enumerate(rows):
        v = oracle(r["prompt"], r["a"], r["b"])
        if v == "a":
            out.append((i, 0, 1.0))
        elif v == "b":
            out.append((i, 1, 1.0))
        else:
            out.append((i, 0, 0.5))
    return out


def outer_fold(row: dict, k: int) -> int:
    from retrain.head_rm import inner_fold

    return inner_fold("outer:" + _key(row["prompt"]), k)


def train_heads(design: Design, feats: torch.Tensor, rows, train, cfg: RewardConfig, hidden: int):
    from retrain.head_rm import HeadData, train_selected

    ci = torch.tensor([2 * i + c for i, c, _ in train])
    ri = torch.tensor([2 * i + 1 - c for i, c, _ in train])
    data = HeadData(feats[ci], feats[ri], torch.tensor([y for _, _, y in train]), torch.ones(len(train)),
                    feats[:0], torch.zeros(0), torch.zeros(0), [_key(rows[i]["prompt"]) for i, _, _ in train], [])
    hcfg = dataclasses.replace(cfg, head=design.kind, ensemble=design.ensemble, feature_prompt=design.prompt)
    ens, metrics = train_selected(data, hcfg, design.spec, hidden)
    return ens, metrics


class LoraBench:
    """The LoRA design: a fresh ``retrain.reward`` model per training set, the frozen lower
    layers' states cached once for the whole pool."""

    def __init__(self, sft: str, cfg: RewardConfig):
        self.sft, self.cfg, self.cache = sft, cfg, None

    def train(self, rows, train):
        from retrain.reward import new_reward_model, train_reward_model

        rm = new_reward_model(self.sft, self.cfg, None, "cpu")
        self.cache = self.cache or rm.cache(self.cfg.lower_batch)
        pairs = [Pair(str(i), "", "", rows[i]["prompt"], rows[i]["ab"[c]], rows[i]["ab"[1 - c]],
                      "regenerate" if y == 1.0 else "tie", y, 1.0, 0) for i, c, y in train]
        metrics = train_reward_model(rm, pairs, [], self.cfg, cache=self.cache, phase="curve")

        def score(idx):
            items = [(rows[j // 2]["prompt"], rows[j // 2]["ab"[j % 2]]) for j in idx.tolist()]
            return rm.scores_of(self.cache.get(rm.model, [rm.encode(p, a) for p, a in items], "curve: test"))
        return score, {"steps": metrics.steps, "stopped": metrics.stopped, "train_loss": metrics.train_loss}


def agreement(score, items: list[tuple[int, int, float]]) -> tuple[float, int]:
    """(correct, n) of a scorer of answer indices on decisive (row, chosen) items."""
    if not items:
        return 0.0, 0
    with torch.no_grad():
        margin = (score(torch.tensor([2 * i + c for i, c, _ in items]))
                  - score(torch.tensor([2 * i + 1 - c for i, c, _ in items]))).float()
    return float((margin > 0).sum() + 0.5 * (margin == 0).sum()), len(items)


def curve(rows, labels, bank, designs: list[Design], sizes: list[int], k: int, cfg: RewardConfig, lora: LoraBench | None,
          lora_folds: int, seed: int = 0, probe: tuple[list, list, dict] | None = None) -> dict:
    """Out-of-fold accuracy per (design, size); with ``probe`` (``halves`` rows, their labels,
    their bank) the length axis's agreement too."""
    folds = [outer_fold(r, k) for r in rows]
    decisive = [x for x in labels if x[2] == 1.0]
    ties = [x for x in labels if x[2] == 0.5]
    tie_ratio = len(ties) / max(1, len(decisive))
    results = {}
    for design in designs:
        feats = pfeats = None
        if design.kind != "lora":
            b, pb, spec = bank, probe[2] if probe else None, design.spec
            if design.count:
                b, spec = with_counts(bank, design.spec)
                pb = with_counts(pb, design.spec)[0] if pb else None
            design = dataclasses.replace(design, spec=spec)
            feats = features_of(b, spec)
            pfeats = features_of(pb, spec) if pb else None
        for n in sizes:
            correct, total, steps, walls, skipped, interactions = 0.0, 0, [], [], None, []
            p_correct, p_total = 0.0, 0
            for f in range(k if design.kind != "lora" else min(k, lora_folds)):
                test = [x for x in decisive if folds[x[0]] == f]
                pool_d = [x for x in decisive if folds[x[0]] != f]
                pool_t = [x for x in ties if folds[x[0]] != f]
                if n > len(pool_d):
                    skipped = f"only {len(pool_d)} decisive training pairs outside a fold"
                    break
                rng = random.Random(seed * 1000 + f)
                train = rng.sample(pool_d, n) + rng.sample(pool_t, min(len(pool_t), round(n * tie_ratio)))
                t0 = time.perf_counter()
                if design.kind == "lora":
                    score, m = lora.train(rows, train)
                else:
                    ens, m = train_heads(design, feats, rows, train, cfg, bank["means"].shape[-1])
                    score = lambda idx, ens=ens, x=feats: ens(x[idx])  # noqa: E731
                    interactions.append(bool(m["interaction"]))
                    if pfeats is not None:
                        c, t = agreement(lambda idx, ens=ens, x=pfeats: ens(x[idx]),
                                         [x for x in probe[1] if x[2] == 1.0 and folds[probe[0][x[0]]["src"]] == f])
                        p_correct, p_total = p_correct + c, p_total + t
                walls.append(time.perf_counter() - t0)
                steps.append(m["steps"])
                c, t = agreement(score, test)
                correct, total = correct + c, total + t
            if skipped:
                results[(design.name, n)] = {"skipped": skipped}
                continue
            lo, hi = wilson(correct, total)
            results[(design.name, n)] = {"accuracy": correct / max(1, total), "ci_low": lo, "ci_high": hi,
                                         "n_test": total, "steps": sum(steps) / len(steps),
                                         "wall_s": sum(walls) / len(walls), "folds": len(walls),
                                         "interaction": sum(interactions) / max(1, len(interactions))}
            if p_total:
                results[(design.name, n)]["length_axis"] = {"agreement": p_correct / p_total, "n_test": p_total}
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_pool_args(ap)
    ap.add_argument("--build-pool", action="store_true", help="only build (or find) the pool and its features")
    ap.add_argument("--oracle", default=DEFAULT_ORACLES, help="comma-separated oracle names or module:function")
    ap.add_argument("--designs", default=DEFAULT_DESIGNS, help=f"comma-separated (default {DEFAULT_DESIGNS})")
    ap.add_argument("--sizes", default="32,64,128,256", help="decisive training pairs per point of the curve")
    ap.add_argument("--folds", type=int, default=5, help="outer folds by prompt (default 5)")
    ap.add_argument("--lora-folds", type=int, default=1, help="outer folds the (slow) lora design runs (default 1)")
    ap.add_argument("--reward-config", default=None, help="JSON with RewardConfig fields to override")
    ap.add_argument("--logged", default="", help="comma-separated learning-run data directories: the pool is their "
                                                 "logged SFT answer pairs instead (cached under --data-dir)")
    ap.add_argument("--length-axis", action="store_true",
                    help="also score each model on test answers against their own first half")
    ap.add_argument("--out", default=None, help="write the results as JSON here too")
    args = ap.parse_args(argv)

    from assistant import models
    from retrain.data import load_seed_prompts

    settings = pool_settings(args)
    pool_path = logged_pool(args.logged.split(","), args.data_dir) if args.logged else \
        build_pool(settings, load_seed_prompts(), args.pairs, args.seed)
    rows = load_pool(pool_path)
    for r in rows:
        r["ab"] = (r["a"], r["b"])
    cfg = RewardConfig(**json.loads(Path(args.reward_config).read_text())) if args.reward_config else RewardConfig()
    sft = str(models.convert_embedded(settings.models_dir)) if args.model == "embedded" else \
        models.resolve(args.model, settings.models_dir)
    bank = feature_bank(sft, rows, pool_path, cfg.max_length, cfg.frozen_dtype)
    print(f"pool: {len(rows)} pairs ({pool_path}); features: {bank['tokens']} tokens in {bank['seconds']:.0f} s "
          f"({bank['dtype']})", flush=True)
    probe_rows = probe_bank = None
    if args.length_axis:
        probe_rows = halves(rows)
        probe_bank = feature_bank(sft, probe_rows, pool_path.with_name(pool_path.stem + "-halves.jsonl"),
                                  cfg.max_length, cfg.frozen_dtype)
        print(f"length axis: {len(probe_rows)} answers against their first half", flush=True)
    if args.build_pool:
        return 0
    default_spec = cfg.feature_spec()
    designs = [parse_design(d.strip(), default_spec, cfg.feature_prompt) for d in args.designs.split(",") if d.strip()]
    sizes = [int(s) for s in args.sizes.split(",")]
    lora = LoraBench(sft, cfg) if any(d.kind == "lora" for d in designs) else None
    report = {}
    for name in args.oracle.split(","):
        labels = label(rows, oracles.get(name))
        rate = sum(y == 1.0 for _, _, y in labels) / len(labels)
        print(f"{name}: {rate:.0%} decisive", flush=True)
        probe = (probe_rows, label(probe_rows, oracles.get(name)), probe_bank) if probe_rows else None
        res = curve(rows, labels, bank, designs, sizes, args.folds, cfg, lora, args.lora_folds, args.seed, probe)
        report[name] = {"decisive_rate": rate, "points": {f"{d}@{n}": v for (d, n), v in res.items()}}
        for (d, n), v in res.items():
            if "skipped" in v:
                print(f"  {d:>22} n={n:<4} {v['skipped']}")
            else:
                print(f"  {d:>22} n={n:<4} {v['accuracy']:.3f} ({v['ci_low']:.2f}-{v['ci_high']:.2f}) "
                      f"test {v['n_test']}, {v['steps']:.0f} steps, {v['wall_s']:.1f} s/model, "
                      f"interaction in {v['interaction']:.0%} of folds"
                      + (f", length axis {v['length_axis']['agreement']:.3f} (n={v['length_axis']['n_test']})"
                         if "length_axis" in v else ""), flush=True)
    print("\n| oracle | decisive | design | " + " | ".join(f"n={n}" for n in sizes) + " | steps/model | s/model |")
    print("|---|---|---|" + "---|" * len(sizes) + "---|---|")
    for name, r in report.items():
        for d in designs:
            cells, st, wl = [], [], []
            for n in sizes:
                v = r["points"][f"{d.name}@{n}"]
                if "skipped" in v:
                    cells.append("–")
                    continue
                cells.append(f"{v['accuracy']:.2f} ({v['ci_low']:.2f}-{v['ci_high']:.2f})"
                             + (f", length axis {v['length_axis']['agreement']:.2f}" if "length_axis" in v else ""))
                st.append(v["steps"])
                wl.append(v["wall_s"])
            print(f"| {name} | {r['decisive_rate']:.0%} | {d.name} | " + " | ".join(cells)
                  + f" | {sum(st) / max(1, len(st)):.0f} | {sum(wl) / max(1, len(wl)):.1f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"pool": str(pool_path), "pairs": len(rows), "report": report,
                                              "config": dataclasses.asdict(cfg)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
