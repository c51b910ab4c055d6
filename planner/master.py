"""The master problem both backends solve: how many pipelines of each shape, and which to keep.

Columns are the minimal pipeline shapes (planner/shapes.py) and, when a configuration is
serving, one "keep" column per current pipeline that still fits. With n_k devices of kind k,
z_c copies of shape c (c_k devices of kind k, throughput v_c, estimated load bytes m_c) and
y_p in {0, 1} keeping current pipeline p (throughput v_p, devices e_pk, in-flight KV bytes q_p):

    max   sum_c (v_c - mu * m_c) z_c + sum_p (v_p + mu * q_p) y_p - mu * sum_p q_p
    s.t.  sum_c c_k z_c + sum_p e_pk y_p <= n_k          for every kind k
          z_c in {0, .., min_k floor(n_k / c_k)}, y_p = 1 for pinned p

mu is the migration weight (tokens/s per byte, see build_problem.with_current). For the
min-devices objective: min sum_c |c| z_c + sum_p |p| y_p (with a tie-break that prefers
keeping) s.t. sum_c v_c z_c + sum_p v_p y_p >= demand. Symmetry among devices of one kind
is gone by construction, and the LP relaxation has only K rows, so its bound is tight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from planner.evaluate import usable_current
from planner.problem import PlanningProblem
from planner.shapes import PipelineShape, enumerate_shapes, minimal_shapes, split_beats
from planner.solution import Pipeline


@dataclass(frozen=True)
class Column:
    counts: tuple[int, ...]
    throughput_tok_s: float
    move_bytes: float  # weight bytes a new pipeline of this shape loads (estimate, upper)
    upper: int  # most copies that fit the pool
    shape: PipelineShape | None = None
    keep_index: int | None = None  # current pipeline this column keeps
    keep_pipeline: Pipeline | None = None
    kv_bytes: float = 0.0  # in-flight KV saved by keeping

    @property
    def n_devices(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class MasterProblem:
    kind_counts: tuple[int, ...]
    columns: tuple[Column, ...]
    objective: str  # max_throughput | min_devices
    demand_tok_s: float
    tok_s_per_byte: float
    required_keeps: frozenset[int]  # column indices that must be 1
    constant: float  # objective offset (migration of KV when nothing is kept)
    build_s: float = 0.0
    complete: bool = True  # every shape up to max_stages was enumerated
    max_stages_done: int = 0

    def net_value(self, i: int) -> float:
        """Returns column i's contribution to the max-throughput objective."""
        c = self.columns[i]
        mu = self.tok_s_per_byte
        return c.throughput_tok_s - mu * c.move_bytes + mu * c.kv_bytes

    def cost(self, i: int) -> float:
        """Returns column i's contribution to the min-devices objective (keeping breaks ties)."""
        c = self.columns[i]
        return c.n_devices + (0.0 if c.keep_index is not None else 1e-3)


@dataclass
class MasterSolution:
    status: str  # OPTIMAL | FEASIBLE | INFEASIBLE | UNKNOWN
    objective: float | None
    bound: float | None
    solve_s: float
    backend: str
    copies: dict[int, int] = field(default_factory=dict)  # column index -> copies


