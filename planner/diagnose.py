"""Why a spec has no plan: the binding constraint, with its numbers and what to change."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

from planner.problem import PlanningProblem
from planner.shapes import all_shapes

GIB = 2**30


def _pool(problem: PlanningProblem) -> str:
    counts = Counter(problem.kinds[d.kind].name for d in problem.devices)
    return " + ".join(f"{n} {k}" for k, n in sorted(counts.items()))


def explain_infeasible(problem: PlanningProblem) -> str:
    """Returns one sentence naming the constraint that leaves no plan, with its numbers."""
    n = len(problem.devices)
    memory = sum(problem.kinds[d.kind].memory_bytes for d in problem.devices)
    weights = problem.model_weight_bytes
    if weights > memory:
        return (
            f"{problem.model_name} needs {weights / GIB:.0f} GiB of weights; the {_pool(problem)} "
            + ("devices hold" if n > 1 else "device holds")
            + f" {memory / GIB:.0f} GiB in all (usable share); "
            "add devices or use a smaller dtype"
        )
    free = replace(problem, tpot_slo_s=None, ttft_slo_s=None, objective="max_throughput")
    shapes = all_shapes(free)
    if not shapes:
        longer = replace(free, max_stages=min(problem.n_layers, n))
        if longer.max_stages > problem.max_stages and all_shapes(longer):
            need = min(sum(c) for c in all_shapes(longer))
            return (
                f"{problem.model_name} needs at least {need} stages on the {_pool(problem)} "
                f"devices; max_stages is {problem.max_stages}; raise max_stages"
            )
        kv = problem.n_layers * problem.batch * problem.kv_bytes_per_seq_per_layer
        return (
            f"{problem.model_name} needs {weights / GIB:.1f} GiB of weights plus at least "
            f"{kv / GIB:.1f} GiB of KV cache per stage count (batch {problem.batch}); no split "
            f"of the {_pool(problem)} devices ({memory / GIB:.0f} GiB usable in all) fits; "
            "lower workload.batch or add devices"
        )
    best_tpot = min(shapes.values(), key=lambda s: (s.tpot_s, s.counts))
    if problem.tpot_slo_s is not None and best_tpot.tpot_s > problem.tpot_slo_s:
        return (
            f"TPOT SLO {problem.tpot_slo_s * 1000:.1f} ms is below the fastest pipeline these "
            f"devices allow: {best_tpot.tpot_s * 1000:.1f} ms ({best_tpot.n_stages} stage(s) x "
            f"{best_tpot.bottleneck_s * 1000:.2f} ms); relax slo.tpot_ms or lower workload.batch"
        )
    best_ttft = min(shapes.values(), key=lambda s: (s.ttft_s, s.counts))
    if problem.ttft_slo_s is not None and best_ttft.ttft_s > problem.ttft_slo_s:
        return (
            f"TTFT SLO {problem.ttft_slo_s * 1000:.1f} ms is below the fastest prefill these "
            f"devices allow: {best_ttft.ttft_s * 1000:.1f} ms; relax slo.ttft_ms"
        )
    if problem.tpot_slo_s is not None and problem.ttft_slo_s is not None:
        both = replace(problem, objective="max_throughput")
        if not all_shapes(both):
            return (
                f"no pipeline meets TPOT {problem.tpot_slo_s * 1000:.1f} ms and TTFT "
                f"{problem.ttft_slo_s * 1000:.1f} ms together (each alone is reachable); "
                "relax one of them"
            )
    if problem.objective == "min_devices":
        from planner.solve import plan

        best = plan(replace(problem, objective="max_throughput"), "highs", 10.0)
        return (
            f"the demand of {problem.demand_tok_s:.0f} output tokens/s exceeds what all "
            f"{n} devices ({_pool(problem)}) give: {best.throughput_tok_s:.0f} tokens/s at best; "
            "add devices, relax the SLOs or lower the request rate"
        )
    return "no plan satisfies the pinned pipelines; check pins.keep_current"
