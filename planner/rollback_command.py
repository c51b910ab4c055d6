"""`pipeshift rollback CONFIGURATION_ID`: plan and apply a return to a configuration the store
recorded (`pipeshift history` lists them)."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from planner.apply_command import DEFAULT_SERVER
    from planner.init_command import add_database_argument

    p = subparsers.add_parser("rollback", help="return the deployment to a recorded configuration, live",
                              description="Plan the change back to a configuration from `pipeshift "
                              "history`, show it, and apply it while requests keep streaming.")
    p.add_argument("configuration_id", type=int, metavar="CONFIGURATION_ID")
    p.add_argument("--server", default=DEFAULT_SERVER,
                   help="the serving process (default $PIPESHIFT_SERVER or http://127.0.0.1:8000)")
    p.add_argument("--token", default=os.environ.get("PIPESHIFT_ADMIN_TOKEN"))
    p.add_argument("--auto-approve", action="store_true", help="apply without asking for `yes`")
    p.add_argument("--max-overhead", type=float, default=None)
    add_database_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from planner.apply_command import _apply
    from planner.init_command import open_store_or_say
    from planner.store import UnknownId

    store = open_store_or_say("rollback", args.database_url)
    if store is None:
        return 1
    try:
        configuration = store.configuration(args.configuration_id)
        print(f"Rolling back to configuration {configuration.id} (serial {configuration.serial}, "
              f"{configuration.source} at {configuration.created_at:%Y-%m-%d %H:%M:%S}).\n")
        return _apply(args, store, None, rollback_to=configuration)
    except UnknownId as exc:
        print(f"pipeshift rollback: error: {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
