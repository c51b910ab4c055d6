"""`pipeshift force-unlock LOCK_ID`: release a lock whose holder is gone."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from planner.init_command import add_database_argument

    p = subparsers.add_parser("force-unlock", help="release a deployment's lock whose holder is gone",
                              description="Release a lock left by an apply that did not end "
                              "(its process was killed). Only for a holder that is really gone.")
    p.add_argument("lock_id", metavar="LOCK_ID")
    add_database_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from planner.init_command import open_store_or_say
    from planner.store import UnknownId

    store = open_store_or_say("force-unlock", args.database_url)
    if store is None:
        return 1
    try:
        lock = store.force_unlock(args.lock_id)
    except UnknownId as exc:
        print(f"pipeshift force-unlock: error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"Released lock {lock.id} on {lock.name} (held by {lock.holder}: {lock.reason}).")
    return 0
