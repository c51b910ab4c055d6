"""`pipeshift apply`: change a running deployment's configuration live.

    pipeshift apply --stages 0:10,10:20,20:30 [--server URL] [--auto-approve]
    pipeshift apply --plan PLAN.json            (the planner's --json output; devices map to workers in order)
    pipeshift apply -f SPEC.yaml                (plans with the migration term from what serves now)
    pipeshift apply PLANFILE                    (exactly a plan saved by `pipeshift plan -out`)
    pipeshift apply PLAN_ID                     (a plan the store holds: a controller's proposal,
                                                 `pipeshift history --decisions` names it)

It prints the diff the server plans, asks for `yes` (unless --auto-approve, or a saved plan,
which was reviewed when it was made), follows the apply's phases with a progress bar each,
then prints measured beside predicted figures. With a store (`pipeshift init`) it refreshes
the recorded configuration from the server, refuses a saved plan made against another
configuration, holds the deployment's lock while it applies, and records the apply as it goes.
Exit status: 0 applied (or nothing to change), 1 failed, aborted or rolled back (the old
configuration still serves, and it says so), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLL_S = 0.1
PLAN_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")  # as the store names plans
DEFAULT_SERVER = os.environ.get("PIPESHIFT_SERVER", "http://127.0.0.1:8000")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "apply",
        help="change a running deployment's pipelines live",
        description="Plan the change from the running deployment's configuration to a target, "
        "show it, and apply it while every request keeps streaming.",
    )
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("planfile", nargs="?", metavar="PLANFILE",
                        help="a plan saved by `pipeshift plan -out`, or the id of a plan the store holds "
                             "(`serve --controller propose` saves its proposals: `pipeshift history --decisions`)")
    target.add_argument("--stages", help="one pipeline's layer ranges, e.g. 0:10,10:20,20:30")
    target.add_argument("--plan", metavar="PLAN.json", help="a configuration (`pipeshift plan --json` output)")
    target.add_argument("-f", "--file", metavar="SPEC.yaml", help="a spec to plan from what serves now")
    p.add_argument("--server", default=None,
                   help="the serving process (default: a saved plan's, else $PIPESHIFT_SERVER or "
                        "http://127.0.0.1:8000)")
    p.add_argument("--token", default=os.environ.get("PIPESHIFT_ADMIN_TOKEN"),
                   help="the server's admin token (default $PIPESHIFT_ADMIN_TOKEN)")
    p.add_argument("--auto-approve", action="store_true", help="apply without asking for `yes`")
    p.add_argument("--max-overhead", type=float, default=None,
                   help="share of serving time the background copies may take (default: the server's)")
    p.add_argument("--recompute-overflow", action="store_true",
                   help="where memory cannot hold every running request's KV through the change, drop the KV "
                        "of those cheapest to recompute (they wait at the head of the queue) instead of refusing")
    p.add_argument("--time-limit", type=float, default=30.0, metavar="S",
                   help="solver time limit for -f (default 30 s)")
    from planner.init_command import add_database_argument

    add_database_argument(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from planner.deployment_state import read_plan_file
    from planner.store import NoStore, open_store
    from planner.store.database import database_url

    saved = None
    if args.planfile and PLAN_ID.fullmatch(args.planfile) and not Path(args.planfile).exists():
        # a plan of the store (`prepare` says if it has none such); a proposal no one reviewed yet
        saved = {"plan_id": args.planfile, "reviewed": False}
    elif args.planfile:
        try:
            saved = read_plan_file(args.planfile)
        except ValueError as exc:
            print(f"pipeshift apply: error: {exc}", file=sys.stderr)
            return 2
    args.server = args.server or (saved or {}).get("server") or DEFAULT_SERVER
    try:
        store = open_store(args.database_url or database_url())
    except NoStore as exc:
        if saved is not None:
            print(f"pipeshift apply: error: {exc}", file=sys.stderr)
            return 1
        store = None  # no history kept: say so, and apply
        print(f"Note: {exc}; this apply is not recorded.\n", file=sys.stderr)
    try:
        return _apply(args, store, saved)
    finally:
        if store is not None:
            store.close()


def _apply(args: argparse.Namespace, store, saved: dict[str, Any] | None, rollback_to=None) -> int:
    """Applies a saved plan, a configuration of the store (`rollback_to`), or the target of
    --stages / --plan / -f. With a store: holds the deployment's lock throughout (taken first,
    as Terraform does, so that what is planned is what is applied) and records the apply."""
    from planner.admin_client import AdminClient
    from planner.operations import ApplyRun, OperationError

    run = ApplyRun(store, AdminClient(args.server, args.token),
                   source="rollback" if rollback_to is not None else "apply")
    try:
        dry = run.prepare(plan_id=saved["plan_id"] if saved is not None else None,
                          configuration_id=rollback_to.id if rollback_to is not None else None,
                          target=lambda deployment: build_target(args, deployment),
                          max_overhead=args.max_overhead,
                          recompute_overflow=getattr(args, "recompute_overflow", False))
        for line in run.notes:
            print(f"Note: {line}.\n")
        if run.drift:
            print(f"Note: {run.drift}.\n")
        print(dry["text"])
        if not dry["feasible"]:
            print(f"\nNothing was changed; epoch {run.deployment['epoch']} still serves.", file=sys.stderr)
            return 1
        if not run.has_changes:
            return 0
        if (saved is None or not saved.get("reviewed", True)) and not args.auto_approve and not confirm():
            print("\nApply cancelled.")
            return 1
        interrupts = Interrupts()  # from here Ctrl-C asks the server to cancel, whenever it comes
        with interrupts:
            run.start()
            record, _ = run.follow(lambda client, apply_id, on_update: follow(client, apply_id, interrupts, on_update))
    except KeyboardInterrupt:  # a second Ctrl-C: stop following; the server goes on
        if run.server_apply_id is None:
            print("\nInterrupted before the apply started: nothing was changed.", file=sys.stderr)
        else:
            print(f"\nStopped following apply {run.server_apply_id}; the server goes on with it (it was asked to "
                  f"cancel): GET /admin/v1/applies/{run.server_apply_id} says how it ends.", file=sys.stderr)
        return 1
    except OperationError as exc:
        print(f"pipeshift apply: error: {exc}", file=sys.stderr)
        return 2 if exc.status == 422 and saved is None and rollback_to is None else 1
    finally:
        run.close()
    print(summary(record))
    if run.recorder is not None:
        from planner.show_command import render_serving

        row = store.apply(run.recorder.row.id)
        print("\n".join(render_serving(row.serving)[1:]) + f"\n\n`pipeshift show {row.id}` shows it again.")
    return 0 if record["outcome"] == "applied" else 1


class Interrupts:
    """Counts Ctrl-C instead of raising: the first asks the server to cancel the apply, a
    second stops following it (the apply goes on, on the server)."""

    def __init__(self) -> None:
        self.count = 0
        self._previous = None

    def _on_sigint(self, signum, frame) -> None:
        self.count += 1
        if self.count > 1:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt

    def __enter__(self) -> Interrupts:
        import rich.progress  # noqa: F401  (imported before any Ctrl-C can land inside it)

        self._previous = signal.signal(signal.SIGINT, self._on_sigint)
        return self

    def __exit__(self, *exc) -> None:
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)


def build_target(args: argparse.Namespace, deployment: dict[str, Any]) -> dict[str, Any]:
    """Returns the admin API's target body from --stages, --plan or -f; raises ValueError."""
    from planner.configuration import Configuration, read_json_file

    names = [d["name"] for d in deployment["devices"] if d["state"] != "dead"]
    if args.stages:
        return {"stages": args.stages}
    if args.plan:
        config = Configuration.from_json(read_json_file(args.plan, f"--plan {args.plan}"))
        if set(config.devices()) <= set(names):  # already named as the server names its workers
            return {"target": config.to_json()}
        return {"target": config.map_devices(names).to_json()}
    from planner.deployment_state import plan_from_spec

    return {"target": plan_from_spec(args.file, deployment, names, args.time_limit).to_json()}


