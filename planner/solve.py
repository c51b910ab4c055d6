"""plan(problem) -> PlanResult: build the master, solve it, turn the answer into pipelines."""

from __future__ import annotations

import math
import time
from dataclasses import replace

from planner.assign import assign_devices, migration_of
from planner.column_generation import generate
from planner.diagnose import explain_infeasible
from planner.evaluate import build_pipeline
from planner.formulation_cpsat import solve_cpsat
from planner.formulation_pulp import solve_pulp
from planner.master import (
    MasterProblem,
    MasterSolution,
    build_master,
    build_pool_master,
    greedy_copies,
    relative_gap,
    solution_objective,
)
from planner.problem import PlanningProblem, PoolProblem
from planner.report import cost_sources
from planner.shapes import count_vectors_total, stage_layers
from planner.solution import ModelPlan, Pipeline, PlanResult

BACKENDS = ("cpsat", "highs", "cbc")


def solve_master(master: MasterProblem, backend: str, time_limit_s: float) -> MasterSolution:
    """Returns the master problem solved by one backend."""
    if backend == "cpsat":
        return solve_cpsat(master, time_limit_s)
    if backend in ("highs", "cbc"):
        return solve_pulp(master, backend, time_limit_s)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def pipelines_of(
    problem: PlanningProblem, master: MasterProblem, copies: dict[int, int]
) -> list[Pipeline]:
    """Returns the concrete pipelines of a master solution: kept ones first, then new ones."""
    kept: list[Pipeline] = []
    slots: list[list[tuple[int, int, int]]] = []
    for i in sorted(copies):
        col = master.columns[i]
        if col.keep_pipeline is not None:
            kept.append(col.keep_pipeline)
            continue
        assert col.shape is not None
        layout = stage_layers(problem, col.shape)
        for _ in range(copies[i]):
            start, stages = 0, []
            for kind, n in layout:
                stages.append((kind, start, start + n))
                start += n
            slots.append(stages)
    taken = {s.device for p in kept for s in p.stages}
    new = [build_pipeline(problem, stages) for stages in assign_devices(problem, slots, taken)]
    return kept + new


ENUMERATE_LIMIT = 6000  # count vectors listed at most; beyond, column generation finds shapes


def shape_mode(problem: PlanningProblem, shapes: str = "auto") -> str:
    """Returns how the master gets its columns: "enumerate" (every count vector, exact) or
    "lazy" (column generation, planner/column_generation.py). "auto" lists them while there
    are at most ENUMERATE_LIMIT vectors, and always for min_devices or a topology: there
    pricing is a relaxation (planner/pricing.py), whose bound holds but can stall far from
    the plan; listing at least answers with the best pipelines of the lengths it got to.
    Under a TTFT SLO pricing is exact, as without one.
    """
    if shapes not in ("auto", "enumerate", "lazy"):
        raise ValueError(f"unknown shapes mode {shapes!r}; use auto, enumerate or lazy")
    if shapes != "auto":
        return shapes
    if problem.objective == "min_devices" or problem.topology is not None:
        return "enumerate"
    n = count_vectors_total(problem.kind_counts, problem.max_stages)
    return "enumerate" if n <= ENUMERATE_LIMIT else "lazy"


def solve_lazy(
    master: MasterProblem,
    problems: tuple[PlanningProblem, ...],
    backend: str,
    deadline: float,
    end: float,
) -> tuple[MasterProblem, MasterSolution, dict]:
    """Returns the master grown by column generation until `deadline`, its integer solution
    by `backend` until `end`, with the column generation bound as the bound, and details."""
    gen = generate(master, problems, deadline)
    sol = solve_master(gen.master, backend, max(0.1, end - time.perf_counter()))
    if sol.objective is None and sol.status == "UNKNOWN":
        greedy = greedy_copies(gen.master)
        if greedy is not None:
            sol = MasterSolution(
                "FEASIBLE",
                solution_objective(gen.master, greedy),
                None,
                sol.solve_s,
                backend,
                greedy,
            )
    if sol.objective is not None:
        # the solver's own bound holds for the generated columns only; the LP bound for all
        bound = max(sol.objective, gen.bound) if math.isfinite(gen.bound) else None
        gap = relative_gap(sol.objective, bound)
        status = "OPTIMAL" if gap is not None and gap <= 1e-6 else "FEASIBLE"
        sol = replace(sol, status=status, bound=bound)
    details = {
        "shapes": "column generation",
        "iterations": gen.iterations,
        "converged": gen.converged,
        "lp_bound": gen.bound if math.isfinite(gen.bound) else None,
        "pricing_s": round(gen.pricing_s, 4),
        "lp_s": round(gen.lp_s, 4),
    }
    return gen.master, sol, details


