"""The master problem both backends solve: how many pipelines of each shape, and which to keep.

Columns are the minimal pipeline shapes (planner/shapes.py) and, when a configuration is
serving, one "keep" column per current pipeline that still fits. With n_k devices of kind k,
z_c copies of shape c (c_k devices of kind k, throughput v_c, estimated load bytes m_c) and
y_p in {0, 1} keeping current pipeline p (throughput v_p, devices e_pk, in-flight KV bytes q_p):

    max   sum_c (v_c - mu * m_c) z_c + sum_p (v_p + mu * q_p) y_p - mu * sum_p q_p
    s.t.  sum_c c_k z_c + sum_p e_pk y_p <= n_k          for every kind k
          z_c in {0, .., min_k floor(n_k / c_k)}, y_p = 1 for pinned p

mu is the migration weight (tokens/s per byte, see build_problem.with_current). With a
topology a new column is charged on the nodes its stages land on instead of mu * m_c
(planner/migration_prices.py): stage i of pool p_i loads b_i bytes (its layers, embedding
first, head last) at its node's price mu_p, so column c, laid out as its shape lays it out,
costs

    C_c = sum_i mu_{p_i} * b_i          (mu * m_c without a topology)

and the objective's first sum reads sum_c (v_c - C_c) z_c; the KV terms keep the scalar mu
(the slowest node's). For the
min-devices objective: min sum_c |c| z_c + sum_p |p| y_p (with a tie-break that prefers
keeping) s.t. sum_c v_c z_c + sum_p v_p y_p >= demand. Symmetry among devices of one kind
is gone by construction, and the LP relaxation has only K rows, so its bound is tight.

Several models on one pool (PoolProblem, planner/problem.py): every column belongs to one model m (its
pipelines hold only m's layers; v_c is costed with m's numbers), the kind rows are shared,
and the objective is the weighted SLO goodput (objective "max_goodput"):

    T_m = sum_{c of m} v_c z_c                          throughput of model m (every pipeline
                                                        meets m's SLOs)
    max   sum_m w_m * ((1 - eta) * g_m + eta * T_m)
    s.t.  g_m <= T_m,  0 <= g_m <= d_m                  g_m = min(T_m, d_m): goodput
          sum_c c_k z_c <= n_k                          for every kind k

d_m is model m's demand (request rate x mean output tokens), w_m its weight (default 1), and
eta = SPARE_TOKEN_VALUE = 1e-3: a token/s beyond a model's demand is worth a thousandth of
one within it, so demand comes first (no model's spare headroom outbids another's unmet
demand unless their tokens/s per device differ a thousandfold) and spare devices still go
where they add the most headroom. This is what max_throughput becomes with several models:
with one model the objective grows with T alone, so its best plans are exactly the
max-throughput ones (and a one-model spec is planned and reported as max T).
min_devices with several models: min sum_c |c| z_c s.t. T_m >= d_m for every m.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from planner.evaluate import usable_current
from planner.migration_prices import has_pool_prices, split_margin_tok_s, stages_charge_tok_s
from planner.problem import PlanningProblem, PoolProblem
from planner.shapes import (
    PipelineShape,
    ShapeSet,
    enumerate_shapes,
    minimal_shapes,
    split_beats,
    stage_layers,
)
from planner.solution import Pipeline

SPARE_TOKEN_VALUE = 1e-3  # eta: a token/s beyond a model's demand, against one within it


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
    model: int = 0  # which model's layers this pipeline holds (several models on one pool)
    # C_c, what its loads cost the objective when pools are priced one by one (tokens/s);
    # None: mu * move_bytes
    move_tok_s: float | None = None

    def charge_tok_s(self, mu: float) -> float:
        """Returns C_c: what its loads cost the objective, mu * move_bytes or the pools' charge."""
        return mu * self.move_bytes if self.move_tok_s is None else self.move_tok_s

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
    weights: tuple[float, ...] = (1.0,)  # w_m per model
    demands_tok_s: tuple[float, ...] = ()  # d_m per model (default: demand_tok_s)

    @property
    def n_models(self) -> int:
        return len(self.weights)

    def demand_of(self, m: int) -> float:
        """Returns model m's demand d_m in output tokens/s."""
        return self.demands_tok_s[m] if self.demands_tok_s else self.demand_tok_s

    def model_throughput_tok_s(self, copies: dict[int, int]) -> list[float]:
        """Returns T_m of every model for a choice of copies."""
        out = [0.0] * self.n_models
        for i, n in copies.items():
            out[self.columns[i].model] += self.columns[i].throughput_tok_s * n
        return out

    def goodput_value(self, m: int, throughput_tok_s: float) -> float:
        """Returns w_m * ((1 - eta) * min(T_m, d_m) + eta * T_m)."""
        good = min(throughput_tok_s, self.demand_of(m))
        eta = SPARE_TOKEN_VALUE
        return self.weights[m] * ((1 - eta) * good + eta * throughput_tok_s)

    def net_value(self, i: int) -> float:
        """Returns column i's contribution to the max-throughput objective:
        v_c - C_c (C_c = mu * m_c, or the pools' charge move_tok_s) + mu * q_c."""
        c = self.columns[i]
        mu = self.tok_s_per_byte
        return c.throughput_tok_s - c.charge_tok_s(mu) + mu * c.kv_bytes

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


