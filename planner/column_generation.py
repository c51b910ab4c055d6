"""Column generation: the master problem over pipeline shapes found lazily, with a proven bound.

Listing every count vector (planner/shapes.py) grows as C(max_stages + K, K); past a few
thousand vectors the master's columns are generated instead. The restricted master LP is
planner/master.py's with real z and no copy limits, over the columns found so far:

    max  sum_c obj_c z_c (+ sum_m w_m (1 - eta) g_m with several models)
    s.t. sum_c c_k z_c <= n_k                      dual y_k >= 0        every kind k
         g_m - sum_{c of m} v_c z_c <= 0           dual y_m >= 0        several models
         z >= 0, 0 <= g_m <= d_m, keep columns in [pinned, 1]

A new column c of model m has reduced cost  rc(c) = obj_c - sum_k y_k c_k + y_m v_c, i.e.

    rc(c) = A_m * batch / T*(c) - sum_k y_k c_k - C
    A_m = 1, C = mu * move           one model (max_throughput, migration weight mu)
    A_m = w_m * eta + y_m, C = 0     several models (weighted goodput)

which planner/pricing.py maximises over every pipeline without listing them. With a
topology the move is charged per stage, C = sum_i mu_{p_i} * b_i (planner/master.py); pricing
then maximises with the lower bound

    C >= mu_min * model_weight_bytes + sum_i (mu_{p_i} - mu_min) * layer_weight_bytes

(migration_prices.pricing_terms): the constant as C, the sum in each stage's price
(y_k + (mu_k - mu_min) * layer_weight_bytes). That overestimates rc, so rc* still bounds it;
a vector found is costed exactly (its shape, its charge) before it joins. Columns with
rc > 0 join and the LP is solved again. Any feasible z uses at most N = sum_k n_k copies, so
for the duals y of the last LP (value z_RMP) and any rc* >= max_c rc(c)

    LP(all columns) <= z_RMP + N * max(0, rc*)          (Lagrangian bound)

and LP(all columns) >= the integer optimum. When pricing is exact and finds nothing, rc* = 0
and the bound is the LP relaxation over every shape. The integer master is then solved over
the generated columns by the chosen backend, and the gap is reported against that bound.
The LP itself is solved by HiGHS (highspy) whatever the backend; its duals are only prices.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import highspy
import numpy as np

from planner.formulation_pulp import _quiet_stdout
from planner.master import SPARE_TOKEN_VALUE, MasterProblem, shape_column
from planner.migration_prices import pricing_terms
from planner.pricing import Pricer
from planner.problem import PlanningProblem
from planner.shapes import PipelineShape, best_shape

RC_TOLERANCE = 1e-7  # relative to the LP value: smaller reduced costs count as none


@dataclass
class Generated:
    """The master over the generated columns and the bound column generation proved."""

    master: MasterProblem
    bound: float  # valid upper bound on the integer optimum over every shape
    lp_value: float  # last restricted LP value
    iterations: int
    converged: bool  # pricing found no improving column (and was exact)
    build_s: float
    pricing_s: float = 0.0
    lp_s: float = 0.0
    history: list[tuple[int, float, float]] = field(default_factory=list)  # (columns, lp, bound)


def seed_shapes(problem: PlanningProblem, kind_counts: tuple[int, ...]) -> list[PipelineShape]:
    """Returns cheap first columns: pipelines of one device kind, of every length."""
    pricer_candidates = Pricer(problem, kind_counts)
    out = []
    for k, n_k in enumerate(kind_counts):
        for s in range(1, min(n_k, pricer_candidates.max_stages) + 1):
            counts = tuple(s if j == k else 0 for j in range(len(kind_counts)))
            shape = best_shape(
                problem, counts, pricer_candidates.candidates, pricer_candidates.table
            )
            if shape is not None:
                out.append(shape)
    return out


def _solve_lp(master: MasterProblem) -> tuple[float, np.ndarray, np.ndarray]:
    """Returns (LP value, kind-row duals y_k, model-row duals y_m) of the restricted master."""
    cols = master.columns
    K = len(master.kind_counts)
    M = master.n_models
    goodput = master.objective == "max_goodput"
    if not cols:  # nothing to choose yet: value 0 (plus goodput 0), every price 0
        return master.constant, np.zeros(K), np.zeros(M)
    with _quiet_stdout():
        h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", 1)
    inf = highspy.kHighsInf
    n = len(cols)
    lower = np.array([1.0 if i in master.required_keeps else 0.0 for i in range(n)])
    upper = np.array([1.0 if c.keep_index is not None else inf for c in cols])
    costs = np.array([master.net_value(i) for i in range(n)])
    if goodput:
        costs = np.array(
            [master.weights[c.model] * SPARE_TOKEN_VALUE * c.throughput_tok_s for c in cols]
        )
        lower = np.concatenate([lower, np.zeros(M)])
        upper = np.concatenate([upper, [master.demand_of(m) for m in range(M)]])
        costs = np.concatenate(
            [costs, [master.weights[m] * (1 - SPARE_TOKEN_VALUE) for m in range(M)]]
        )
    h.addVars(len(costs), lower, upper)
    h.changeColsCost(len(costs), np.arange(len(costs), dtype=np.int32), costs)
    for k in range(K):
        idx = [i for i, c in enumerate(cols) if c.counts[k] > 0]
        vals = [float(cols[i].counts[k]) for i in idx]
        h.addRow(
            -inf,
            float(master.kind_counts[k]),
            len(idx),
            np.array(idx, dtype=np.int32),
            np.array(vals),
        )
    if goodput:
        for m in range(M):
            idx = [i for i, c in enumerate(cols) if c.model == m]
            vals = [-cols[i].throughput_tok_s for i in idx] + [1.0]
            h.addRow(
                -inf, 0.0, len(idx) + 1, np.array(idx + [n + m], dtype=np.int32), np.array(vals)
            )
    h.changeObjectiveSense(highspy.ObjSense.kMaximize)
    h.run()
    if h.getModelStatus() != highspy.HighsModelStatus.kOptimal:
        raise RuntimeError(f"restricted master LP ended {h.getModelStatus()}")
    duals = np.array(h.getSolution().row_dual)
    value = h.getInfo().objective_function_value + master.constant
    return value, np.maximum(duals[:K], 0.0), np.maximum(duals[K:], 0.0)


def generate(
    master: MasterProblem,
    problems: tuple[PlanningProblem, ...],
    deadline: float,
) -> Generated:
    """Returns `master` (its keep columns, no shapes yet: see build_master) grown by column
    generation until pricing finds nothing or `deadline`, with the bound it proves."""
    t0 = time.perf_counter()
    if master.objective == "min_devices":
        raise ValueError("column generation covers the max objectives; min_devices lists shapes")
    kind_counts = master.kind_counts
    n_devices = sum(kind_counts)
    mu = master.tok_s_per_byte
    # per model: the charge's lower bound that pricing adds (constant, per-kind extra)
    terms = [pricing_terms(p) for p in problems]
    pricers = [Pricer(p, kind_counts) for p in problems]
    columns = list(master.columns)
    seen = {(c.model, c.counts) for c in columns if c.shape is not None}
    for m, p in enumerate(problems):
        for shape in seed_shapes(p, kind_counts):
            if (m, shape.counts) not in seen:
                seen.add((m, shape.counts))
                columns.append(shape_column(p, shape, kind_counts, m))
    bound = math.inf
    lp_value = -math.inf
    iterations = 0
    converged = False
    pricing_s = lp_s = 0.0
    history = []
    while True:
        current = replace(master, columns=tuple(columns))
        t = time.perf_counter()
        lp_value, y_kind, y_model = _solve_lp(current)
        lp_s += time.perf_counter() - t
        iterations += 1
        tolerance = RC_TOLERANCE * max(1.0, abs(lp_value))
        best_rc = -math.inf
        exact = True
        added = 0
        t = time.perf_counter()
        priced_all = True
        for m, pricer in enumerate(pricers):
            if current.objective == "max_goodput":
                value_per_tok_s = master.weights[m] * SPARE_TOKEN_VALUE + y_model[m]
                constant = 0.0
            else:
                value_per_tok_s, constant = 1.0, terms[m][0]
            extra = np.asarray(terms[m][1]) if current.objective != "max_goodput" else 0.0
            priced = pricer.price(value_per_tok_s, y_kind + extra, constant, tolerance, deadline)
            priced_all = priced_all and priced.complete
            best_rc = max(best_rc, priced.best_value)
            exact = exact and priced.exact and not np.any(extra)
            for shape in priced.shapes:
                column = shape_column(problems[m], shape, kind_counts, m)
                charge = column.charge_tok_s(mu) if current.objective != "max_goodput" else 0.0
                rc = (
                    value_per_tok_s * shape.throughput_tok_s - float(y_kind @ shape.counts) - charge
                )
                if rc > tolerance and (m, shape.counts) not in seen:
                    seen.add((m, shape.counts))
                    columns.append(column)
                    added += 1
            if time.perf_counter() > deadline and m < len(pricers) - 1:
                priced_all = False
                break
        if not priced_all:
            exact = False
        pricing_s += time.perf_counter() - t
        if priced_all:
            # every model priced: rc* bounds the reduced cost of every column not in the LP
            bound = min(bound, lp_value + n_devices * max(0.0, best_rc))
        history.append((len(columns), lp_value, bound))
        if added == 0:
            converged = priced_all and exact and best_rc <= tolerance
            break
        if time.perf_counter() > deadline:
            break
    final = replace(
        master,
        columns=tuple(columns),
        build_s=time.perf_counter() - t0,
        complete=True,
    )
    return Generated(
        master=final,
        bound=bound,
        lp_value=lp_value,
        iterations=iterations,
        converged=converged,
        build_s=time.perf_counter() - t0,
        pricing_s=pricing_s,
        lp_s=lp_s,
        history=history,
    )