def build_master(problem: PlanningProblem, deadline: float | None = None) -> MasterProblem:
    """Returns the master problem's columns (shapes enumerated until `deadline`, if given)."""
    t0 = time.perf_counter()
    counts = problem.kind_counts
    move = problem.model_weight_bytes if problem.migration is not None else 0.0
    mu = problem.migration.tok_s_per_byte if problem.migration is not None else 0.0
    shape_set = enumerate_shapes(problem, deadline)
    shapes = undominated(minimal_shapes(shape_set.shapes), shape_set.shapes, mu * move)
    columns = [
        Column(
            counts=s.counts,
            throughput_tok_s=s.throughput_tok_s,
            move_bytes=move,
            upper=min(counts[k] // c for k, c in enumerate(s.counts) if c > 0),
            shape=s,
        )
        for s in shapes
    ]
    required: set[int] = set()
    constant = 0.0
    if problem.migration is not None:
        mig = problem.migration
        constant = -mig.tok_s_per_byte * sum(mig.kv_bytes_per_pipeline)
        kind_of = {d.name: d.kind for d in problem.devices}
        for i, pipeline in usable_current(problem):
            kc = [0] * len(counts)
            for s in pipeline.stages:
                kc[kind_of[s.device]] += 1
            if i in mig.keep_required:
                required.add(len(columns))
            columns.append(
                Column(
                    counts=tuple(kc),
                    throughput_tok_s=pipeline.throughput_tok_s,
                    move_bytes=0.0,
                    upper=1,
                    keep_index=i,
                    keep_pipeline=pipeline,
                    kv_bytes=mig.kv_bytes_per_pipeline[i],
                )
            )
    return MasterProblem(
        kind_counts=counts,
        columns=tuple(columns),
        objective=problem.objective,
        demand_tok_s=problem.demand_tok_s,
        tok_s_per_byte=problem.migration.tok_s_per_byte if problem.migration else 0.0,
        required_keeps=frozenset(required),
        constant=constant,
        build_s=time.perf_counter() - t0,
        complete=shape_set.complete,
        max_stages_done=shape_set.max_stages_done,
    )


def undominated(
    shapes: list[PipelineShape],
    every: dict[tuple[int, ...], PipelineShape],
    move_tok_s: float,
) -> list[PipelineShape]:
    """Returns the shapes no split into two pipelines beats.

    If the devices of shape c also form two pipelines c1 + c2 = c with
    v1 + v2 - 2 * move >= v - move, any plan using c does at least as well with c1 and c2
    (same devices; for min-devices, same count and more throughput), so c is not needed.
    """
    return [s for s in shapes if not split_beats(s.counts, every, s.throughput_tok_s + move_tok_s)]


def solution_objective(master: MasterProblem, copies: dict[int, int]) -> float:
    """Returns the exact objective of a choice of copies."""
    if master.objective == "min_devices":
        return float(sum(master.columns[i].n_devices * n for i, n in copies.items()))
    return master.constant + sum(master.net_value(i) * n for i, n in copies.items())


def relative_gap(objective: float | None, bound: float | None) -> float | None:
    """Returns |bound - objective| / |objective| (0 when both are 0, None when unknown)."""
    if objective is None or bound is None:
        return None
    if abs(objective) < 1e-12:
        return 0.0 if abs(bound) < 1e-12 else None
    return max(0.0, abs(bound - objective) / abs(objective))


def greedy_copies(master: MasterProblem) -> dict[int, int] | None:
    """Returns a quick feasible choice (best value per device first), or None if none is found.

    Used as CP-SAT's hint and as the answer when a solver runs out of time without one.
    """
    left = list(master.kind_counts)
    copies: dict[int, int] = {}

    def take(i: int, n: int) -> int:
        c = master.columns[i]
        fit = min([n] + [left[k] // m for k, m in enumerate(c.counts) if m > 0])
        if fit > 0:
            for k, m in enumerate(c.counts):
                left[k] -= fit * m
            copies[i] = copies.get(i, 0) + fit
        return fit

    for i in sorted(master.required_keeps):
        if take(i, 1) == 0:
            return None
    if master.objective == "min_devices":
        order = sorted(
            range(len(master.columns)),
            key=lambda i: (-master.columns[i].throughput_tok_s / master.columns[i].n_devices, i),
        )
        have = sum(master.columns[i].throughput_tok_s * n for i, n in copies.items())
        for i in order:
            while have < master.demand_tok_s and take(i, 1):
                have += master.columns[i].throughput_tok_s
        return copies if have >= master.demand_tok_s else None
    order = sorted(
        range(len(master.columns)),
        key=lambda i: (-master.net_value(i) / master.columns[i].n_devices, i),
    )
    for i in order:
        if master.net_value(i) > 0:
            take(i, master.columns[i].upper)
    return copies
