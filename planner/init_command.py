"""`pipeshift init [--database-url URL]`: create the store, or upgrade its schema."""

from __future__ import annotations

import argparse
import sys


def add_database_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database-url", metavar="URL",
                        help="SQLAlchemy URL of the store (default $PIPESHIFT_DATABASE_URL, "
                             "or a SQLite file in the user's data directory)")


def open_store_or_say(command: str, url: str | None):
    """Returns the store at `url` (default: the configured one), or None after printing to
    stderr why it cannot be used and what to run."""
    from planner.store import NoStore, open_store

    try:
        return open_store(url)
    except NoStore as exc:
        print(f"pipeshift {command}: error: {exc}", file=sys.stderr)
        return None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "init", help="create the store of configurations, plans and applies, or upgrade it",
        description="Create pipeshift's SQL store (SQLite by default, PostgreSQL by URL) or "
        "upgrade its schema to this version's. Running it again is harmless.",
    )
    add_database_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from planner.store.database import NoStore, database_url, init_schema, shown

    url = args.database_url or database_url()
    try:
        before, after = init_schema(url)
    except NoStore as exc:
        print(f"pipeshift init: error: {exc}", file=sys.stderr)
        return 1
    if before is None:
        print(f"Created the store at {shown(url)} (schema {after}).")
    elif before == after:
        print(f"The store at {shown(url)} is up to date (schema {after}).")
    else:
        print(f"Upgraded the store at {shown(url)} from schema {before} to {after}.")
    return 0
