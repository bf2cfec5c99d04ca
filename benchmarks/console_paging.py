"""How fast is a page of the console's judgement list at 100,000 records?

    python benchmarks/console_paging.py [--records 100000] [--db /tmp/paging.sqlite]

Fills a fresh database (half comparisons, half ratings, over ~90 days, 3 model versions),
then times the first page, a deep page (keyset cursor after ~90% of the rows), a filtered
page, a free-text search page and the total count, each the median of several runs.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from feedback import review
from feedback.store import REASON_TAGS, FeedbackStore


def populate(store: FeedbackStore, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    t0 = datetime(2025, 1, 1, tzinfo=timezone.utc)
    versions = ["sft", "v-ppo-1", "v-ppo-2"]
    sessions = [f"s{i:05d}" for i in range(max(1, n // 20))]
    with store.transaction() as db:
        db["sessions"].insert_all({"id": s, "user": f"user{i % 50}", "client": "bench", "opt_out": 0,
                                   "created_at": t0.isoformat(), "updated_at": t0.isoformat()}
                                  for i, s in enumerate(sessions))
    batch = 5000
    for start in range(0, n, batch):
        gens, comps, rats = [], [], []
        for i in range(start, min(n, start + batch)):
            at = (t0 + timedelta(seconds=i * 90 * 86400 / n)).isoformat(timespec="milliseconds")
            sid = rng.choice(sessions)
            ctx = json.dumps([{"role": "system", "content": "You are helpful."},
                              {"role": "user", "content": f"question {i} about topic {rng.randint(0, 999)}"}])
            ga, gb = f"g{i}a", f"g{i}b"
            for g in (ga, gb):
                gens.append({"id": g, "session_id": sid, "conversation_id": f"c{i}", "turn": 1, "context": ctx,
                             "content": f"answer {g}", "model_version": rng.choice(versions),
                             "sampling": "{}", "prompt_tokens": 10, "completion_tokens": 20, "ttft_ms": 5.0,
                             "latency_ms": 50.0, "finish_reason": "stop", "created_at": at})
            if i % 2 == 0:
                verdict = rng.choice(["a", "b", "tie", "both_bad", "edit"])
                comps.append({"id": f"cmp{i:07d}", "session_id": sid, "conversation_id": f"c{i}", "turn": 1,
                              "context": ctx, "a_generation_id": ga,
                              "b_generation_id": None if verdict == "edit" else gb,
                              "a_text": f"answer {ga}", "b_text": f"answer {gb}", "verdict": verdict,
                              "source": "edit" if verdict == "edit" else "regenerate", "created_at": at,
                              "decided_at": at, "excluded": int(rng.random() < 0.05)})
            else:
                thumb = rng.choice(["up", "down"])
                reasons = rng.sample(REASON_TAGS, rng.randint(0, 2)) if thumb == "down" else []
                rats.append({"id": f"rat{i:07d}", "session_id": sid, "conversation_id": f"c{i}",
                             "generation_id": ga, "turn": 1, "context": ctx, "answer_text": f"answer {ga}",
                             "thumb": thumb, "reasons": json.dumps(reasons),
                             "comment": "meh" if rng.random() < 0.1 else "", "created_at": at,
                             "excluded": int(rng.random() < 0.05)})
        with store.transaction() as db:
            db["generations"].insert_all(gens)
            db["comparisons"].insert_all(comps)
            db["ratings"].insert_all(rats)


def timed(fn, repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--db", default="")
    args = parser.parse_args()
    path = Path(args.db) if args.db else Path(tempfile.mkdtemp()) / "paging.sqlite"
    store = FeedbackStore(path, scrub_pii=False)
    if not store.db["comparisons"].count:
        t = time.perf_counter()
        populate(store, args.records)
        print(f"populated {args.records} records in {time.perf_counter() - t:.1f} s ({path})")
    first = review.page(store, {}, limit=50)
    all_keys = review.matching_ids(store, {})
    deep_rows = store.query("SELECT created_at, id FROM (SELECT created_at, id FROM comparisons UNION ALL "
                            "SELECT created_at, id FROM ratings) ORDER BY created_at DESC, id DESC "
                            "LIMIT 1 OFFSET ?", (int(len(all_keys) * 0.9),))
    cursor = (deep_rows[0]["created_at"], deep_rows[0]["id"])
    results = {
        "first page (50 rows)": timed(lambda: review.page(store, {}, limit=50)),
        "next page via cursor": timed(lambda: review.page(store, {}, limit=50,
                                                          after=(first[-1]["created_at"], first[-1]["id"]))),
        "deep page at 90%": timed(lambda: review.page(store, {}, limit=50, after=cursor)),
        "filtered: thumbs down + reason + included": timed(lambda: review.page(
            store, {"kinds": ["down"], "reason": "inaccurate", "status": "included"}, limit=50)),
        "filtered: model version v-ppo-2": timed(lambda: review.page(store, {"model_version": "v-ppo-2"}, limit=50)),
        "filtered: user7, both bad": timed(lambda: review.page(store, {"session": "user7", "kinds": ["both_bad"]},
                                                               limit=50)),
        "free-text search 'topic 123'": timed(lambda: review.page(store, {"search": "topic 123"}, limit=50)),
        "total count (no filter)": timed(lambda: review.count(store, {})),
    }
    print(f"{len(all_keys)} judgements in the list")
    for name, ms in results.items():
        print(f"{name:45s} {ms:8.1f} ms")
    store.close()


if __name__ == "__main__":
    main()
