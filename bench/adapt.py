"""Following the workload, in simulation: the controller against the best static configuration
chosen in hindsight, and against a controller without the payback rule.

    python bench/adapt.py [--cases 8b:1.5,13b:1.5,13b:1.65] [--window 300] [--phased S]
                          [--recompute never|losing|always] [--speed] [--out FILE]

For each case (spec, rate scale) the Azure conversational trace (data/traces/) has its
inter-arrival times divided by the rate scale (the hour is compressed; nothing else changes),
and requests beyond the model's context are dropped (a server refuses them). Then:

- static candidates: the planner's configurations (most throughput, and the fewest devices
  carrying the demand times 1.25, 1.6 and 2.0: planner.adapt.candidates) for the whole
  trace's aggregate workload and for every `--window` seconds of it; each candidate is
  simulated over the whole trace;
- best static (equal pool): the candidate with the most SLO goodput; among those within
  GOODPUT_TIE (1 %) of it, the one with the fewest device-hours; best static (equal device-hours): the most goodput among candidates that
  use no more device-hours than the controller;
- auto: the controller (planner/controller.py through planner/adapt.py) every 60 s over the
  last `--window` s, starting from the whole trace's plan;
- no payback: the same re-planning with ControllerPolicy.without_payback() (no payback, no
  hysteresis, no dwell).

- hindsight per window (the bound on any controller): each `--window` of the trace served by
  the candidate that meets the SLOs for the most of its requests, changes free and instant,
  every window from an idle deployment; against the best static counted the same way. With
  it, the demand each window asks for: request rate, output (decode) and prompt tokens per s.

`--phased S` replaces each case's request lengths to alternate every S seconds between the
trace's own extremes (prompt <= 600 with output >= 300; prompt >= 1,500 with output <= 120),
drawn from its requests, arrivals unchanged: the sharpest mix shift the trace's requests
make, to bound what a controller could gain if the mix swung.

`--recompute` says when the controller's changes may drop the KV of running requests that
memory cannot hold through them, to recompute it: `losing` (the default, as `serve`): only out
of a configuration predicted to lose more than 10 % of the requests
(ControllerPolicy.recompute_when_losing); `always` (ControllerPolicy.recompute_overflow,
`serve --controller-recompute`); `never` (`serve --controller-recompute-when-losing 1`): a change
whose KV does not fit is not made.

`--speed` also times one hour of the trace (rate x10) over 64 GPUs (16 A100 + 48 L40S,
Llama-3.1-8B), static and auto. Prints tables; writes JSON (default bench/out/adapt.json).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cost_models.model_catalog import get_model_arch  # noqa: E402
from planner.adapt import WorkloadWindow, candidates, window_spec  # noqa: E402
from planner.controller import ControllerPolicy  # noqa: E402
from planner.simulator import (  # noqa: E402
    SimResult,
    Stages,
    shape,
    simulate,
    within_context,
)
from planner.spec import Spec, load_spec, parse_spec  # noqa: E402
from planner.trace import Trace, load_trace  # noqa: E402

TRACE = ROOT / "data/traces/AzureLLMInferenceTrace_conv.csv"
GOODPUT_TIE = 0.01
RECOMPUTE: dict[str, dict[str, Any]] = {  # --recompute: the policy's fields for each choice
    "never": {"recompute_overflow": False, "recompute_when_losing": 1.0},
    "losing": {},  # the policy's default
    "always": {"recompute_overflow": True},
}
SPECS = {
    "8b": ROOT / "data/specs/azure-conv-a100-l40s-llama31-8b.yaml",
    "13b": ROOT / "data/specs/azure-conv-a100-l40s-llama2-13b.yaml",
}


@dataclass
class Row:
    name: str
    result: SimResult

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, **self.result.to_json()}


def static_candidates(spec: Spec, trace: Trace, window_s: float) -> list[Stages]:
    """Returns the planner's configurations for the whole trace and for each window of it."""
    out: list[Stages] = []
    for lo_s, hi_s in [(0.0, trace.duration_s + 1.0), *spans(trace.duration_s, window_s)]:
        part = segment(trace, lo_s, hi_s)
        if len(part) < 10:
            continue
        window = WorkloadWindow.of(part.prompt, part.output, min(hi_s, trace.duration_s) - lo_s)
        for config in candidates(window_spec(spec, window, None), None, 10.0):
            key = sorted(tuple(p) for p in config)
            if all(sorted(tuple(p) for p in c) != key for c in out):
                out.append(config)
    return out