def plan(
    problem: PlanningProblem,
    backend: str = "cpsat",
    time_limit_s: float = 10.0,
    shapes: str = "auto",
) -> PlanResult:
    """Returns the best configuration for the problem, with status, bound and gap
    (`shapes`: how columns are found, see shape_mode)."""
    t0 = time.perf_counter()
    lazy: dict = {}
    if shape_mode(problem, shapes) == "lazy":
        master, sol, lazy = solve_lazy(
            build_master(problem, list_shapes=False),
            (problem,),
            backend,
            deadline=t0 + 0.9 * time_limit_s,
            end=t0 + time_limit_s,
        )
    else:
        # shapes may take most of the limit; the solver gets the rest (at least 30 %)
        master = build_master(problem, deadline=t0 + 0.7 * time_limit_s)
    if not master.columns and master.complete:
        return PlanResult(
            status="INFEASIBLE",
            objective=None,
            bound=None,
            gap=None,
            solve_s=time.perf_counter() - t0,
            backend=backend,
            objective_kind=problem.objective,
            message=explain_infeasible(problem),
        )
    if not lazy:
        sol = _solve_listed(master, backend, max(0.1, time_limit_s - (time.perf_counter() - t0)))
    total_s = time.perf_counter() - t0
    details = {
        "shapes_complete": master.complete,
        "columns": len(master.columns),
        "shapes": sum(1 for c in master.columns if c.shape is not None),
        "build_s": round(master.build_s, 4),
        "solver_s": round(sol.solve_s, 4),
        # per device kind: measured profile (which file) or roofline (planner/report.py)
        "cost_sources": cost_sources(problem),
        **lazy,
    }
    if sol.objective is None:
        if not master.complete:
            message = (
                f"time limit reached while listing pipeline shapes (all up to "
                f"{master.max_stages_done} stages done) with no plan yet; raise --time-limit"
            )
        elif sol.status == "INFEASIBLE":
            message = explain_infeasible(problem)
        else:
            message = f"no plan found within {time_limit_s:g} s; raise --time-limit"
        return PlanResult(
            status=sol.status if master.complete else "UNKNOWN",
            objective=None,
            bound=sol.bound,
            gap=None,
            solve_s=total_s,
            backend=backend,
            objective_kind=problem.objective,
            message=message,
            details=details,
        )
    pipelines = pipelines_of(problem, master, sol.copies)
    status, bound, message = sol.status, sol.bound, ""
    if not master.complete:
        # the columns are a subset: the solver's bound holds for them only
        status, bound = "FEASIBLE", None
        message = (
            f"time limit reached while listing pipeline shapes: every pipeline of up to "
            f"{master.max_stages_done} stages was considered, not all up to max_stages "
            f"{problem.max_stages}; gap unknown; raise --time-limit or lower max_stages"
        )
    result = PlanResult(
        status=status,
        objective=sol.objective,
        bound=bound,
        gap=relative_gap(sol.objective, bound),
        message=message,
        solve_s=total_s,
        backend=backend,
        pipelines=pipelines,
        migration=migration_of(problem, pipelines),
        objective_kind=problem.objective,
        details=details,
    )
    return result


def _solve_listed(master: MasterProblem, backend: str, time_limit_s: float) -> MasterSolution:
    """Solves a master over listed columns; out of time without an incumbent, falls back to
    the greedy plan (FEASIBLE, gap unknown)."""
    sol = solve_master(master, backend, time_limit_s)
    if sol.objective is None and sol.status == "UNKNOWN":
        greedy = greedy_copies(master)
        if greedy is not None:
            return MasterSolution("FEASIBLE", solution_objective(master, greedy), None, sol.solve_s,
                                  backend, greedy)
    return sol


