"""`pipeshift devices`: what this host offers (NVIDIA GPUs through NVML, else CPU workers)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("devices", help="list this host's devices as the planner sees them")
    p.add_argument("--cpu-workers", type=int, default=None, help="CPU workers to offer when there is no GPU (default: cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cost_models.discovery import discover_devices

    found = discover_devices(args.cpu_workers)
    if args.json:
        print(json.dumps({
            "backend": found.backend,
            "note": found.note,
            "devices": [
                {"index": d.index, "kind": d.kind.name, "reported_name": d.reported_name,
                 "memory_bytes": d.memory_bytes, "match": d.match, "uuid": d.uuid}
                for d in found.devices
            ],
        }, indent=2))
        return 0
    for d in found.devices:
        print(f"{d.index:>3}  {d.kind.name:<12} {d.reported_name:<28} {d.memory_bytes / 2**30:7.1f} GiB  ({d.match})")
    if found.note:
        print(f"note: {found.note}")
    return 0