def spans(duration_s: float, window_s: float) -> list[tuple[float, float]]:
    """Returns the consecutive `window_s` spans that cover [0, duration_s]."""
    out, t = [], 0.0
    while t < duration_s:
        out.append((t, t + window_s))
        t += window_s
    return out


def segment(trace: Trace, lo_s: float, hi_s: float) -> Trace:
    """Returns the requests arriving in [lo_s, hi_s), arrivals shifted to start at 0."""
    return trace.subset([i for i, a in enumerate(trace.arrival_s) if lo_s <= a < hi_s], lo_s)


def hindsight_per_window(
    spec: Spec, trace: Trace, configs: list[Stages], best: int, window_s: float
) -> dict[str, Any]:
    """Returns the bound on what changing configuration can add: each window served by the
    configuration of `configs` that meets the SLOs for the most of its requests there, with
    free, instant changes and no backlog carried between windows, against `configs[best]`
    counted the same way; and the demand of each window."""
    windows = []
    oracle_met = static_met = 0
    for lo_s, hi_s in spans(trace.duration_s, window_s):
        part = segment(trace, lo_s, hi_s)
        if len(part) < 2:
            continue
        met = [
            round(simulate(spec, part, "static", initial=c).slo_attainment * len(part))
            for c in configs
        ]
        pick = max(range(len(configs)), key=lambda j: (met[j], j == best))
        oracle_met += met[pick]
        static_met += met[best]
        seconds = min(hi_s, trace.duration_s) - lo_s
        windows.append(
            {
                "t_s": lo_s,
                "requests": len(part),
                "rate_rps": round(len(part) / seconds, 2),
                "output_tok_s": round(sum(part.output) / seconds),
                "prompt_tok_s": round(sum(part.prompt) / seconds),
                "best": shape(configs[pick]),
                "met_best": met[pick],
                "met_static": met[best],
            }
        )
    full = [w for w in windows if w["t_s"] + window_s <= trace.duration_s]

    def swing(key: str) -> float:
        values = [w[key] for w in full] or [1]
        return round(max(values) / max(min(values), 1e-9), 2)

    return {
        "window_s": window_s,
        "met_per_window_best": oracle_met,
        "met_best_static": static_met,
        "bound": round(oracle_met / max(static_met, 1), 3),
        "swing_max_over_min": {k: swing(k) for k in ("rate_rps", "output_tok_s", "prompt_tok_s")},
        "windows": windows,
    }


SHORT_PROMPT_LONG_OUTPUT = (600, 300)  # prompt <= 600, output >= 300
LONG_PROMPT_SHORT_OUTPUT = (1500, 120)  # prompt >= 1,500, output <= 120