def pool_pipelines_of(
    pool: PoolProblem, master: MasterProblem, copies: dict[int, int]
) -> list[Pipeline]:
    """Returns the concrete pipelines of a pool's master solution, each tagged with its model."""
    slots: list[list[tuple[int, int, int]]] = []
    owners: list[int] = []
    for i in sorted(copies):
        col = master.columns[i]
        assert col.shape is not None
        layout = stage_layers(pool.problems[col.model], col.shape)
        for _ in range(copies[i]):
            start, stages = 0, []
            for kind, n in layout:
                stages.append((kind, start, start + n))
                start += n
            slots.append(stages)
            owners.append(col.model)
    assigned = assign_devices(pool.problems[0], slots, set())
    return [
        replace(build_pipeline(pool.problems[m], stages), model=pool.labels[m])
        for m, stages in zip(owners, assigned, strict=True)
    ]


def plan_pool(
    pool: PoolProblem, backend: str = "cpsat", time_limit_s: float = 10.0, shapes: str = "auto"
) -> PlanResult:
    """Returns the best division of the pool among several models (weighted SLO goodput, or
    the fewest devices meeting every demand; planner/master.py), with status, bound and gap
    (`shapes`: how columns are found, see shape_mode; lazy when any model needs it)."""
    t0 = time.perf_counter()
    objective_kind = "min_devices" if pool.objective == "min_devices" else "max_goodput"
    modes = {shape_mode(replace(p, objective=pool.objective), shapes) for p in pool.problems}
    lazy: dict = {}
    if "lazy" in modes and pool.objective != "min_devices":
        master, sol, lazy = solve_lazy(
            build_pool_master(pool, list_shapes=False),
            pool.problems,
            backend,
            deadline=t0 + 0.9 * time_limit_s,
            end=t0 + time_limit_s,
        )
    else:
        master = build_pool_master(pool, deadline=t0 + 0.7 * time_limit_s)
    details: dict = {
        "shapes_complete": master.complete,
        "columns": len(master.columns),
        "build_s": round(master.build_s, 4),
        "cost_sources": cost_sources(pool.problems[0]),
        **lazy,
    }
    if not master.columns and master.complete:
        return PlanResult(
            status="INFEASIBLE",
            objective=None,
            bound=None,
            gap=None,
            solve_s=time.perf_counter() - t0,
            backend=backend,
            objective_kind=objective_kind,
            message="no model has a pipeline that fits: "
            + "; ".join(
                f"{label}: {explain_infeasible(p)}"
                for label, p in zip(pool.labels, pool.problems, strict=True)
            ),
            details=details,
        )
    if not lazy:
        sol = _solve_listed(master, backend, max(0.1, time_limit_s - (time.perf_counter() - t0)))
    details["solver_s"] = round(sol.solve_s, 4)
    total_s = time.perf_counter() - t0
    if sol.objective is None:
        message = (
            "no division of the pool meets every model's demand: "
            + "; ".join(
                f"{label} asks {p.demand_tok_s:.0f} tok/s"
                for label, p in zip(pool.labels, pool.problems, strict=True)
            )
            + "; add devices, relax the SLOs or lower the request rates"
            if sol.status == "INFEASIBLE"
            else f"no plan found within {time_limit_s:g} s; raise --time-limit"
        )
        return PlanResult(
            status=sol.status,
            objective=None,
            bound=sol.bound,
            gap=None,
            solve_s=total_s,
            backend=backend,
            objective_kind=objective_kind,
            message=message,
            details=details,
        )
    pipelines = pool_pipelines_of(pool, master, sol.copies)
    status, bound, message = sol.status, sol.bound, ""
    if not master.complete:
        status, bound = "FEASIBLE", None
        message = (
            f"time limit reached while listing pipeline shapes (every pipeline of up to "
            f"{master.max_stages_done} stages considered); gap unknown; raise --time-limit"
        )
    models = [
        ModelPlan(
            label=label,
            model_name=p.model_name,
            n_layers=p.n_layers,
            weight=w,
            demand_tok_s=p.demand_tok_s,
            pipelines=tuple(q for q in pipelines if q.model == label),
        )
        for label, p, w in zip(pool.labels, pool.problems, pool.weights, strict=True)
    ]
    return PlanResult(
        status=status,
        objective=sol.objective,
        bound=bound,
        gap=relative_gap(sol.objective, bound),
        message=message,
        solve_s=total_s,
        backend=backend,
        pipelines=pipelines,
        objective_kind=objective_kind,
        details=details,
        models=models,
    )
