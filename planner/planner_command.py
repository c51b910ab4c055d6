"""`pipeshift planner [--host H] [--port P] [--server URL]`: serve the planner REST API alone
(planner/api/app.py), over the store, changing the deployment at --server.

Without PIPESHIFT_API_TOKEN it listens on this host only: anyone who can reach it could change
the deployment."""

from __future__ import annotations

import argparse
import os
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    from planner.apply_command import DEFAULT_SERVER
    from planner.init_command import add_database_argument

    p = subparsers.add_parser("planner", help="serve the planner REST API (plans, applies, history)",
                              description="Serve the REST API that plans, applies and rolls back a "
                              "deployment's configuration and reads the store's history.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (anything but this host needs PIPESHIFT_API_TOKEN)")
    p.add_argument("--port", type=int, default=8100)
    p.add_argument("--server", default=DEFAULT_SERVER,
                   help="the serving process it changes (default $PIPESHIFT_SERVER or http://127.0.0.1:8000)")
    p.add_argument("--admin-token", default=os.environ.get("PIPESHIFT_ADMIN_TOKEN"),
                   help="that server's admin token (default $PIPESHIFT_ADMIN_TOKEN)")
    add_database_argument(p)
    p.set_defaults(func=run)


def check_exposure(host: str, token: str | None, what: str) -> str | None:
    """Returns why `what` must not listen on `host` without a token, or None when it may."""
    from agent.gateway.server import is_loopback
    from planner.api.app import TOKEN_VARIABLE

    if token or is_loopback(host):
        return None
    return (f"{what} would listen on {host} without {TOKEN_VARIABLE}: anyone reaching it could change "
            f"the deployment. Set {TOKEN_VARIABLE} (clients send `Authorization: Bearer TOKEN`), "
            "or listen on 127.0.0.1")


def run(args: argparse.Namespace) -> int:
    from agent.gateway.server import listening_socket, run_server
    from planner.api import create_planner_app
    from planner.api.app import TOKEN_VARIABLE
    from planner.init_command import open_store_or_say

    token = os.environ.get(TOKEN_VARIABLE) or None
    refusal = check_exposure(args.host, token, "the planner API")
    if refusal:
        print(f"pipeshift planner: error: {refusal}", file=sys.stderr)
        return 2
    store = open_store_or_say("planner", args.database_url)
    if store is None:
        return 1
    try:
        sock = listening_socket(args.host, args.port)
    except ValueError as exc:
        store.close()
        print(f"pipeshift planner: error: {exc}", file=sys.stderr)
        return 1
    try:
        port = sock.getsockname()[1]
        print(f"pipeshift planner: API at http://{args.host}:{port}/v1 (OpenAPI at /openapi.json), "
              f"changing the deployment at {args.server}", flush=True)
        run_server(create_planner_app(store, args.server, args.admin_token, token), args.host, port,
                   sock=sock)
    except ValueError as exc:  # another server started on the port meanwhile
        print(f"pipeshift planner: error: {exc}", file=sys.stderr)
        return 1
    finally:
        sock.close()
        store.close()
    return 0
