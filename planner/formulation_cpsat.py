"""The master problem (planner/master.py) in OR-Tools CP-SAT.

    max  sum_i round(s * w_i) x_i          w_i = net throughput of column i, s = 1e9 / max|w|
    s.t. sum_i counts_ik x_i <= n_k        for every device kind k
         x_i in [0, upper_i];  x_i = 1 for pinned keeps

(min-devices: min sum_i (1000 |i| + [i new]) x_i  s.t. sum_i floor(1000 v_i) x_i >= ceil(1000 d).)
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

from planner.master import MasterProblem, MasterSolution, greedy_copies, solution_objective

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
        # the output rate meets the demand (values rounded down: never optimistic)
        model.add(
            sum(math.floor(1000 * c.throughput_tok_s) * x[i] for i, c in enumerate(cols))
            >= math.ceil(1000 * master.demand_tok_s)
        )
        model.minimize(
            sum((1000 * c.n_devices + (c.keep_index is None)) * x[i] for i, c in enumerate(cols))
        )
        scale = 1000.0
    else:
        weights = [master.net_value(i) for i in range(len(cols))]
        scale = 1e9 / max((abs(w) for w in weights), default=1.0)
        model.maximize(sum(round(scale * w) * x[i] for i, w in enumerate(weights)))

    # a greedy plan as the hint, so a short limit still ends with a plan
    hint = greedy_copies(master)
    if hint is not None:
        for i, v in enumerate(x):
            model.add_hint(v, hint.get(i, 0))

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = float(time_limit_s)
    solver.parameters.num_workers = NUM_WORKERS
    solver.parameters.random_seed = RANDOM_SEED
    status = solver.solve(model)
    solve_s = time.perf_counter() - t0

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
