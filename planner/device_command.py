"""`pipeshift device drain DEVICE` and `pipeshift device add [DEVICE]`: devices leave and join a
serving deployment. Draining moves the device's layers elsewhere live (the admin API plans the
configuration without it and applies it), then marks it drained. Adding a new name (worker-N,
as the server names its workers) starts a worker process for it and returns once it is up, a
spare holding no layers until an apply or the controller places some on it; adding a drained
device makes it available to the planner and the controller again. Without a name, add
re-admits the first drained device, or else starts a new worker under the next free name."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from planner.apply_command import DEFAULT_SERVER

    p = subparsers.add_parser("device", help="drain a device of a serving deployment, or add one",
                              description=__doc__)
    actions = p.add_subparsers(dest="device_action", metavar="ACTION")
    drain = actions.add_parser("drain", help="move a device's layers elsewhere live, then mark it drained")
    drain.add_argument("device", metavar="DEVICE", help="e.g. worker-2 (GET /admin/v1/deployment lists them)")
    drain.add_argument("--no-wait", action="store_true", help="return once the apply has started")
    add = actions.add_parser("add", help="start a new device (a worker process), or make a drained one available again")
    add.add_argument("device", nargs="?", default=None, metavar="DEVICE",
                     help="a new name (worker-N) to start a worker under, or a drained device to re-admit "
                          "(default: the first drained one, or else a new worker under the next free name)")
    add.add_argument("--kind", default=None,
                     help="the new device's kind; a local server starts its own kind only (cpu)")
    from planner.init_command import add_database_argument

    for sub in (drain, add):
        sub.add_argument("--server", default=DEFAULT_SERVER,
                         help="the serving process (default $PIPESHIFT_SERVER or http://127.0.0.1:8000)")
        sub.add_argument("--token", default=os.environ.get("PIPESHIFT_ADMIN_TOKEN"))
        add_database_argument(sub)
        sub.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run(args: argparse.Namespace) -> int:
    """With a store (`pipeshift init`), a drain is recorded as an apply is: under the
    deployment's lock, its row in `pipeshift history`, the configuration it leaves with source
    `drain`; an add records the devices' states."""
    from planner.admin_client import AdminClient
    from planner.operations import ApplyRun, OperationError
    from planner.store import NoStore, open_store
    from planner.store.database import database_url

    try:
        store = open_store(args.database_url or database_url())
    except NoStore as exc:
        store = None
        if args.device_action == "drain":
            print(f"Note: {exc}; this drain is not recorded.\n", file=sys.stderr)
    run = ApplyRun(store, AdminClient(args.server, args.token), source="drain")
    try:
        return _add(args, run) if args.device_action == "add" else _drain(args, run)
    except OperationError as exc:
        print(f"pipeshift device {args.device_action}: error: {exc}", file=sys.stderr)
        return 1 if exc.status >= 500 or exc.status == 409 else 2
    finally:
        run.close()
        if store is not None:
            store.close()


def _add(args: argparse.Namespace, run) -> int:
    from planner.admin_client import AdminError
    from planner.operations import OperationError

    try:
        if run.store is not None:  # a store holding another deployment's history: refused before adding
            from planner.deployment_state import locate

            locate(run.store, run.client.deployment(), run.client)
        answer = run.client.add_device(args.device, args.kind)
    except AdminError as exc:
        raise OperationError(str(exc), 503 if exc.status is None or exc.status >= 500 else exc.status) from None
    print(answer["message"])
    _print_notes(run.refresh_devices())
    return 0


def _print_notes(lines: list[str]) -> None:
    """Says what a refresh noted (the deployment moved, applies completed from the server's
    record), as plan and apply do."""
    for line in lines:
        print(f"Note: {line}.")


def _drain(args: argparse.Namespace, run) -> int:
    answer = run.drain(args.device)
    _print_notes(run.notes)
    print(answer["message"])
    record = answer.get("apply")
    if record is None:
        return 0
    if args.no_wait:
        if run.recorder is not None:
            row = run.store.detach_apply(run.recorder.row.id, "not followed (`pipeshift device drain --no-wait`)")
            print(f"Recorded as {row.id}, not followed: the next command that reads the deployment "
                  "(`pipeshift plan --server`, apply, device) fills it in from the server's record.")
        return 0
    final, _ = run.follow()
    _print_notes(run.refresh_devices())  # the device is `drained` now, or serving again
    if final["outcome"] != "applied":
        print(f"pipeshift device drain: the apply ended {final['outcome']}: {final.get('error') or ''}; "
              f"{args.device} keeps serving", file=sys.stderr)
        return 1
    stall = final["measured"].get("stall_ms")
    print(f"{args.device} is drained (apply {record['id']}, epoch {final['epoch_to']}"
          + (f", switch held requests {stall:.1f} ms" if stall is not None else "") + ")"
          + (f"; recorded as {run.recorder.row.id} (`pipeshift show {run.recorder.row.id}`)"
             if run.recorder is not None else ""))
    return 0
