"""``python -m feedback``: exports of the feedback database and console users.

    python -m feedback export trl --out prefs.jsonl [filters]
    python -m feedback export csv --out judgements.csv [filters]
    python -m feedback export db  --out copy.sqlite
    python -m feedback add-user alice            (asks for the password; or --password-stdin)
    python -m feedback users

The database is ``--db`` or ``<data dir>/feedback.sqlite`` (``--data-dir`` or
``ASSISTANT_DATA_DIR``, default ``data``).  Filters are the console's; excluded records are
left out unless ``--include-excluded`` is given, opted-out sessions always.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from feedback import auth, export, review
from feedback.store import FeedbackStore, StoreError


def _db_path(args: argparse.Namespace) -> Path:
    if args.db:
        return Path(args.db)
    data_dir = args.data_dir or os.environ.get("ASSISTANT_DATA_DIR", "data")
    return Path(data_dir).expanduser() / "feedback.sqlite"


def _add_filters(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("filters (the console's)")
    g.add_argument("--since", default="", help="from this ISO date/time, inclusive")
    g.add_argument("--until", default="", help="up to this ISO date/time, exclusive")
    g.add_argument("--kind", action="append", default=[], choices=review.KINDS,
                   help="verdict kind; repeat for several")
    g.add_argument("--reason", default="", help="a rating reason tag")
    g.add_argument("--model-version", default="", help="answers from this model version")
    g.add_argument("--session", default="", help="session id or user name")
    g.add_argument("--has-comment", default=None, action=argparse.BooleanOptionalAction,
                   help="only judgements with (or, --no-has-comment, without) a comment")
    g.add_argument("--status", default="all", choices=review.STATUSES,
                   help="included/excluded; only matters with --include-excluded")
    g.add_argument("--search", default="", help="free text in the prompt, answers or comment")
    g.add_argument("--include-excluded", action="store_true",
                   help="export excluded records too (default: never)")


def _filters(args: argparse.Namespace) -> review.Filters:
    return review.Filters(since=args.since, until=args.until, kinds=args.kind, reason=args.reason,
                          model_version=args.model_version, session=args.session,
                          has_comment=args.has_comment, status=args.status, search=args.search).validate()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m feedback", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--db", default="", help="path of the feedback database")
    p.add_argument("--data-dir", default="", help="the app's data directory (env ASSISTANT_DATA_DIR)")
    sub = p.add_subparsers(dest="command", required=True)
    e = sub.add_parser("export", help="export judgements (trl, csv) or copy the database (db)")
    e.add_argument("format", choices=("trl", "csv", "db"))
    e.add_argument("--out", required=True, help="output file")
    _add_filters(e)
    u = sub.add_parser("add-user", help="create or update a console maintainer")
    u.add_argument("username")
    u.add_argument("--role", default="maintainer", choices=auth.MAINTAINER_ROLES)
    u.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    sub.add_parser("users", help="list console users")
    r = sub.add_parser("remove-user", help="delete a console user")
    r.add_argument("username")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    path = _db_path(args)
    if args.command == "export" and args.format == "db":
        if not path.exists():
            print(f"no database at {path}", file=sys.stderr)
            return 2
        out = export.backup_db(path, args.out)
        print(f"copied {path} to {out}")
        return 0
    store = FeedbackStore(path)
    try:
        if args.command == "export":
            f = _filters(args)
            fn = export.export_trl if args.format == "trl" else export.export_csv
            n = fn(store, args.out, f, include_excluded=args.include_excluded)
            print(f"wrote {n} {'preference pairs' if args.format == 'trl' else 'judgements'} to {args.out}")
        elif args.command == "add-user":
            if args.password_stdin:
                password = sys.stdin.readline().rstrip("\n")
            else:
                password = getpass.getpass(f"password for {args.username}: ")
                if password != getpass.getpass("again: "):
                    print("the passwords differ", file=sys.stderr)
                    return 2
            auth.add_user(store, args.username, password, args.role)
            print(f"user {args.username} ({args.role}) saved")
        elif args.command == "users":
            for u in auth.list_users(store):
                print(f"{u['username']}\t{u['role']}\t{u['created_at']}")
        elif args.command == "remove-user":
            print("removed" if auth.remove_user(store, args.username) else "no such user")
    except StoreError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
