"""Pipeline shapes against brute force, TTFT SLO included (which the DP reference omits)."""

import functools
import itertools
import math
import random
from dataclasses import replace

import pytest

from planner.instances import random_small_problem
from planner.problem import PlanningProblem
from planner.solve import BACKENDS, plan


def compositions(n: int, parts: int):
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = (0, *cuts, n)
        yield [bounds[i + 1] - bounds[i] for i in range(parts)]


def brute_force_tok_s(problem: PlanningProblem) -> float:
    """Returns the best throughput by trying every order and split of every device subset."""

    def best_bottleneck(c: tuple[int, ...]) -> float:
        n = sum(c)
        if n > problem.max_stages or n > problem.n_layers:
            return math.inf
        kinds = [k for k, m in enumerate(c) for _ in range(m)]
        best = math.inf
        for order in set(itertools.permutations(kinds)):
            for split in compositions(problem.n_layers, n):
                flags = [(i == 0, i == n - 1) for i in range(n)]
                if any(
                    problem.stage_memory_bytes(j, n, *f) > problem.kinds[k].memory_bytes
                    for k, j, f in zip(order, split, flags, strict=True)
                ):
                    continue
                t = max(
                    problem.stage_decode_s(k, j, *f)
                    for k, j, f in zip(order, split, flags, strict=True)
                )
                ttft = sum(
                    problem.stage_prefill_s(k, j, *f)
                    for k, j, f in zip(order, split, flags, strict=True)
                )
                if problem.ttft_slo_s is not None and ttft > problem.ttft_slo_s * (1 + 1e-9):
                    continue
                if problem.tpot_slo_s is not None and n * t > problem.tpot_slo_s * (1 + 1e-9):
                    continue
                best = min(best, t)
        return best

    @functools.cache
    def total(pool: tuple[int, ...]) -> float:
        out = 0.0
        for c in itertools.product(*(range(m + 1) for m in pool)):
            if sum(c) == 0:
                continue
            t = best_bottleneck(c)
            if math.isfinite(t):
                rest = tuple(p - x for p, x in zip(pool, c, strict=True))
                out = max(out, problem.batch / t + total(rest))
        return out

    return total(problem.kind_counts)


@pytest.mark.parametrize("seed", range(16))
def test_shapes_match_brute_force_with_ttft_slo(seed):
    problem = random_small_problem(1000 + seed, max_devices=4, max_layers=8)
    rng = random.Random(seed)
    fastest = min(k.layer_prefill_s for k in problem.kinds)
    slowest = max(k.layer_prefill_s for k in problem.kinds)
    slo = problem.n_layers * rng.uniform(fastest, slowest) + rng.uniform(0, 5e-3)
    problem = replace(problem, ttft_slo_s=slo)
    ref = brute_force_tok_s(problem)
    for backend in BACKENDS:
        r = plan(problem, backend, 10.0)
        if ref == 0:
            assert r.status == "INFEASIBLE", backend
        else:
            assert r.objective == pytest.approx(ref, rel=1e-7), backend
            assert r.ttft_s <= slo * (1 + 1e-9)
