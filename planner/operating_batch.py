"""The micro-batch a plan runs at when the spec's `batch` is more than a replica's KV holds.

A spec's `workload.batch` B is the most sequences a micro-batch takes (vLLM's max_num_seqs).
The planner reserves KV for every one of them, but a server admits a request only with KV
room for it, so at a large B a replica simply runs the batch its KV holds. Planning at B
alone would rule that replica out and split the model deeper than serving wants, or find
nothing at all. So:

    plan_fitting_batch(spec)  the plan at B; when there is none, at the first of B/2, B/4, ...
                              (operating_batches) that has one, saying so in its message
    operating_batches(problem)  B, then its halvings while some device that holds the whole
                              model cannot also hold the KV of b mean requests
"""

from __future__ import annotations

from planner.build_problem import build_problem
from planner.problem import PlanningProblem
from planner.solution import PlanResult
from planner.solve import plan
from planner.spec import Spec


def operating_batches(problem: PlanningProblem) -> list[int]:
    """Returns the micro-batch sizes to plan at: the spec's `batch` B and then its halvings
    while a device that holds the whole model cannot also hold the KV of b sequences of the
    workload's mean length,

        b in (B, B/2, B/4, ...)  while  b > 1  and  some kind k with W <= M_k has
                                                     W + b * KV_seq > M_k

    (W the model's weights, M_k the kind's usable memory, KV_seq one mean request's KV over
    every layer)."""
    weights = problem.model_weight_bytes
    seq_bytes = problem.kv_bytes_per_seq_per_layer * problem.n_layers
    holders = [k.memory_bytes for k in problem.kinds if k.memory_bytes >= weights]
    out = [problem.batch]
    b = problem.batch
    while b > 1 and any(weights + b * seq_bytes > m for m in holders):
        b = max(1, b // 2)
        out.append(b)
    return out


def at_batch(spec: Spec, batch: int) -> Spec:
    """Returns the spec with `workload.batch` set to `batch`."""
    workload = spec.workload.model_copy(update={"batch": batch})
    return spec.model_copy(update={"workload": workload})


def plan_fitting_batch(
    spec: Spec, backend: str = "cpsat", time_limit_s: float = 10.0
) -> tuple[PlanningProblem, PlanResult]:
    """Returns the problem and plan at the spec's batch, or, when nothing fits there, at the
    largest of operating_batches that has a plan (its message says which and why); the
    batch-B answer when none has one."""
    problem = build_problem(spec)
    result = plan(problem, backend=backend, time_limit_s=time_limit_s)
    if result.objective is not None:
        return problem, result
    for batch in operating_batches(problem)[1:]:
        smaller = build_problem(at_batch(spec, batch))
        found = plan(smaller, backend=backend, time_limit_s=time_limit_s)
        if found.objective is not None:
            kv = problem.kv_bytes_per_seq_per_layer * problem.n_layers
            found.message = (
                f"planned at {batch} sequences per micro-batch: KV for {problem.batch} "
                f"({problem.batch * kv / 2**30:.1f} GiB per replica at "
                f"{problem.notes.get('kv_context_tokens', '?')} tokens each) fits no split of "
                "these devices. The server admits requests by KV room, so each stage runs "
                "the batch it holds."
            )
            return smaller, found
    return problem, result
