"""`pipeshift history [--json]`: the configurations and applies of the store, oldest first."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from planner.init_command import add_database_argument

    p = subparsers.add_parser("history", help="list the configurations and applies the store recorded")
    p.add_argument("--json", action="store_true", help="print one JSON array")
    add_database_argument(p)
    p.set_defaults(func=run)


def layout(pipelines: list[dict]) -> str:
    """Returns `worker-0 0-14 | worker-1 15-29` per pipeline, pipelines joined by `; `."""
    return "; ".join(" | ".join(f"{s['device']} {s['start']}-{s['end'] - 1}" for s in p["stages"])
                     for p in pipelines)


def run(args: argparse.Namespace) -> int:
    from planner.init_command import open_store_or_say

    store = open_store_or_say("history", args.database_url)
    if store is None:
        return 1
    try:
        events = store.history()
    finally:
        store.close()
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    if not events:
        print("The store is empty: `pipeshift plan` records the serving configuration.")
        return 0
    for e in events:
        when = e["at"][:19].replace("T", " ")
        if e["type"] == "configuration":
            print(f"{when}  configuration {e['id']:<4} serial {e['serial']:<3} {e['source']:<9} {layout(e['pipelines'])}")
        else:
            result = e["outcome"] or e["state"]
            moved = f"{e['bytes_moved'] / 2**20:.1f} MiB" if e["bytes_moved"] else "-"
            stall = f"{e['stall_ms']:.1f} ms" if e["stall_ms"] is not None else "-"
            print(f"{when}  apply {e['id']:<19} {result:<11} {e['from']} -> {e['to'] or '-'}  moved {moved}, "
                  f"stall {stall}" + (f"  ({e['error']})" if e["error"] else ""))
    return 0
