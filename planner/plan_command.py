"""`pipeshift plan -f SPEC.yaml [--json] [--backend cpsat|highs|cbc] [--time-limit S]`: the plan
for a spec from scratch.

`pipeshift plan -f SPEC.yaml --server URL [-out PLANFILE] [--detailed-exitcode]`: the change from
what the running deployment serves (refreshed into the store; a difference from the record is
reported as drift) to the spec's plan, printed as `pipeshift apply` would carry it out;
`-out` saves it for `pipeshift apply PLANFILE`. With --detailed-exitcode: 0 no changes,
1 error, 2 changes."""

from __future__ import annotations

import argparse
import json
import os
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
    p.add_argument(
        "--server",
        default=None,
        help="plan the change from this running deployment (default with -out: "
        "$PIPESHIFT_SERVER or http://127.0.0.1:8000)",
    )
    p.add_argument(
        "-out",
        "--out",
        dest="out",
        metavar="PLANFILE",
        help="save the change for `pipeshift apply PLANFILE`",
    )
    p.add_argument(
        "--detailed-exitcode",
        action="store_true",
        help="exit 0 when nothing changes, 2 when something does, 1 on error",
    )
    p.add_argument(
        "--token",
        default=os.environ.get("PIPESHIFT_ADMIN_TOKEN"),
        help="the server's admin token (default $PIPESHIFT_ADMIN_TOKEN)",
    )
    from planner.init_command import add_database_argument

    add_database_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Plans the spec; returns 0 with a plan, 1 when the spec is malformed or infeasible."""
    if args.server or args.out:
        return run_against_server(args)
    from planner.build_problem import build_pool_problem
    from planner.operating_batch import plan_fitting_batch
    from planner.report import render, render_pool
    from planner.solve import plan_pool
    from planner.spec import SpecError, load_spec

    try:
        spec = load_spec(args.file)
        # several models share the pool: each gets its own pipelines (planner/master.py)
        pool = build_pool_problem(spec) if spec.models is not None else None
        if pool is None:
            # at the spec's batch, or the batch a replica's KV holds (planner/operating_batch.py)
            problem, result = plan_fitting_batch(
                spec, backend=args.backend, time_limit_s=args.time_limit
            )
    except SpecError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return 1
    if pool is not None:
        result = plan_pool(pool, backend=args.backend, time_limit_s=args.time_limit)
        text = render_pool(pool, result)
    else:
        at_rate = load_line(spec, problem, result)
        text = render(problem, result) + (f"\n{at_rate}" if at_rate else "")
    print(json.dumps(result.to_json(), indent=2) if args.json else text)
    if result.objective is None:
        print(f"error: {result.message}", file=sys.stderr)
        return 1
    return 0


def load_line(spec, problem, result) -> str:
    """Returns the plan's figures at the spec's request rate (the batches the engine forms at
    that load, planner/load_prediction.py), and records them in result.details["at_spec_rate"];
    "" when the plan has no pipelines or the spec no rate."""
    from planner.load_prediction import predict_at_load

    rate = spec.workload.request_rate_per_s if spec.workload is not None else None
    if not result.pipelines or not rate:
        return ""
    point = predict_at_load(spec, problem, result).at_rate
    result.details["at_spec_rate"] = {
        "request_rate_per_s": rate, "tpot_ms": point.tpot_s * 1000, "ttft_ms": point.ttft_s * 1000,
        "throughput_tok_s": point.throughput_tok_s, "batch_per_pipeline": list(point.batch_per_pipeline),
        "saturated": point.saturated,
    }
    if point.saturated:
        return (f"at the spec's rate ({rate:g} req/s): more than this configuration serves "
                f"(it saturates at {point.throughput_tok_s:.0f} tok/s)")
    batches = point.batch_per_pipeline
    shown = (", ".join(f"{b:.1f}" for b in batches) if len(batches) <= 4
             else f"{min(batches):.1f} to {max(batches):.1f}")
    return (f"at the spec's rate ({rate:g} req/s): TPOT {point.tpot_s * 1000:.1f} ms, TTFT "
            f"{point.ttft_s * 1000:.0f} ms, {point.throughput_tok_s:.0f} tok/s, with the batches the "
            f"engine forms at that load ({shown} per pipeline)")


def run_against_server(args: argparse.Namespace) -> int:
    """Refreshes the store from the server, plans the spec from what serves, prints the change;
    with -out saves it. Returns 0 / 2 (changes, with --detailed-exitcode) / 1."""
    from planner.init_command import open_store_or_say
    from planner.store.database import database_url

    url = args.database_url or database_url()
    store = open_store_or_say("plan", url)
    if store is None:
        return 1
    try:
        return _plan_change(args, store, url)
    finally:
        store.close()


def _plan_change(args: argparse.Namespace, store, url: str) -> int:
    from planner.admin_client import AdminClient, server_url
    from planner.apply_command import DEFAULT_SERVER
    from planner.deployment_state import write_plan_file
    from planner.operations import OperationError, plan_change, save_plan
    from planner.spec import SpecError, load_spec
    from planner.store.database import shown

    server = server_url(args.server or DEFAULT_SERVER)
    try:
        spec = load_spec(args.file)
    except SpecError as exc:
        for line in exc.lines:
            print(f"error: {line}", file=sys.stderr)
        return 1
    try:
        change = plan_change(
            store, AdminClient(server, args.token), spec, args.time_limit, backend=args.backend
        )
    except OperationError as exc:
        print(f"pipeshift plan: error: {exc}", file=sys.stderr)
        return 1
    feasible = bool(change.dry["feasible"])
    saved_to = None
    if feasible and args.out:
        saved = save_plan(store, change, spec.model_dump(mode="json"))
        write_plan_file(args.out, saved, server, shown(url))
        saved_to = args.out
    if args.json:
        # one JSON object, as without --server: the target, the server's diff and its text
        print(json.dumps({
            "server": server, "drift": change.refreshed.drift or None, "moved": change.refreshed.moved,
            "filled": change.refreshed.filled,
            "feasible": feasible,
            "has_changes": change.has_changes, "target": change.target.to_json(),
            "plan": change.dry["plan"], "text": change.dry["text"], "saved_to": saved_to,
        }, indent=2))
    else:
        for line in change.refreshed.notes:
            print(f"Note: {line}.\n")
        if change.refreshed.drift:
            print(f"Note: {change.refreshed.drift}.\n")
        print(change.dry["text"])
        if saved_to is not None:
            print(
                f"\nSaved the plan to: {saved_to}\n\nTo perform exactly these actions, run:\n"
                f"    pipeshift apply {saved_to}"
            )
    if not feasible:
        return 1
    return 2 if (change.has_changes and args.detailed_exitcode) else 0
