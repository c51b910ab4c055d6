"""`pipeshift show [APPLY_ID] [--json] [--plot FILE.png]`: the store's current configuration,
or one apply: its phases with start and duration beside what was predicted, its outcome, and
TTFT/TPOT before, during and after it. `--plot` draws the apply's timeline (the newest apply
when no id is given)."""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    from planner.init_command import add_database_argument

    p = subparsers.add_parser("show", help="show the current configuration, or one apply",
                              description="Show the store's current configuration, or one apply's phases, "
                              "figures and outcome; --plot draws its timeline.")
    p.add_argument("apply_id", nargs="?", metavar="APPLY_ID", help="an apply (`pipeshift history` lists them)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", metavar="FILE.png", help="draw the apply's timeline (default: the newest apply)")
    add_database_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from planner.init_command import open_store_or_say
    from planner.store import UnknownId

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("pipeshift show: error: --plot needs matplotlib: pip install 'pipeshift[plot]'", file=sys.stderr)
        return 1
    store = open_store_or_say("show", args.database_url)
    if store is None:
        return 1
    try:
        if args.apply_id is None and not args.plot:
            return show_current(store, args.json)
        applies = store.applies()
        if args.apply_id is None:
            if not applies:
                print("pipeshift show: error: the store has no apply yet: `pipeshift apply` makes one",
                      file=sys.stderr)
                return 1
            row = applies[-1]
        else:
            row = store.apply(args.apply_id)
    except UnknownId as exc:
        print(f"pipeshift show: error: {exc.args[0]}", file=sys.stderr)
        return 1
    finally:
        store.close()
    from planner.api.models import ApplyOut

    apply = ApplyOut.of(row).model_dump(mode="json")
    if args.plot:
        from planner.timeline_plot import plot_timeline

        try:
            plot_timeline(apply, args.plot)
        except OSError as exc:
            print(f"pipeshift show: error: cannot write {args.plot} ({exc.strerror or exc}): give "
                  "--plot a file in a folder you can write", file=sys.stderr)
            return 1
        print(f"Wrote the timeline of apply {row.id} to {args.plot}")
        return 0
    print(json.dumps(apply, indent=2) if args.json else render_apply(apply))
    return 0


def show_current(store, as_json: bool) -> int:
    from planner.api.models import ConfigurationOut
    from planner.history_command import layout

    current = store.current()
    if as_json:
        print(json.dumps(ConfigurationOut.of(current).model_dump(mode="json") if current else None, indent=2))
        return 0
    if current is None:
        print("The store records no configuration yet: `pipeshift plan --server URL` records the serving one.")
        return 0
    print(f"configuration {current.id} (serial {current.serial} of lineage {current.lineage}), "
          f"{current.source} at {current.created_at:%Y-%m-%d %H:%M:%S}, epoch {current.epoch}")
    print(f"  model {current.model}")
    if current.server:
        print(f"  server: {current.server}")
    if current.note:
        print(f"  note: {current.note}")
    for i, pipeline in enumerate(current.pipelines):
        print(f"  pipeline {i}: {layout([pipeline])}")
    return 0


def _s(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.2f} s"


def render_apply(apply: dict[str, Any]) -> str:
    """Returns the apply as a table of phases, its figures and its serving windows."""
    started_by = f" ({apply['source']})" if apply.get("source") not in (None, "apply") else ""
    lines = [f"apply {apply['id']}{started_by}: {apply['outcome'] or apply['state']}"
             + "".join(f" ({apply[k]})" for k in ("error", "note") if apply.get(k)),
             f"  configuration {apply['from_configuration_id']} -> {apply['to_configuration_id'] or '-'}, "
             f"started {apply['started_at'][:19].replace('T', ' ')}", ""]
    starts = [p["started_at"] for p in apply["phases"] if p.get("started_at")]
    t0 = min(starts) if starts else 0.0
    lines.append(f"  {'phase':<10}{'state':<9}{'starts at':>10}{'took':>10}{'predicted':>11}{'moved':>12}")
    for p in apply["phases"]:
        at = _s(p["started_at"] - t0) if p.get("started_at") else "-"
        moved = f"{p['bytes'] / 2**20:.1f} MiB" if p.get("bytes") else "-"
        lines.append(f"  {p['name']:<10}{p['state']:<9}{at:>10}{_s(p.get('measured_s')):>10}"
                     f"{_s(p.get('predicted_s')):>11}{moved:>12}")
    stall = f"{apply['stall_ms']:.1f} ms" if apply["stall_ms"] is not None else "-"
    lines += ["", f"  bytes moved {apply['bytes_moved'] / 2**20:.1f} MiB, longest hold at the switch {stall}"]
    lines += render_serving(apply.get("serving"))
    return "\n".join(lines)


def render_serving(serving: dict[str, Any] | None) -> list[str]:
    """Returns the table of TTFT/TPOT before, during and after an apply (none without figures)."""
    windows = (serving or {}).get("windows") or {}
    if not any(windows.values()):
        return []

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f} ms"

    lines = ["", f"  {'serving':<8}{'tokens':>8}{'TTFT p50':>11}{'TPOT p50':>11}{'TPOT p99':>11}{'max gap':>10}"]
    for name in ("before", "during", "after"):
        w = windows.get(name)
        if w:
            lines.append(f"  {name:<8}{w['tokens']:>8}{ms(w['ttft_ms_p50']):>11}{ms(w['tpot_ms_p50']):>11}"
                         f"{ms(w['tpot_ms_p99']):>11}{ms(w['max_gap_ms']):>10}")
    return lines
