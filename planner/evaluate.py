"""Concrete pipelines under the problem's cost model: stage times, memory, throughput."""

from __future__ import annotations

from collections.abc import Sequence

from planner.problem import CurrentStage, PlanningProblem
from planner.solution import Pipeline, Stage


def build_pipeline(
    problem: PlanningProblem, stages: Sequence[tuple[str, int, int]], kept: bool = False
) -> Pipeline:
    """Returns the pipeline of (device, start, end) stages with its predicted numbers."""
    by_name = {d.name: d for d in problem.devices}
    n = len(stages)
    out = []
    for i, (name, start, end) in enumerate(stages):
        dev = by_name[name]
        first, last = i == 0, i == n - 1
        # the hop to the next stage runs over the link between the two stages' nodes
        nxt = by_name[stages[i + 1][0]].node if not last else dev.node
        hop_decode_s = problem.hop_decode_between_s(dev.node, nxt)
        hop_prefill_s = problem.hop_prefill_between_s(dev.node, nxt)
        out.append(
            Stage(
                device=name,
                kind=problem.kinds[dev.kind].name,
                node=dev.node,
                start=start,
                end=end,
                memory_bytes=problem.stage_memory_bytes(end - start, n, first, last),
                memory_capacity_bytes=problem.kinds[dev.kind].memory_bytes,
                decode_s=problem.stage_decode_s(dev.kind, end - start, first, last, hop_decode_s),
                prefill_s=problem.stage_prefill_s(
                    dev.kind, end - start, first, last, hop_prefill_s
                ),
            )
        )
    return Pipeline(stages=tuple(out), batch=problem.batch, kept=kept)


def pipeline_violations(problem: PlanningProblem, pipeline: Pipeline) -> list[str]:
    """Returns what keeps this pipeline from serving under the problem (empty when it fits)."""
    out = []
    for s in pipeline.stages:
        if s.memory_bytes > s.memory_capacity_bytes * (1 + 1e-9):
            out.append(
                f"{s.device} needs {s.memory_bytes / 2**30:.1f} GiB, holds "
                f"{s.memory_capacity_bytes / 2**30:.1f} GiB"
            )
    if problem.tpot_slo_s is not None and pipeline.tpot_s > problem.tpot_slo_s * (1 + 1e-9):
        out.append(f"TPOT {pipeline.tpot_s * 1000:.1f} ms > SLO {problem.tpot_slo_s * 1000:.1f} ms")
    if problem.ttft_slo_s is not None and pipeline.ttft_s > problem.ttft_slo_s * (1 + 1e-9):
        out.append(f"TTFT {pipeline.ttft_s * 1000:.1f} ms > SLO {problem.ttft_slo_s * 1000:.1f} ms")
    return out


def usable_current(problem: PlanningProblem) -> list[tuple[int, Pipeline]]:
    """Returns the current pipelines whose devices are all still here and that still fit."""
    if problem.migration is None:
        return []
    present = {d.name for d in problem.devices}
    out = []
    for i, stages in enumerate(problem.migration.current):
        if not all(s.device in present for s in stages):
            continue
        p = build_pipeline(problem, [(s.device, s.start, s.end) for s in stages], kept=True)
        if not pipeline_violations(problem, p):
            out.append((i, p))
    return out


def config_throughput_tok_s(
    problem: PlanningProblem, pipelines: Sequence[Sequence[CurrentStage]]
) -> float:
    """Returns the throughput of the usable pipelines of a configuration."""
    present = {d.name for d in problem.devices}
    total = 0.0
    for stages in pipelines:
        if all(s.device in present for s in stages):
            total += build_pipeline(
                problem, [(s.device, s.start, s.end) for s in stages]
            ).throughput_tok_s
    return total
