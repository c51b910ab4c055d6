"""The three backends reach the exact DP optimum on small instances and agree elsewhere."""

from dataclasses import replace

import pulp
import pytest

from planner.assign import migration_of
from planner.build_problem import with_current
from planner.dp import reference_throughput_tok_s
from planner.formulation_pulp import solve_pulp
from planner.instances import random_small_problem
from planner.master import build_master
from planner.shapes import candidate_bottlenecks_s, stage_layers
from planner.solve import BACKENDS, plan
from tests.planner.reference import assert_backends_hit_reference

SEEDS = range(24)


@pytest.mark.parametrize("seed", SEEDS)
def test_backends_hit_dp_optimum(seed):
    problem = random_small_problem(seed)
    assert_backends_hit_reference(problem)


def test_min_devices_backends_agree():
    problem = random_small_problem(3)
    best = plan(problem, "highs", 10.0).objective
    target = replace(problem, objective="min_devices", demand_tok_s=0.6 * best)
    results = [plan(target, b, 10.0) for b in BACKENDS]
    assert all(r.status == "OPTIMAL" for r in results)
    assert len({r.objective for r in results}) == 1
    assert all(r.throughput_tok_s >= target.demand_tok_s for r in results)
    assert results[0].objective < len(problem.devices)


def test_shape_layers_stay_within_bottleneck():
    problem = random_small_problem(20)
    r = plan(problem, "cpsat", 10.0)
    master = build_master(problem)
    for col in master.columns:
        layout = stage_layers(problem, col.shape)
        assert sum(n for _, n in layout) == problem.n_layers
        assert col.shape.bottleneck_s in candidate_bottlenecks_s(problem)
    for p in r.pipelines:
        assert p.bottleneck_s <= max(q.bottleneck_s for q in r.pipelines)


def test_time_limited_pulp_is_not_optimal(monkeypatch):
    """PuLP reports status Optimal after a time limit; sol_status tells the truth."""
    problem = random_small_problem(5)
    master = build_master(problem)
    real_solve = pulp.LpProblem.solve

    def limited(self, solver=None, **kw):
        status = real_solve(self, solver, **kw)
        self.sol_status = pulp.LpSolutionIntegerFeasible  # what CBC/HiGHS say on a time limit
        return status

    monkeypatch.setattr(pulp.LpProblem, "solve", limited)
    for backend in ("highs", "cbc"):
        sol = solve_pulp(master, backend, 5.0)
        assert sol.status == "FEASIBLE", backend


def test_replan_weighs_moves_against_throughput():
    problem = random_small_problem(5)
    start = plan(problem, "cpsat", 10.0)
    current = [[(s.device, s.start, s.end) for s in p.stages] for p in start.pipelines]
    gone = start.pipelines[0].stages[0].device
    smaller = replace(problem, devices=tuple(d for d in problem.devices if d.name != gone))
    scratch = plan(smaller, "cpsat", 10.0)
    # moving is very dear: keep what survives, load nothing
    dear = plan(with_current(smaller, current, 600.0, 1e3), "cpsat", 10.0)
    assert dear.migration is not None
    assert dear.migration.kept_pipelines == len(start.pipelines) - 1
    assert dear.migration.weight_bytes == 0
    assert dear.throughput_tok_s < scratch.throughput_tok_s
    # moving is cheap: the from-scratch throughput, loading no more than a from-scratch plan
    cheap_problem = with_current(smaller, current, 600.0, 25e9)
    cheap = plan(cheap_problem, "cpsat", 10.0)
    assert cheap.throughput_tok_s == pytest.approx(scratch.throughput_tok_s, rel=1e-9)
    scratch_moves = migration_of(cheap_problem, scratch.pipelines)
    assert cheap.migration.weight_bytes <= scratch_moves.weight_bytes


def test_time_limit_is_honoured_and_never_called_optimal():
    from planner.build_problem import build_problem
    from planner.spec import load_spec

    from .conftest import ROOT

    problem = build_problem(load_spec(ROOT / "data/specs/cluster-64-llama2-70b.yaml"))
    for backend in BACKENDS:
        r = plan(problem, backend, 0.5)
        assert r.solve_s < 1.5, backend
        assert r.status == "FEASIBLE" and r.gap is None, backend
        assert r.pipelines and "time limit" in r.message, backend


def test_stopped_highs_reports_a_valid_bound(monkeypatch):
    """A MIP stopped early (here by a 50 % gap tolerance) keeps a bound above the optimum."""
    import planner.formulation_pulp as formulation

    problem = random_small_problem(5)
    optimum = reference_throughput_tok_s(problem)
    monkeypatch.setattr(formulation, "MIP_REL_GAP", 0.5)
    sol = solve_pulp(build_master(problem), "highs", 10.0)
    assert sol.status == "FEASIBLE"
    assert sol.bound >= optimum * (1 - 1e-9)
    assert sol.bound > sol.objective * (1 + 1e-3)  # a real gap is reported, not clamped to 0


def test_migration_lists_loads_and_frees_by_range():
    problem = random_small_problem(7)  # 14 layers, 7 devices of one kind
    current = [[("d0.0", 0, 5), ("d0.1", 5, 14)], [("d0.2", 0, 7), ("d0.3", 7, 14)]]
    with_cur = with_current(problem, current, 600.0, 1e9)
    from planner.evaluate import build_pipeline

    target = [
        build_pipeline(with_cur, [("d0.0", 0, 3), ("d0.1", 3, 14)]),
        build_pipeline(with_cur, [("d0.4", 0, 7), ("d0.3", 7, 14)]),
    ]
    m = migration_of(with_cur, target)
    assert m.loads == (("d0.1", 3, 5), ("d0.4", 0, 7))
    assert set(m.frees) == {("d0.0", 3, 5), ("d0.2", 0, 7)}
    assert m.weight_bytes == 9 * problem.layer_weight_bytes
    assert m.weight_bytes_from_peer == m.weight_bytes  # every layer is held by some device
