"""The human-readable plan: pipelines as tables, predictions, and Terraform-style changes."""

from __future__ import annotations

from planner.problem import PlanningProblem, PoolProblem
from planner.solution import Pipeline, PlanResult

GIB = 2**30


def _pct(gap: float | None) -> str:
    return "unknown" if gap is None else f"{gap * 100:.3g} %"


def device_changes(problem: PlanningProblem, result: PlanResult) -> list[str]:
    """Returns one `+`/`~`/`-` line per device whose layers change, Terraform style."""
    if problem.migration is None:
        return []
    old = {s.device: (s.start, s.end) for p in problem.migration.current for s in p}
    new = {s.device: (s.start, s.end) for p in result.pipelines for s in p.stages}
    w = problem.layer_weight_bytes
    lines = []
    for dev in sorted(set(old) | set(new)):
        o, n = old.get(dev), new.get(dev)
        if o == n:
            continue
        if o is None and n is not None:
            lines.append(
                f"  + {dev}: load layers [{n[0]}, {n[1]})  ({(n[1] - n[0]) * w / GIB:.1f} GiB)"
            )
        elif n is None and o is not None:
            gone = "" if dev in {d.name for d in problem.devices} else " (device gone)"
            lines.append(f"  - {dev}: free layers [{o[0]}, {o[1]}){gone}")
        elif o is not None and n is not None:
            fresh = sum(1 for layer in range(*n) if not o[0] <= layer < o[1])
            lines.append(
                f"  ~ {dev}: layers [{o[0]}, {o[1]}) -> [{n[0]}, {n[1]})  "
                f"(load {fresh * w / GIB:.1f} GiB)"
            )
    adds = sum(1 for x in lines if x.startswith("  +"))
    changes = sum(1 for x in lines if x.startswith("  ~"))
    destroys = sum(1 for x in lines if x.startswith("  -"))
    lines.append(f"Plan: {adds} to add, {changes} to change, {destroys} to destroy.")
    return lines


def cost_sources(problem: PlanningProblem) -> dict[str, dict[str, object]]:
    """Returns, per device kind, where its costs came from: a profile (which file, and per
    quantity whether measured or the roofline), calibration, or the roofline."""
    out: dict[str, dict[str, object]] = {}
    for k in problem.kinds:
        if k.cost_source is not None and k.name not in out:
            out[k.name] = k.cost_source.to_json()
    return out


def cost_lines(problem: PlanningProblem) -> list[str]:
    """Returns one line per device kind saying where its costs came from."""
    seen: dict[str, str] = {}
    for k in problem.kinds:
        if k.cost_source is not None:
            seen.setdefault(k.name, k.cost_source.describe())
    return ["costs:", *(f"  {line}" for line in seen.values())] if seen else []


def pipeline_lines(pipelines: list[Pipeline] | tuple[Pipeline, ...]) -> list[str]:
    """Returns each pipeline as a heading line and a table of its stages."""
    out = []
    for i, p in enumerate(pipelines):
        out.append("")
        out.append(
            f"pipeline {i}{' (kept)' if p.kept else ''}: {len(p.stages)} stage(s), "
            f"{p.throughput_tok_s:.1f} tok/s, TTFT {p.ttft_s * 1000:.0f} ms, "
            f"TPOT {p.tpot_s * 1000:.1f} ms"
        )
        out.append(
            f"  {'stage':<6}{'device':<26}{'layers':<12}{'memory GiB':<16}"
            f"{'decode ms':>10}{'prefill ms':>12}"
        )
        for j, s in enumerate(p.stages):
            mem = f"{s.memory_bytes / GIB:.1f}/{s.memory_capacity_bytes / GIB:.1f}"
            out.append(
                f"  {j:<6}{s.device:<26}{f'[{s.start}, {s.end})':<12}{mem:<16}"
                f"{s.decode_s * 1000:>10.2f}{s.prefill_s * 1000:>12.1f}"
            )
    return out


def render_pool(pool: PoolProblem, result: PlanResult) -> str:
    """Returns the plan of several models on one pool as text: per model its pipelines and
    predicted figures, then the pool's use."""
    out = [
        f"{len(pool.problems)} models on {len(pool.devices)} devices - backend "
        f"{result.backend}: {result.status}, gap {_pct(result.gap)}, {result.solve_s:.2f} s",
    ]
    if result.objective is None:
        out.append(result.message)
        return "\n".join(out)
    unit = "devices" if result.objective_kind == "min_devices" else "weighted tokens/s"
    bound = f", bound {result.bound:.6g}" if result.bound is not None else ""
    out.append(f"objective ({result.objective_kind}): {result.objective:.6g} {unit}{bound}")
    for m in result.models:
        used = sum(len(p.stages) for p in m.pipelines)
        out.append("")
        out.append(
            f"model {m.label} ({m.model_name}, {m.n_layers} layers, weight {m.weight:g}): "
            f"{len(m.pipelines)} pipeline(s) on {used} devices, "
            f"{m.throughput_tok_s:.0f} tok/s for a demand of {m.demand_tok_s:.0f} "
            f"(goodput {m.goodput_tok_s:.0f} tok/s)"
        )
        out.extend("  " + line if line else line for line in pipeline_lines(m.pipelines))
    out.append("")
    out.append(f"predicted: {result.devices_used}/{len(pool.devices)} devices used")
    out.extend(cost_lines(pool.problems[0]))
    if result.message:
        out.append(result.message)
    return "\n".join(out)


def render(problem: PlanningProblem, result: PlanResult) -> str:
    """Returns the plan as text for a terminal."""
    out = [
        f"{problem.model_name} ({problem.n_layers} layers) on {len(problem.devices)} "
        f"device{'s' if len(problem.devices) != 1 else ''} - "
        f"backend {result.backend}: {result.status}, gap {_pct(result.gap)}, "
        f"{result.solve_s:.2f} s",
    ]
    if result.objective is None:
        out.append(result.message)
        out.extend(cost_lines(problem))
        return "\n".join(out)
    unit = "devices" if result.objective_kind == "min_devices" else "tokens/s"
    out.append(
        f"objective ({result.objective_kind}): {result.objective:.6g} {unit}, "
        f"bound {result.bound:.6g}"
        if result.bound is not None
        else f"objective ({result.objective_kind}): {result.objective:.6g} {unit}"
    )
    out.extend(pipeline_lines(result.pipelines))
    out.append("")
    demand = f" (demand {problem.demand_tok_s:.0f})" if problem.demand_tok_s else ""
    out.append(
        f"predicted: TTFT {result.ttft_s * 1000:.0f} ms, TPOT {result.tpot_s * 1000:.1f} ms, "
        f"throughput {result.throughput_tok_s:.0f} tok/s{demand}, "
        f"{result.devices_used}/{len(problem.devices)} devices used"
    )
    out.extend(cost_lines(problem))
    m = result.migration
    if m is not None:
        out.append(
            f"migration: {m.weight_bytes / GIB:.1f} GiB of weights to load "
            f"({m.weight_bytes_from_peer / GIB:.1f} from peers, {m.weight_bytes_from_disk / GIB:.1f} "
            f"from disk), {m.kv_bytes / GIB:.2f} GiB of KV, {m.kept_pipelines} pipeline(s) kept; "
            f"new pipelines' loads charged {m.weight_charge_tok_s:.3g} tok/s"
        )
        out.extend(device_changes(problem, result))
    if result.message:
        out.append(result.message)
    return "\n".join(out)
