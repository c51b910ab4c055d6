"""Column generation: exact pricing, the LP bound over every shape, and plans within it."""

import math
import random
import time
from dataclasses import replace

import numpy as np
import pytest

import planner.solve as solve
from planner.column_generation import _solve_lp, generate
from planner.dp import reference_pool_objective, reference_throughput_tok_s
from planner.instances import random_pool_problem, random_small_problem
from planner.master import build_master
from planner.pricing import Pricer
from planner.shapes import count_vectors, count_vectors_total, enumerate_shapes
from planner.solve import plan, plan_pool


def _check_pricing_against_every_shape(problem, seed: int) -> list:
    """Prices `problem` at three random duals and checks pricing against every listed shape
    (max A * v(c) - B . c); returns the shapes pricing found."""
    shapes = enumerate_shapes(problem).shapes
    pricer = Pricer(problem, problem.kind_counts)
    rng = random.Random(seed)
    found = []
    for _ in range(3):
        prices = np.array(
            [
                rng.uniform(0, 0.7) * problem.batch / (problem.n_layers * k.layer_decode_s)
                for k in problem.kinds
            ]
        )
        a = rng.uniform(0.5, 2.0)
        brute = max(
            (a * s.throughput_tok_s - float(prices @ s.counts) for s in shapes.values()),
            default=-math.inf,
        )
        got = pricer.price(a, prices, 0.0, -math.inf)
        assert got.exact and got.complete
        if brute == -math.inf:
            assert got.best_value == -math.inf
            continue
        assert got.best_value == pytest.approx(brute, rel=1e-9)
        best = max(a * s.throughput_tok_s - float(prices @ s.counts) for s in got.shapes)
        assert best == pytest.approx(brute, rel=1e-9)
        found.extend(got.shapes)
    return found


@pytest.mark.parametrize("seed", range(16))
def test_pricing_finds_the_best_reduced_cost(seed):
    """Against every shape listed: max A * v(c) - B . c, at random prices and stage caps."""
    problem = random_small_problem(seed)
    problem = replace(problem, max_stages=min(problem.max_stages, 1 + seed % 4))
    _check_pricing_against_every_shape(problem, seed)


def _with_binding_ttft(seed: int, max_stages: int):
    """Returns small instance `seed` with a TTFT SLO that some of its shapes miss (None when
    it has no shape)."""
    problem = random_small_problem(seed)
    problem = replace(problem, max_stages=min(problem.max_stages, max_stages))
    free = enumerate_shapes(problem).shapes
    if not free:
        return None
    ttfts = sorted(s.ttft_s for s in free.values())
    return replace(problem, ttft_slo_s=ttfts[(seed * 7) % len(ttfts)])


@pytest.mark.parametrize("seed", range(24))
def test_pricing_under_a_ttft_slo_finds_the_best_reduced_cost(seed):
    """With a TTFT SLO pricing is exact: against every shape listed under the SLO."""
    problem = _with_binding_ttft(seed, 2 + seed % 6)
    if problem is None:
        return
    found = _check_pricing_against_every_shape(problem, seed)
    assert all(s.ttft_s <= problem.ttft_slo_s * (1 + 1e-9) for s in found)


@pytest.mark.parametrize("seed", range(12))
def test_generation_under_a_ttft_slo_certifies_the_optimum(seed):
    """The bound is the LP over every shape meeting the SLO, and the plan the optimum found by
    listing every shape."""
    problem = _with_binding_ttft(seed, 8)
    if problem is None:
        return
    full = build_master(problem)
    lp_all = _solve_lp(full)[0] if full.columns else 0.0
    gen = generate(build_master(problem, list_shapes=False), (problem,), time.perf_counter() + 10)
    assert gen.converged
    assert gen.bound == pytest.approx(lp_all, rel=1e-6, abs=1e-9)
    listed = plan(problem, "highs", 10.0, shapes="enumerate")  # every shape: the optimum
    r = plan(problem, "highs", 10.0, shapes="lazy")
    if listed.status == "INFEASIBLE":
        assert r.status == "INFEASIBLE"
        return
    assert listed.status == "OPTIMAL"
    ref = listed.objective
    assert r.details["converged"]
    assert r.objective <= ref * (1 + 1e-9) <= r.bound * (1 + 1e-9)
    assert r.objective == pytest.approx(ref, rel=1e-7)


