"""How informative are regenerate-and-compare votes?  The decisive-vote rate per oracle when
answer B is written in different ways (the learning issue: same-model B answers mostly tie).

    python benchmarks/comparisons.py --prompts 48          # embedded model, every oracle

For each prompt, answer A is sampled at the serving settings (temperature 0.7, top-p 0.9)
and answer B by each *variant*:

- ``same``: the same settings (what regenerate does without a canary);
- ``hot``: temperature 1.0, top-p 0.95 (more varied wording);
- ``style``: the same settings, with one hidden style hint added to the system prompt
  (brief / detailed / a list / plain prose), chosen at random per answer.

Every shipped oracle except the null control judges each (A, B) pair in a random order; the
table gives the share of decisive votes (not "tie") and the mean words of A and B.  Sampling
is the gate's batched sampler (``retrain.gate.generate``), so it runs without the app.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from assistant import models  # noqa: E402
from benchmarks.oracles import ORACLES  # noqa: E402
from retrain.data import load_seed_prompts  # noqa: E402
from retrain.gate import GateConfig, generate  # noqa: E402

SYSTEM = "You are a helpful AI assistant."
STYLES = ["Answer briefly.", "Answer in detail.", "Answer with a bulleted list.", "Answer in plain prose, no lists."]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="embedded", help="model (default: the embedded one)")
    p.add_argument("--models-dir", default="data/models", help="where the embedded model is converted")
    p.add_argument("--prompts", type=int, default=48, help="seed prompts used (default 48)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = models.load(args.model, Path(args.models_dir), device="cpu", dtype="float32")
    rng = random.Random(args.seed)
    prompts = load_seed_prompts()[: args.prompts]
    plain = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}] for q in prompts]
    styled = [[{"role": "system", "content": f"{SYSTEM} {rng.choice(STYLES)}"}, {"role": "user", "content": q}]
              for q in prompts]
    base = GateConfig(temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens, batch_size=16)
    hot = GateConfig(temperature=1.0, top_p=0.95, max_new_tokens=args.max_new_tokens, batch_size=16)
    a, *_ = generate(loaded, plain, base, args.seed)
    variants = {"same": generate(loaded, plain, base, args.seed + 1)[0],
                "hot": generate(loaded, plain, hot, args.seed + 2)[0],
                "style": generate(loaded, styled, base, args.seed + 3)[0]}
    words = lambda xs: sum(len(x.split()) for x in xs) / len(xs)  # noqa: E731
    names = [n for n in ORACLES if n != "random"]
    print(f"{len(prompts)} prompts, answer A: mean {words(a):.0f} words\n")
    print("| variant | words B | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for variant, b in variants.items():
        cells = []
        for name in names:
            oracle = ORACLES[name]
            decisive = 0
            for msgs, x, y in zip(plain, a, b):
                flip = rng.random() < 0.5
                verdict = oracle(msgs, y, x) if flip else oracle(msgs, x, y)
                decisive += verdict != "tie"
            cells.append(f"{decisive / len(prompts):.0%}")
        print(f"| {variant} | {words(b):.0f} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