def confirm() -> bool:
    print("\nDo you want to perform these actions?\n  Only 'yes' will be accepted to approve.\n")
    try:
        return input("  Enter a value: ").strip() == "yes"
    except (EOFError, KeyboardInterrupt):  # no input, or Ctrl-C at the prompt: not a yes
        print()
        return False


def follow(client, apply_id: str, interrupts: Interrupts | None = None,
           on_update: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Shows one progress bar per phase until the apply ends; the first Ctrl-C asks the
    server to cancel it (before its switch it aborts; after, it completes)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from planner.admin_client import AdminError

    columns = (TextColumn("{task.description:<9}"), BarColumn(), TextColumn("{task.fields[note]}"),
               TimeElapsedColumn())
    cancelled = False
    with Progress(*columns, transient=False) as progress:
        tasks: dict[str, Any] = {}
        while True:
            if interrupts is not None and interrupts.count and not cancelled:
                cancelled = True
                progress.console.print("Interrupt received: asking the server to cancel the apply "
                                       "(Ctrl-C again stops following it; the server goes on)")
                try:
                    client.cancel(apply_id)
                except AdminError as exc:
                    progress.console.print(f"cancel failed: {exc}")
            record = client.get_apply(apply_id)
            if on_update is not None:
                on_update(record)
            for phase in record["phases"]:
                name = phase["name"]
                if name not in tasks:
                    tasks[name] = progress.add_task(name, total=1.0, note="")
                progress.update(tasks[name], completed=_done_fraction(phase), note=_note(phase))
            if record["state"] == "done":
                return record
            time.sleep(POLL_S)


def _done_fraction(phase: dict[str, Any]) -> float:
    if phase["state"] in ("done", "skipped", "failed"):
        return 1.0
    if phase["state"] == "running" and phase["bytes_expected"]:
        return min(0.99, phase["bytes"] / phase["bytes_expected"])
    return 0.0


def _note(phase: dict[str, Any]) -> str:
    if phase["state"] == "pending":
        return ""
    moved = f"{phase['bytes'] / 2**20:.1f} MiB" if phase["bytes"] else ""
    return f"{phase['state']} {moved}".strip()


def summary(record: dict[str, Any]) -> str:
    """Returns the measured-beside-predicted table and the outcome line."""
    measured, predicted = record["measured"], record["predicted"]

    def fmt(value: float | None, unit: str) -> str:
        if value is None:
            return "-"
        if unit == "MiB":
            return f"{value / 2**20:.1f} MiB"
        if unit == "ms":
            return f"{value:.1f} ms"
        return f"{value:.2f} s"

    rows = [
        ("bytes moved", fmt(measured["bytes_moved"], "MiB"), fmt(predicted["bytes_moved"], "MiB")),
        ("prefetch", fmt(measured["prefetch_s"], "s"), fmt(predicted["prefetch_s"], "s")),
        ("KV pre-copy", fmt(measured["precopy_s"], "s"), fmt(predicted["precopy_s"], "s")),
        ("stall", fmt(measured["stall_ms"], "ms"), fmt(predicted["stall_ms"], "ms")),
    ]
    lines = ["", f"{'':<12}{'measured':>14}{'predicted':>14}"]
    lines += [f"{name:<12}{m:>14}{p:>14}" for name, m, p in rows]
    outcome = record["outcome"]
    if outcome == "applied":
        lines.append(f"\nApply complete: epoch {record['epoch_to']} serves.")
    elif outcome == "aborted":
        lines.append(f"\nApply aborted ({record['error']}): nothing changed, epoch {record['epoch_from']} "
                     "still serves.")
    elif outcome == "rolled_back":
        lines.append(f"\nApply rolled back after its switch ({record['error']}): requests returned to the old "
                     f"pipelines; epoch {record['epoch_from']} serves.")
    else:
        lines.append(f"\nApply failed: {record['error']}")
    return "\n".join(lines)