def build_master(
    problem: PlanningProblem, deadline: float | None = None, list_shapes: bool = True
) -> MasterProblem:
    """Returns the master problem's columns (shapes enumerated until `deadline`, if given;
    none with list_shapes=False, for column generation to find)."""
    t0 = time.perf_counter()
    counts = problem.kind_counts
    if list_shapes:
        shape_set = enumerate_shapes(problem, deadline)
        shapes = undominated(
            minimal_shapes(shape_set.shapes), shape_set.shapes, split_margin_tok_s(problem)
        )
    else:
        shape_set = ShapeSet({}, complete=True, max_stages_done=problem.max_stages)
        shapes = []
    columns = [shape_column(problem, s, counts) for s in shapes]
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


def shape_column(
    problem: PlanningProblem, shape: PipelineShape, kind_counts: tuple[int, ...], model: int = 0
) -> Column:
    """Returns the column of a new pipeline of this shape: m_c = model_weight_bytes (with a
    current configuration) and, with pool prices, C_c on the shape's own layout."""
    return Column(
        counts=shape.counts,
        throughput_tok_s=shape.throughput_tok_s,
        move_bytes=problem.model_weight_bytes if problem.migration is not None else 0.0,
        upper=min(kind_counts[k] // c for k, c in enumerate(shape.counts) if c > 0),
        shape=shape,
        move_tok_s=(
            stages_charge_tok_s(problem, stage_layers(problem, shape))
            if has_pool_prices(problem)
            else None
        ),
        model=model,
    )


def build_pool_master(
    pool: PoolProblem, deadline: float | None = None, list_shapes: bool = True
) -> MasterProblem:
    """Returns the master problem of several models on one pool: each model's columns (its
    shapes, enumerated until `deadline`), tagged with the model, over the shared kind rows."""
    t0 = time.perf_counter()
    columns: list[Column] = []
    complete, done = True, 10**9
    for m, problem in enumerate(pool.problems):
        one = build_master(problem, deadline, list_shapes)
        columns.extend(replace(c, model=m) for c in one.columns)
        complete = complete and one.complete
        done = min(done, one.max_stages_done)
    return MasterProblem(
        kind_counts=pool.kind_counts,
        columns=tuple(columns),
        objective="min_devices" if pool.objective == "min_devices" else "max_goodput",
        demand_tok_s=0.0,
        tok_s_per_byte=0.0,
        required_keeps=frozenset(),
        constant=0.0,
        build_s=time.perf_counter() - t0,
        complete=complete,
        max_stages_done=done,
        weights=pool.weights,
        demands_tok_s=tuple(p.demand_tok_s for p in pool.problems),
    )


def undominated(
    shapes: list[PipelineShape],
    every: dict[tuple[int, ...], PipelineShape],
    margin_tok_s: float,
) -> list[PipelineShape]:
    """Returns the shapes no split into two pipelines beats.

    If the devices of shape c also form two pipelines c1 + c2 = c with
    v1 + v2 - C1 - C2 >= v - C, any plan using c does at least as well with c1 and c2
    (same devices; for min-devices, same count and more throughput), so c is not needed.
    With a margin M >= C1 + C2 - C (migration_prices.split_margin_tok_s; M = mu * move with
    one price, as C = C1 = C2 then), v1 + v2 >= v + M is enough.
    """
    return [
        s for s in shapes if not split_beats(s.counts, every, s.throughput_tok_s + margin_tok_s)
    ]


def solution_objective(master: MasterProblem, copies: dict[int, int]) -> float:
    """Returns the exact objective of a choice of copies."""
    if master.objective == "min_devices":
        return float(sum(master.columns[i].n_devices * n for i, n in copies.items()))
    if master.objective == "max_goodput":
        per_model = master.model_throughput_tok_s(copies)
        return sum(master.goodput_value(m, t) for m, t in enumerate(per_model))
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
        have = master.model_throughput_tok_s(copies)
        for i in order:
            m = master.columns[i].model
            while have[m] < master.demand_of(m) and take(i, 1):
                have[m] += master.columns[i].throughput_tok_s
        ok = all(have[m] >= master.demand_of(m) for m in range(master.n_models))
        return copies if ok else None
    if master.objective == "max_goodput":
        # demand first (best weighted tokens per device), then spare devices as headroom
        order = sorted(
            range(len(master.columns)),
            key=lambda i: (
                -master.weights[master.columns[i].model]
                * master.columns[i].throughput_tok_s
                / master.columns[i].n_devices,
                i,
            ),
        )
        have = master.model_throughput_tok_s(copies)
        for i in order:
            m = master.columns[i].model
            while have[m] < master.demand_of(m) and take(i, 1):
                have[m] += master.columns[i].throughput_tok_s
        for i in order:
            take(i, master.columns[i].upper)
        return copies
    order = sorted(
        range(len(master.columns)),
        key=lambda i: (-master.net_value(i) / master.columns[i].n_devices, i),
    )
    for i in order:
        if master.net_value(i) > 0:
            take(i, master.columns[i].upper)
    return copies
