"""Cost of PII scrubbing per stored message, as a ratio to the previous regex-only scrubber.

``feedback.pii.scrub`` runs on every message and answer before it is stored.  It now asks
libphonenumber and python-stdnum to validate candidates, which costs more than bare regexes;
this script measures how much more, on three texts, against the regex scrubber the project
shipped before (read from git, commit ``--baseline``), in the same process and run:

    python benchmarks/pii_speed.py
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from feedback.pii import scrub  # noqa: E402

TEXTS = {
    "prose, 3.8 kB": ("The river runs past the old mill and through the valley, where the farmers grow wheat "
                      "and barley in the summer months. ") * 35,
    "answer with numbers, 3.6 kB": ("Step 3: set lr to 3e-4 (version 2.1.0), batch 32, run for 1500 steps; "
                                    "see ISBN 978-3-16-148410-0 and call +44 20 7946 0958 if stuck. ") * 25,
    "40 of each identifier, 5.8 kB": ("In 2024 the build 3.12.1 ran 1500 steps at 3.14159 lr, see ISBN "
                                      "978-3-16-148410-0; call +44 20 7946 0958 or mail ops@example.com "
                                      "from 10.1.2.3. ") * 40,
}


def best_of(fn, text: str, repeat: int) -> float:
    fn(text)  # warm caches (phone metadata)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(text)
        best = min(best, time.perf_counter() - t0)
    return best


def baseline(commit: str):
    """The old ``scrub`` from git, loaded as a module of its own."""
    source = subprocess.run(["git", "show", f"{commit}:feedback/pii.py"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType("pii_baseline")
    exec(compile(source, "pii_baseline.py", "exec"), module.__dict__)
    return module.scrub


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="556e781", help="git commit holding the regex-only scrubber")
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args(argv)
    old = baseline(args.baseline)
    print("| text | scrub (ms) | regex-only scrubber (ms) | ratio |\n|---|---|---|---|")
    for name, text in TEXTS.items():
        new_s, old_s = best_of(scrub, text, args.repeat), best_of(old, text, args.repeat)
        print(f"| {name} | {new_s * 1e3:.2f} | {old_s * 1e3:.2f} | {new_s / old_s:.1f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