@pytest.mark.parametrize("seed", range(16))
def test_generated_bound_is_the_lp_over_every_shape(seed):
    problem = random_small_problem(seed)
    full = build_master(problem)
    lp_all = _solve_lp(full)[0] if full.columns else 0.0
    gen = generate(build_master(problem, list_shapes=False), (problem,), time.perf_counter() + 10)
    assert gen.converged
    assert gen.bound == pytest.approx(lp_all, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("seed", range(12))
def test_lazy_plans_stay_within_their_bound(seed):
    problem = random_small_problem(seed)
    ref = reference_throughput_tok_s(problem)
    for backend in ("cpsat", "highs", "cbc"):
        r = plan(problem, backend, 10.0, shapes="lazy")
        if ref == 0:
            assert r.status == "INFEASIBLE"
            continue
        assert r.details["shapes"] == "column generation"
        assert r.objective <= ref * (1 + 1e-9) and r.bound >= ref * (1 - 1e-9), backend
        assert r.gap == pytest.approx((r.bound - r.objective) / r.objective, abs=1e-12)
        assert (r.status == "OPTIMAL") == (r.gap <= 1e-6)


@pytest.mark.parametrize("seed", range(6))
def test_lazy_pool_stays_within_its_bound(seed):
    pool = random_pool_problem(seed, n_models=2 + seed % 2)
    ref = reference_pool_objective(pool)
    r = plan_pool(pool, "highs", 10.0, shapes="lazy")
    if ref == 0:
        assert r.status == "INFEASIBLE"
        return
    assert r.objective <= ref * (1 + 1e-9) <= r.bound * (1 + 2e-9)


def test_auto_switches_to_generation_past_the_limit(monkeypatch):
    problem = random_small_problem(4)
    assert plan(problem, "highs", 10.0).details.get("shapes") != "column generation"
    monkeypatch.setattr(solve, "ENUMERATE_LIMIT", 0)
    r = plan(problem, "highs", 10.0)
    assert r.details["shapes"] == "column generation" and r.details["converged"]
    assert r.objective == pytest.approx(reference_throughput_tok_s(problem), rel=1e-7)


def test_auto_generates_under_a_ttft_slo_past_the_limit(monkeypatch):
    """Pricing is exact under a TTFT SLO, so past the limit auto generates and converges to
    the optimum of every listed shape."""
    problem = _with_binding_ttft(3, 7)  # the SLO leaves 27 of 33 shapes and lowers the optimum
    assert plan(replace(problem, ttft_slo_s=None), "highs", 10.0).objective > plan(
        problem, "highs", 10.0
    ).objective * (1 + 1e-6)
    listed = plan(problem, "highs", 10.0)
    assert listed.details.get("shapes") != "column generation" and listed.status == "OPTIMAL"
    monkeypatch.setattr(solve, "ENUMERATE_LIMIT", 0)
    r = plan(problem, "highs", 10.0)
    assert r.details["shapes"] == "column generation" and r.details["converged"]
    assert r.objective == pytest.approx(listed.objective, rel=1e-7)


def test_count_vectors_total_counts_without_listing():
    for counts, stages in (((3, 2, 5), 6), ((4, 4, 4, 4), 16), ((1,), 3), ((2, 0, 3), 4)):
        assert count_vectors_total(counts, stages) == sum(1 for _ in count_vectors(counts, stages))
    assert count_vectors_total((16,) * 16, 16) > 10**8  # why case e cannot list them
