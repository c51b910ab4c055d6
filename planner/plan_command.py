"""`pipeshift plan -f SPEC.yaml [--json] [--backend cpsat|highs|cbc] [--time-limit S]`."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan",
        help="choose pipelines, stage split and devices for a spec",
        description="Choose how many pipelines to run, where to cut the model and which "
        "device runs each stage; print the plan with its proven optimality gap.",
    )
    p.add_argument("-f", "--file", required=True, help="spec file (YAML)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--backend", choices=("cpsat", "highs", "cbc"), default="cpsat")
    p.add_argument(
        "--time-limit",
        type=float,
        default=30.0,
        metavar="S",
        help="solver time limit in seconds (default 30)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plans the spec; returns 0 with a plan, 1 when the spec is malformed or infeasible."""
    from planner.build_problem import build_problem
    from planner.report import render
    from planner.solve import plan
    from planner.spec import SpecError, load_spec

    try:
        problem = build_problem(load_spec(args.file))
    except SpecError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return 1
    result = plan(problem, backend=args.backend, time_limit_s=args.time_limit)
    if args.json:
        print(json.dumps(result.to_json(), indent=2))
    else:
        print(render(problem, result))
    if result.objective is None:
        print(f"error: {result.message}", file=sys.stderr)
        return 1
    return 0
