"""``python -m retrain``: run, status, export, versions, rollback.

Every command takes the app's settings (flags or ASSISTANT_* variables), so
``python -m retrain status --data-dir data`` reads the same database the app writes.

    python -m retrain run --now            # one run in this process, now
    python -m retrain run --now --ppo.lr 1e-4 --gate.kl_budget 15   # any RetrainConfig field
    python -m retrain status               # last runs, served version, next scheduled run
    python -m retrain export prefs.jsonl   # usable preferences as TRL conversational JSONL
    python -m retrain versions             # every version with lineage
    python -m retrain rollback VERSION     # serve an earlier version again
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from assistant import settings as settings_mod
from feedback.registry import Registry
from feedback.store import FeedbackStore


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m retrain", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one retrain now (in this process)",
                         description="Any field of RetrainConfig (retrain/config.py) can follow as "
                                     "--SECTION.FIELD VALUE, e.g. --ppo.lr 1e-4 --gate.kl_budget 15; "
                                     "it overrides --retrain-config.")
    run.add_argument("--now", action="store_true", help="start immediately, whatever the new-data count")
    run.add_argument("--run-id", default=None, help="use a run row created by the scheduler")
    run.add_argument("--trigger", default="manual", help="recorded as the run's trigger")
    sub.add_parser("status", help="recent runs, the served version, the next scheduled run")
    export = sub.add_parser("export", help="export usable preferences as TRL conversational JSONL")
    export.add_argument("out", help="output .jsonl path")
    export.add_argument("--split", choices=["all", "train", "heldout"], default="all")
    sub.add_parser("versions", help="list model versions with lineage")
    rollback = sub.add_parser("rollback", help="serve an earlier version again")
    rollback.add_argument("version")
    rollback.add_argument("--reason", default="rollback from the CLI")
    for p in sub.choices.values():
        settings_mod.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "run":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    settings = settings_mod.from_namespace(args)
    if args.command == "run":
        from retrain.config import RetrainConfig, cli_overrides
        from retrain.job import RunLocked, run_once

        try:
            config = RetrainConfig.load(settings.retrain_config or None, cli_overrides(extra))
        except (ValueError, OSError) as exc:
            parser.error(str(exc))
        try:
            run = run_once(settings, run_id=args.run_id, trigger=args.trigger, config=config)
        except RunLocked as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if run.get("status") in (None, "worker"):  # a helper rank under accelerate launch
            return 0
        print(json.dumps({k: run[k] for k in ("id", "status", "reason", "rm_accuracy", "kl", "candidate_version")},
                         indent=1))
        return 0
    store = FeedbackStore(settings.db_path, scrub_pii=settings.scrub_pii)
    registry = Registry(store)
    if args.command == "status":
        from retrain.scheduler import STATE_KEY

        print(f"served version: {registry.served_version()}")
        print(f"next scheduled check: {store.get_state(STATE_KEY) or 'not scheduled (app not started)'}")
        print(f"new usable preferences: {store.count_new_preferences()}")
        for run in registry.runs(limit=10):
            print(f"{run['id']}  {run['status']:<9} {run['created_at']}  rm_acc={run['rm_accuracy']}  "
                  f"kl={run['kl']}  {run['reason'] or ''}")
        return 0
    if args.command == "export":
        from retrain.data import build_snapshot
        from retrain.export import export_trl_jsonl

        snap = build_snapshot(store)
        pairs = {"all": snap.train + snap.heldout, "train": snap.train, "heldout": snap.heldout}[args.split]
        n = export_trl_jsonl(pairs, args.out)
        ties = sum(not p.decisive for p in pairs)
        print(f"wrote {n} preference pairs to {args.out} ({ties} ties left out: TRL's format has no ties)")
        return 0
    if args.command == "versions":
        served = registry.served_version()
        for v in registry.versions():
            mark = "*" if v["id"] == served else " "
            print(f"{mark} {v['id']:<28} kind={v['kind']:<4} parent={v['parent_id'] or '-':<28} "
                  f"run={v['run_id'] or '-'}  {v['path']}")
        return 0
    if args.command == "rollback":
        from retrain.versions import rollback

        try:
            rollback(registry, args.version, actor="cli", reason=args.reason)
        except Exception as exc:  # noqa: BLE001 - shown to the user as an error line
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"now serving {args.version} (the running app swaps within seconds)")
        return 0
    return 1


if __name__ == "__main__":
    sys.exit(main())
