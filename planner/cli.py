"""The `pipeshift` command line: one entry point, one module per subcommand."""

from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> module exposing `register(subparsers)`; the module adds its parser and sets
# `func`. Modules import their heavy dependencies inside `func`, so `--help` stays fast.
COMMAND_MODULES = {
    "serve": "agent.serve_command",
    "demo": "agent.demo_command",
    "plan": "planner.plan_command",
    "examples": "planner.examples_command",
    "apply": "planner.apply_command",
    "init": "planner.init_command",
    "history": "planner.history_command",
    "force-unlock": "planner.force_unlock_command",
    "rollback": "planner.rollback_command",
    "planner": "planner.planner_command",
    "show": "planner.show_command",
    "simulate": "planner.simulate_command",
    "calibrate": "agent.calibrate_command",
    "devices": "cost_models.devices_command",
    "device": "planner.device_command",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pipeshift",
        description="Serve an LLM split into pipeline stages, and plan how to split it.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue  # a subcommand not built yet
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `pipeshift plan ... | head`: the reader left; not an error
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:  # Ctrl-C: a line, not a traceback
        print(f"\npipeshift {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
