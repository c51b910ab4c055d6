"""`pipeshift history [--decisions] [--json]`: the configurations, applies and device changes (a
device joining, drained, given back, gone) of the store, oldest first; with --decisions, every
decision of the live controller too (acting or not, its reason and predicted figures). A store is
one deployment's history: a configuration says the server it was seen at when that is not the
one before's (the first, and after the deployment moved)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    from planner.init_command import add_database_argument

    p = subparsers.add_parser("history", help="list the configurations and applies the store recorded")
    p.add_argument("--json", action="store_true", help="print one JSON array")
    p.add_argument("--decisions", action="store_true",
                   help="also list the live controller's decisions (`serve --controller` with a store)")
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
        events = store.history(decisions=args.decisions)
    finally:
        store.close()
    if args.json:
        print(json.dumps(events, indent=2))
        return 0
    if not events:
        print("The store is empty: `pipeshift plan` records the serving configuration.")
        return 0
    server = None  # a configuration's server is printed when it is not the one before's
    for e, group in _grouped(events):
        when = e["at"][:19].replace("T", " ")
        if e["type"] == "device":
            print(f"{when}  devices  {device_changes(group)}")
        elif e["type"] == "decision":
            print(decision_line(when, e))
        elif e["type"] == "configuration":
            at = f"  at {e['server']}" if e.get("server") and e["server"] != server else ""
            server = e.get("server") or server
            print(f"{when}  configuration {e['id']:<4} serial {e['serial']:<3} {e['source']:<10} {layout(e['pipelines'])}"
                  f"{at}" + (f"  ({e['note']})" if e.get("note") else ""))
        else:
            result = e["outcome"] or e["state"]
            moved = f"{e['bytes_moved'] / 2**20:.1f} MiB" if e["bytes_moved"] else "-"
            stall = f"{e['stall_ms']:.1f} ms" if e["stall_ms"] is not None else "-"
            print(f"{when}  apply {e['id']:<19} {e.get('source') or 'apply':<10} {result:<11} "
                  f"{e['from']} -> {e['to'] or '-'}  moved {moved}, "
                  f"stall {stall}" + "".join(f"  ({e[k]})" for k in ("error", "note") if e.get(k)))
    return 0


def _grouped(events: list[dict]) -> list[tuple[dict, list[dict]]]:
    """Pairs each event with itself, except that the device events of one refresh (one `at`)
    become one entry."""
    out: list[tuple[dict, list[dict]]] = []
    for e in events:
        last = out[-1][0] if out else None
        if e["type"] == "device" and last is not None and last["type"] == "device" and last["at"] == e["at"]:
            out[-1][1].append(e)
        else:
            out.append((e, [e]))
    return out


def device_changes(group: list[dict]) -> str:
    """Returns `worker-5 joined (cpu, spare); worker-2 serving -> drained` for device events."""
    parts = []
    for e in group:
        if e["from"] is None:
            parts.append(f"{e['device']} joined ({e['kind']}, {e['to']})")
        elif e["to"] == "gone":
            parts.append(f"{e['device']} gone (was {e['from']})")
        else:
            parts.append(f"{e['device']} {e['from']} -> {e['to']}")
    return "; ".join(parts)


def decision_line(when: str, e: dict) -> str:
    """Returns `WHEN  decision 12  auto  apply  [0:15,15:30] -> [0:30]: REASON (goodput ...)`."""
    from planner.configuration import Configuration

    verb = ("apply" if e["mode"] == "auto" else "propose") if e["act"] else "keep"
    current = Configuration.from_json(e["current"]).describe()
    target = Configuration.from_json(e["target"]).describe()
    p = e["predicted"]
    figures = (f"goodput {p.get('goodput_current_rps', 0):.3f} -> {p.get('goodput_target_rps', 0):.3f} req/s, "
               f"stall {p.get('stall_ms', 0):.1f} ms")
    outcome = f"; apply {e['server_apply_id']}" if e["server_apply_id"] else (f"; {e['error']}" if e["error"] else "")
    if e["plan"] and not e["server_apply_id"] and e["act"]:  # a proposal: what applies it
        outcome += f"; `pipeshift apply {e['plan']}` applies it"
    return (f"{when}  decision {e['id']:<4} {e['mode']:<7} {verb:<7} {current} -> {target}: {e['reason']} "
            f"({figures}){outcome}")