def phased(trace: Trace, phase_s: float, seed: int = 0) -> Trace:
    """Returns the trace's arrivals with lengths drawn from its own requests, alternating every
    `phase_s` between short prompts with long outputs and long prompts with short outputs."""
    idx = range(len(trace))
    short = [
        i
        for i in idx
        if trace.prompt[i] <= SHORT_PROMPT_LONG_OUTPUT[0]
        and trace.output[i] >= SHORT_PROMPT_LONG_OUTPUT[1]
    ]
    long_ = [
        i
        for i in idx
        if trace.prompt[i] >= LONG_PROMPT_SHORT_OUTPUT[0]
        and trace.output[i] <= LONG_PROMPT_SHORT_OUTPUT[1]
    ]
    rng = random.Random(seed)
    out = Trace([], [], [])
    for a in trace.arrival_s:
        j = rng.choice(short if int(a // phase_s) % 2 == 0 else long_)
        out.arrival_s.append(a)
        out.prompt.append(trace.prompt[j])
        out.output.append(trace.output[j])
    return out


def case_spec(key: str) -> Spec:
    """Returns the spec of a case key: `8b` or `13b`, with `-bN` for a micro-batch of at most
    N sequences instead of the spec's 16 (e.g. 13b-b64: a server that admits by KV, as vLLM's
    default max_num_seqs of 256 does)."""
    name, _, batch = key.partition("-b")
    path = SPECS[name]
    if not batch:
        return load_spec(path)
    text = path.read_text().replace("batch: 16", f"batch: {int(batch)}")
    return parse_spec(text, str(path), str(path.parent))


def run_case(
    key: str,
    rate_scale: float,
    window_s: float,
    phase_s: float | None = None,
    recompute: str = "losing",
) -> dict[str, Any]:
    spec = case_spec(key)
    trace, dropped = within_context(
        load_trace(TRACE, rate_scale=rate_scale), get_model_arch(spec.model).max_context
    )
    if phase_s:
        trace = phased(trace, phase_s)
    t0 = time.perf_counter()
    configs = static_candidates(spec, trace, window_s)
    plan_s = time.perf_counter() - t0
    statics = [Row(shape(c), simulate(spec, trace, "static", initial=c)) for c in configs]
    top = max(r.result.goodput_rps for r in statics)
    # the most goodput; within GOODPUT_TIE of it, the fewest device-hours
    best = min(
        (r for r in statics if r.result.goodput_rps >= top * (1 - GOODPUT_TIE)),
        key=lambda r: r.result.device_hours,
    )
    bound = hindsight_per_window(spec, trace, configs, statics.index(best), window_s)
    kv = RECOMPUTE[recompute]
    rule = replace(ControllerPolicy(), **kv)
    naive_rule = replace(ControllerPolicy.without_payback(), **kv)
    auto = Row("auto", simulate(spec, trace, "auto", controller=rule, window_s=window_s))
    naive = Row(
        "no payback", simulate(spec, trace, "auto", controller=naive_rule, window_s=window_s)
    )
    fair = [r for r in statics if r.result.device_hours <= auto.result.device_hours + 1e-9]
    best_dh = max(fair, key=lambda r: r.result.goodput_rps) if fair else None
    return {
        "case": key,
        "spec": str(SPECS[key.partition("-b")[0]].relative_to(ROOT)),
        "batch": spec.workload.batch,
        "rate_scale": rate_scale,
        "controller_recompute": recompute,
        "phased_s": phase_s,
        "requests": len(trace),
        "dropped_beyond_context": dropped,
        "duration_s": trace.duration_s,
        "static_candidates": len(statics),
        "candidate_planning_s": round(plan_s, 1),
        "best_static": best.to_json(),
        "best_static_equal_device_hours": best_dh.to_json() if best_dh else None,
        "auto": auto.to_json(),
        "no_payback": naive.to_json(),
        "hindsight_per_window": bound,
        "statics": [
            {
                "name": r.name,
                "goodput_rps": r.result.goodput_rps,
                "slo_attainment": r.result.slo_attainment,
                "device_hours": r.result.device_hours,
            }
            for r in statics
        ],
    }


def speed() -> dict[str, Any]:
    """Returns the wall time of one hour of the trace over 64 GPUs, static and auto: as
    recorded (19,366 requests) and at ten times its rate (the trace repeated 10 times, each
    copy compressed into 6 minutes)."""
    text = (ROOT / "data/specs/azure-conv-a100-l40s-llama31-8b.yaml").read_text()
    text = text.replace("count: 2, node: gpu-a", "count: 16, node: gpu-a").replace(
        "count: 4, node: gpu-b", "count: 48, node: gpu-b"
    )
    spec = parse_spec(text, "64-gpu", str(ROOT / "data/specs"))
    x10 = load_trace(TRACE, rate_scale=10.0)
    hour_x10 = Trace([], [], [])
    for k in range(10):
        hour_x10.arrival_s.extend(a + k * 360.0 for a in x10.arrival_s)
        hour_x10.prompt.extend(x10.prompt)
        hour_x10.output.extend(x10.output)
    out: dict[str, Any] = {"devices": 64}
    for label, hour in (("x1", load_trace(TRACE)), ("x10", hour_x10)):
        row: dict[str, Any] = {"requests": len(hour), "duration_s": hour.duration_s}
        for policy in ("static", "auto"):
            t0 = time.perf_counter()
            r = simulate(spec, hour, policy)
            row[f"{policy}_wall_s"] = round(time.perf_counter() - t0, 2)
            row[f"{policy}_goodput_rps"] = round(r.goodput_rps, 2)
            row[f"{policy}_device_hours"] = round(r.device_hours, 2)
            row[f"{policy}_reconfigurations"] = len(r.reconfigurations)
        out[label] = row
    return out


def _row(label: str, r: dict[str, Any], ref: dict[str, Any]) -> str:
    stall = sum(r["reconfiguration_stall_ms"])
    prefetch = sum(x["prefetch_s"] for x in r["reconfiguration_list"])
    return (
        f"| {label} | {r['goodput_rps']:.2f} ({r['goodput_rps'] / ref['goodput_rps']:.2f}x) "
        f"| {r['slo_attainment']:.1%} | {r['ttft_ms']['p90']:,.0f} / {r['ttft_ms']['p99']:,.0f} "
        f"| {r['tpot_ms']['p90']:.0f} | {r['device_hours']:.2f} "
        f"({r['device_hours'] / ref['device_hours'] - 1:+.0%}) | {r['reconfigurations']} "
        f"| {stall:.0f} ms / {prefetch:.0f} s |"
    )


def print_case(c: dict[str, Any]) -> None:
    print(
        f"\n{c['spec']}, batch {c.get('batch', 16)}, rate x{c['rate_scale']:g}"
        + (f", lengths phased every {c['phased_s']:g} s" if c.get("phased_s") else "")
        + ": "
        f"{c['requests']} requests over "
        f"{c['duration_s']:.0f} s; {c['static_candidates']} static candidates "
        f"(planned in {c['candidate_planning_s']} s)"
    )
    print(
        "| policy | goodput req/s (vs best static) | SLO attainment | TTFT p90 / p99 ms "
        "| TPOT p90 ms | device-hours (vs best static) | reconfigurations | stalls / prefetch |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ref = c["best_static"]
    print(_row(f"best static, equal pool: {ref['name']}", ref, ref))
    if c["best_static_equal_device_hours"]:
        r = c["best_static_equal_device_hours"]
        print(_row(f"best static, <= auto's device-hours: {r['name']}", r, ref))
    print(_row("auto (payback rule)", c["auto"], ref))
    print(_row("auto without payback", c["no_payback"], ref))
    b = c["hindsight_per_window"]
    sw = b["swing_max_over_min"]
    picks = sorted({w["best"] for w in b["windows"]})
    print(
        f"hindsight per {b['window_s']:g} s window (free instant changes, no backlog carried): "
        f"{b['met_per_window_best']} requests meet the SLOs against {b['met_best_static']} for "
        f"the best static: bound {b['bound']:.3f}x; windows pick {', '.join(picks)}; demand "
        f"swings (max/min over full windows) rate {sw['rate_rps']}x, output tok/s "
        f"{sw['output_tok_s']}x, prompt tok/s {sw['prompt_tok_s']}x"
    )
    dh = c["best_static_equal_device_hours"]
    if dh:
        print(
            f"goodput, auto / best static at equal device-hours: "
            f"{c['auto']['goodput_rps'] / dh['goodput_rps']:.2f}x"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--cases",
        default="8b:1.5,13b:1.5,13b:1.65",
        help="KEY:RATE_SCALE,... (keys 8b, 13b; 13b-b64: at most 64 sequences per micro-batch)",
    )
    ap.add_argument("--window", type=float, default=300.0, help="seconds per planning window")
    ap.add_argument(
        "--phased",
        type=float,
        default=None,
        metavar="S",
        help="alternate the trace's extreme request lengths every S seconds (module doc)",
    )
    ap.add_argument(
        "--recompute",
        choices=sorted(RECOMPUTE),
        default="losing",
        help="when the controller's changes may drop KV that does not fit (module doc)",
    )
    ap.add_argument("--speed", action="store_true", help="also time 1 h over 64 GPUs")
    ap.add_argument("--out", default=str(ROOT / "bench/out/adapt.json"))
    args = ap.parse_args()
    report: dict[str, Any] = {"machine": platform.processor() or platform.machine(), "cases": []}
    for item in args.cases.split(","):
        key, scale = item.split(":")
        case = run_case(key, float(scale), args.window, args.phased, args.recompute)
        print_case(case)
        report["cases"].append(case)
    if args.speed:
        report["speed"] = speed()
        for label in ("x1", "x10"):
            s = report["speed"][label]
            print(
                f"speed, rate {label}: {s['requests']} requests over {s['duration_s']:.0f} s on "
                f"64 GPUs: static {s['static_wall_s']} s, auto {s['auto_wall_s']} s"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
