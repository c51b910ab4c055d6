"""The master problem (planner/master.py) in OR-Tools CP-SAT.

    max  sum_i round(s * w_i) x_i          w_i = net throughput of column i, s = 1e9 / max|w|
    s.t. sum_i counts_ik x_i <= n_k        for every device kind k
         x_i in [0, upper_i];  x_i = 1 for pinned keeps

(min-devices: min sum_i (1000 |i| + [i new]) x_i  s.t. sum_{i of m} floor(1000 v_i) x_i >=
ceil(1000 d_m) for every model m.) Several models, weighted goodput (planner/master.py):

    max  sum_m a_m G_m + sum_i b_i V_i x_i     V_i = floor(u v_i), u = 1e8 / max_i v_i upper_i
    s.t. G_m <= sum_{i of m} V_i x_i,  0 <= G_m <= floor(u d_m)    (G_m = u g_m)
         a_m = round(1e5 w_m (1 - eta) / max w),  b_i = round(1e5 w_m eta / max w)
CP-SAT needs integer coefficients; the rounding is undone on the way out and the bound is
widened by the largest rounding error, so the reported gap is never smaller than the true one.
Deterministic: fixed seed and one worker. CP-SAT's parallel portfolio may return a different
one of several equal optima from run to run, and its deterministic interleaved mode was 12x
slower on the 64-device instance (11.5 s against 0.9 s), so one worker it is.
"""

from __future__ import annotations

import math
import time

from ortools.sat.python import cp_model

from planner.master import (
    SPARE_TOKEN_VALUE,
    MasterProblem,
    MasterSolution,
    greedy_copies,
    solution_objective,
)

NUM_WORKERS = 1
RANDOM_SEED = 17


def solve_cpsat(master: MasterProblem, time_limit_s: float) -> MasterSolution:
    """Returns the CP-SAT solution of the master problem within `time_limit_s`."""
    t0 = time.perf_counter()
    cols = master.columns
    if not cols:
        return MasterSolution("INFEASIBLE", None, None, time.perf_counter() - t0, "cpsat")
    model = cp_model.CpModel()

    # variables: copies of each column
    x = [model.new_int_var(0, c.upper, f"x[{i}]") for i, c in enumerate(cols)]
    for i in master.required_keeps:
        model.add(x[i] == 1)

    # every kind's devices are used at most once
    for k, n_k in enumerate(master.kind_counts):
        terms = [c.counts[k] * x[i] for i, c in enumerate(cols) if c.counts[k] > 0]
        if terms:
            model.add(sum(terms) <= n_k)

    max_copies = sum(c.upper for c in cols)
    if master.objective == "min_devices":
        # every model's output rate meets its demand (values rounded down: never optimistic)
        for m in range(master.n_models):
            model.add(
                sum(
                    math.floor(1000 * c.throughput_tok_s) * x[i]
                    for i, c in enumerate(cols)
                    if c.model == m
                )
                >= math.ceil(1000 * master.demand_of(m))
            )
        model.minimize(
            sum((1000 * c.n_devices + (c.keep_index is None)) * x[i] for i, c in enumerate(cols))
        )
        scale = 1000.0
    elif master.objective == "max_goodput":
        return _solve_goodput(model, x, master, t0, time_limit_s)
    else:
        weights = [master.net_value(i) for i in range(len(cols))]
        scale = 1e9 / max((abs(w) for w in weights), default=1.0)
        model.maximize(sum(round(scale * w) * x[i] for i, w in enumerate(weights)))


    solver, status, solve_s = _run(model, x, master, t0, time_limit_s)

    name = {
        cp_model.OPTIMAL: "OPTIMAL",
        cp_model.FEASIBLE: "FEASIBLE",
        cp_model.INFEASIBLE: "INFEASIBLE",
    }.get(status, "UNKNOWN")
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return MasterSolution(name, None, None, solve_s, "cpsat")
    copies = {i: int(solver.value(v)) for i, v in enumerate(x) if solver.value(v) > 0}
    objective = solution_objective(master, copies)
    if master.objective == "min_devices":
        # integer device counts: strip the keep tie-break from the bound
        bound = float(math.ceil(solver.best_objective_bound / scale - 1e-3 * max_copies - 1e-9))
        bound = min(bound, objective)
    else:
        slack = 0.5 / scale * sum(master.kind_counts)  # each copy takes a device
        bound = max(objective, master.constant + solver.best_objective_bound / scale + slack)
    return MasterSolution(name, objective, bound, solve_s, "cpsat", copies)


