"""`pipeshift simulate -f SPEC.yaml --trace TRACE.csv [--policy static|auto] [--json]
[--plot DIR]`: a trace (Azure LLM inference format, or arrival_s, prompt_tokens,
output_tokens) over the spec's planned deployment, in
simulation (planner/simulator.py), with the same cost models, planner and controller rule."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from planner.spec import Spec


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate a request trace over the planned deployment",
        description="Replay a request trace (a CSV or JSON Lines with the columns TIMESTAMP, "
        "ContextTokens, GeneratedTokens as Azure's traces, or arrival_s, prompt_tokens, output_tokens) over "
        "the spec's planned deployment; report TTFT/TPOT percentiles, SLO goodput, "
        "device-hours and reconfigurations.",
    )
    p.add_argument("-f", "--file", required=True, help="spec file (YAML)")
    p.add_argument(
        "--trace",
        required=True,
        help="trace CSV: Azure's LLM inference format, or arrival_s, prompt_tokens, "
        "output_tokens columns",
    )
    p.add_argument("--policy", choices=("static", "auto"), default="static")
    p.add_argument(
        "--rate-scale",
        type=_positive("--rate-scale"),
        default=1.0,
        metavar="X",
        help="divide inter-arrival times by X (default 1)",
    )
    p.add_argument(
        "--duration",
        type=_positive("--duration"),
        default=None,
        metavar="S",
        help="simulate only the first S seconds of the (scaled) trace",
    )
    p.add_argument(
        "--control-interval",
        type=_positive("--control-interval"),
        default=60.0,
        metavar="S",
        help="auto: seconds between controller decisions (default 60)",
    )
    p.add_argument(
        "--model",
        metavar="NAME",
        default=None,
        help="with a spec that lists several `models`: the one the trace drives, over the "
        "whole pool",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--plot",
        metavar="DIR",
        help="write load, configuration and TTFT/TPOT over time as PNG files into DIR",
    )
    p.set_defaults(func=run)


def _positive(option: str):
    """Returns an argparse type: a finite number above 0, else a usage error naming `option`."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} takes a number, got {text!r}") from None
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"{option} must be a number above 0, got {text}")
        return value

    return parse


def run(args: argparse.Namespace) -> int:
    from cost_models.model_catalog import get_model_arch
    from planner.simulator import simulate, within_context
    from planner.spec import SpecError, load_spec
    from planner.trace import load_trace

    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print(
            "pipeshift simulate: error: --plot needs matplotlib: pip install 'pipeshift[plot]'",
            file=sys.stderr,
        )
        return 1
    if args.plot:  # made before simulating, so that a path it cannot use loses no simulation
        try:
            Path(args.plot).mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            print(
                f"pipeshift simulate: error: cannot make the folder {args.plot} for --plot "
                f"({exc.strerror or exc}): --plot takes a folder to write its PNG files into",
                file=sys.stderr,
            )
            return 1
    try:
        spec = _one_model(load_spec(args.file), args.model)
        trace = load_trace(args.trace, args.rate_scale, args.duration)
        trace, dropped = within_context(trace, get_model_arch(spec.model).max_context)
        if dropped:
            print(
                f"{dropped} requests exceed {spec.model}'s context; left out (a server "
                "refuses them)",
                file=sys.stderr,
            )
        if not len(trace):
            print("no request of the trace fits the model's context", file=sys.stderr)
            return 1
        result = simulate(spec, trace, args.policy, control_interval_s=args.control_interval)
    except (SpecError, OSError) as exc:
        print(str(exc), file=sys.stderr)
        return 1
    if args.plot:
        from planner.simulation_plot import plot_simulation

        try:
            for path in plot_simulation(result, args.plot):
                print(f"wrote {path}", file=sys.stderr)
        except OSError as exc:
            print(f"pipeshift simulate: error: cannot write the plots into {args.plot} "
                  f"({exc.strerror or exc}): give --plot a folder you can write", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(
        f"policy {result.policy}: {result.requests} requests over {result.duration_s:.0f} s "
        f"(simulated in {result.wall_s:.1f} s)"
    )
    for name in ("ttft_ms", "tpot_ms"):
        q = getattr(result, name)
        print(
            f"  {name[:4].upper()} ms   p50 {q['p50']:.1f}  p90 {q['p90']:.1f}  p99 {q['p99']:.1f}"
        )
    print(
        f"  SLO goodput {result.goodput_rps:.2f} req/s, attainment "
        f"{result.slo_attainment:.1%}, device-hours {result.device_hours:.2f}"
    )
    print(f"  reconfigurations {len(result.reconfigurations)}")
    for r in result.reconfigurations:
        print(
            f"    t={r.decided_s:.0f} s: {r.devices_before} -> {r.devices_after} devices, "
            f"prefetch {r.prefetch_s:.1f} s, stall {r.stall_ms:.1f} ms: {r.reason}"
        )
    return 0


def _one_model(spec: Spec, name: str | None) -> Spec:
    """Returns the spec itself, or the named entry of a spec with several `models`."""
    from planner.spec import SpecError

    if spec.models is None:
        if name is not None and name.lower() != str(spec.model).lower():
            raise SpecError([f"--model {name}: this spec serves {spec.model} only"])
        return spec
    labels = spec.model_labels()
    if name is None:
        raise SpecError(
            [
                f"this spec lists several models ({', '.join(labels)}); simulate one with "
                "--model NAME (the trace drives that model over the whole pool)"
            ]
        )
    for label, single in zip(labels, spec.single_model_specs(), strict=True):
        if name.lower() in (label.lower(), str(single.model).lower()):
            return single
    raise SpecError([f"--model {name}: not in this spec; it lists {', '.join(labels)}"])
