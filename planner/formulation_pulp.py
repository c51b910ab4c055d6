"""The master problem (planner/master.py) in PuLP, solved by HiGHS or CBC.

    max  sum_i w_i x_i                      w_i = net throughput of column i (tokens/s)
    s.t. sum_i counts_ik x_i <= n_k         for every device kind k
         x_i in {0, .., upper_i};  x_i = 1 for pinned keeps

(min-devices: min sum_i (|i| + 0.001 [i new]) x_i  s.t. sum_{i of m} v_i x_i >= d_m per model.)
Several models, weighted goodput (planner/master.py), with g_m continuous:

    max  sum_m w_m ((1 - eta) g_m + eta sum_{i of m} v_i x_i)
    s.t. g_m <= sum_{i of m} v_i x_i,  0 <= g_m <= d_m,  the kind rows as above
Same data and the same formula as the CP-SAT model, with real coefficients. The status is
read from `prob.sol_status`: PuLP says "Optimal" after a time limit too, so a solve that hit
its limit is reported FEASIBLE with its gap, never OPTIMAL. Bounds: HiGHS' `mip_dual_bound`;
CBC's "Lower bound" from its log (objective for a max is negated there).
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator

import pulp

from planner.master import (
    SPARE_TOKEN_VALUE,
    MasterProblem,
    MasterSolution,
    relative_gap,
    solution_objective,
)

THREADS = 1  # HiGHS; CBC runs its serial code (its `threads` option, even 1, switches to a
# threaded search that sat idle until the time limit on 3 of 200 tiny instances)
RANDOM_SEED = 17
MIP_REL_GAP = 1e-9


def _build(master: MasterProblem) -> tuple[pulp.LpProblem, list[pulp.LpVariable]]:
    cols = master.columns
    sense = pulp.LpMinimize if master.objective == "min_devices" else pulp.LpMaximize
    prob = pulp.LpProblem("pipeshift_master", sense)
    x = [prob.add_variable(f"x_{i}", 0, c.upper, cat=pulp.LpInteger) for i, c in enumerate(cols)]
    # every kind's devices are used at most once
    for k, n_k in enumerate(master.kind_counts):
        terms = [c.counts[k] * x[i] for i, c in enumerate(cols) if c.counts[k] > 0]
        if terms:
            prob += pulp.lpSum(terms) <= n_k, f"kind_{k}"
    for i in master.required_keeps:
        prob += x[i] == 1, f"keep_{i}"
    if master.objective == "min_devices":
        for m in range(master.n_models):
            prob += (
                pulp.lpSum(c.throughput_tok_s * x[i] for i, c in enumerate(cols) if c.model == m)
                >= master.demand_of(m),
                f"demand_{m}",
            )
        prob += pulp.lpSum(master.cost(i) * x[i] for i in range(len(cols)))
    elif master.objective == "max_goodput":
        eta = SPARE_TOKEN_VALUE
        throughput = []
        for m in range(master.n_models):
            t_m = pulp.lpSum(c.throughput_tok_s * x[i] for i, c in enumerate(cols) if c.model == m)
            # g_m <= T_m and g_m <= d_m: the goodput min(T_m, d_m)
            g = prob.add_variable(f"g_{m}", 0, master.demand_of(m))
            prob += g <= t_m, f"goodput_{m}"
            throughput.append((g, t_m))
        prob += pulp.lpSum(
            master.weights[m] * ((1 - eta) * g + eta * t_m)
            for m, (g, t_m) in enumerate(throughput)
        )
    else:
        prob += pulp.lpSum(master.net_value(i) * x[i] for i in range(len(cols)))
    return prob, x


def _cbc_bound(log_text: str, objective: float, maximize: bool) -> float | None:
    """Returns the bound in CBC's log ("Lower bound:" when stopped), in the model's sense.

    CBC minimises internally and a max problem reaches it negated; whichever sign of the
    printed value is a valid bound for `objective` (>= for a max) is the one meant.
    """
    m = re.search(r"Lower bound:\s+(-?[0-9.eE+]+)", log_text)
    if m is None:
        return None
    value = float(m.group(1))
    if not maximize:
        return value if value <= objective + 1e-9 * max(1.0, abs(objective)) else None
    for v in (value, -value):
        if v >= objective - 1e-9 * max(1.0, abs(objective)):
            return v
    return None


def solve_pulp(master: MasterProblem, backend: str, time_limit_s: float) -> MasterSolution:
    """Returns the HiGHS (`backend="highs"`) or CBC (`"cbc"`) solution of the master problem."""
    t0 = time.perf_counter()
    if not master.columns:
        return MasterSolution("INFEASIBLE", None, None, time.perf_counter() - t0, backend)
    prob, x = _build(master)
    maximize = master.objective != "min_devices"
    log_path = None
    if backend == "highs":
        solver = pulp.HiGHS(
            msg=False,
            timeLimit=time_limit_s,
            threads=THREADS,
            gapRel=MIP_REL_GAP,
            random_seed=RANDOM_SEED,
            log_to_console=False,
        )
    elif backend == "cbc":
        # PuLP 3.3 marks its bundled CBC deprecated (4.0 wants a separately installed one);
        # it is the CBC this environment has.
        warnings.filterwarnings("ignore", message="PULP_CBC_CMD is deprecated")
        fd, log_path = tempfile.mkstemp(prefix="pipeshift_cbc_", suffix=".log")
        os.close(fd)
        solver = pulp.PULP_CBC_CMD(
            msg=False,
            timeLimit=time_limit_s,
            gapRel=MIP_REL_GAP,
            logPath=log_path,
            options=[f"randomSeed {RANDOM_SEED}", f"randomCbcSeed {RANDOM_SEED}"],
        )
    else:
        raise ValueError(f"unknown PuLP backend {backend!r}; use highs or cbc")
    with _quiet_stdout():
        prob.solve(solver)
    solve_s = time.perf_counter() - t0

    has_solution = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    if prob.status == pulp.LpStatusInfeasible or prob.sol_status == pulp.LpSolutionInfeasible:
        _cleanup(log_path)
        return MasterSolution("INFEASIBLE", None, None, solve_s, backend)
    if not has_solution:
        _cleanup(log_path)
        return MasterSolution("UNKNOWN", None, None, solve_s, backend)
    copies = {i: round(v.value()) for i, v in enumerate(x) if v.value() and round(v.value()) > 0}
    objective = solution_objective(master, copies)
    proven = prob.sol_status == pulp.LpSolutionOptimal
    bound: float | None = None
    if backend == "highs":
        info = prob.solverModel.getInfo()
        raw = float(info.mip_dual_bound)
        if math.isfinite(raw):
            # PuLP hands HiGHS a max problem as "min -objective": undo the sign
            bound = -raw + master.constant if maximize else raw
    elif log_path is not None:
        with open(log_path) as f:
            weight = master.net_value if maximize else master.cost
            solver_objective = sum(weight(i) * n for i, n in copies.items())
            if master.objective == "max_goodput":
                solver_objective = float(pulp.value(prob.objective))
            raw_bound = _cbc_bound(f.read(), solver_objective, maximize)
        if raw_bound is not None:
            bound = raw_bound + (master.constant if maximize else 0.0)
    _cleanup(log_path)
    if bound is None and proven:
        bound = objective
    if master.objective == "min_devices" and bound is not None:
        bound = float(math.ceil(bound - 0.07))
        bound = min(bound, objective)
    elif bound is not None:
        bound = max(bound, objective)
    gap = relative_gap(objective, bound)
    status = "OPTIMAL" if proven and gap is not None and gap <= 1e-6 else "FEASIBLE"
    return MasterSolution(status, objective, bound, solve_s, backend, copies)


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silences file descriptor 1: HiGHS prints its banner before any option can stop it."""
    sys.stdout.flush()
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)


def _cleanup(path: str | None) -> None:
    if path is not None and os.path.exists(path):
        os.remove(path)