def _run(
    model: cp_model.CpModel, x: list[cp_model.IntVar], master: MasterProblem, t0: float, time_limit_s: float
) -> tuple[cp_model.CpSolver, int, float]:
    """Solves `model` with a greedy plan as the hint (so a short limit still ends with a plan);
    returns the solver, its status and the seconds since `t0`."""
    hint = greedy_copies(master)
    if hint is not None:
        for i, v in enumerate(x):
            model.add_hint(v, hint.get(i, 0))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = NUM_WORKERS
    solver.parameters.random_seed = RANDOM_SEED
    status = solver.solve(model)
    return solver, status, time.perf_counter() - t0


def _solve_goodput(
    model: cp_model.CpModel,
    x: list[cp_model.IntVar],
    master: MasterProblem,
    t0: float,
    time_limit_s: float,
) -> MasterSolution:
    """Returns the weighted-goodput master solved (the second formula of the docstring)."""
    cols = master.columns
    eta = SPARE_TOKEN_VALUE
    top_v = max(c.throughput_tok_s * c.upper for c in cols)
    u = 1e8 / top_v  # integer units per token/s
    top_w = max(master.weights)
    a = [max(1, round(1e5 * w * (1 - eta) / top_w)) for w in master.weights]
    b = [max(1, round(1e5 * w * eta / top_w)) for w in master.weights]
    units = [math.floor(u * c.throughput_tok_s) for c in cols]
    goodput = []
    for m in range(master.n_models):
        # G_m <= T_m (in units) and G_m <= d_m: G_m is the goodput min(T_m, d_m)
        g = model.new_int_var(0, math.floor(u * master.demand_of(m)), f"G[{m}]")
        model.add(g <= sum(units[i] * x[i] for i, c in enumerate(cols) if c.model == m))
        goodput.append(g)
    model.maximize(
        sum(a[m] * g for m, g in enumerate(goodput))
        + sum(b[c.model] * units[i] * x[i] for i, c in enumerate(cols))
    )
    solver, status, solve_s = _run(model, x, master, t0, time_limit_s)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        name = "INFEASIBLE" if status == cp_model.INFEASIBLE else "UNKNOWN"
        return MasterSolution(name, None, None, solve_s, "cpsat")
    copies = {i: int(solver.value(v)) for i, v in enumerate(x) if solver.value(v) > 0}
    objective = solution_objective(master, copies)
    # back to tokens/s (a unit of a_m G_m is top_w / (1e5 u)); the rounding of the weights
    # (rel: the most a true coefficient exceeds its rounded one) and of v (< 1 unit per copy)
    # widen the bound
    n_copies = sum(master.kind_counts)
    scale = 1e5 / top_w * u
    rel = max(
        [1.0]
        + [1e5 * w * (1 - eta) / top_w / q for w, q in zip(master.weights, a, strict=True)]
        + [1e5 * w * eta / top_w / q for w, q in zip(master.weights, b, strict=True)]
    )
    bound = (solver.best_objective_bound + (max(a) + max(b) + 1) * n_copies) * rel / scale
    name = "OPTIMAL" if status == cp_model.OPTIMAL else "FEASIBLE"
    return MasterSolution(name, objective, max(objective, bound), solve_s, "cpsat", copies)
