"""Exact reference optimum for small instances, by exhaustive dynamic programming.

Independent of planner/shapes.py: it enumerates every ordered sequence of stages (which kind
runs each stage, how many layers it takes) rather than reasoning with per-kind caps.

    g(S, l, r) = least bottleneck covering layers [l, L) with exactly the devices r left
               = min over kinds k in r, layers j of  max(stage_s(k, j, first=(l=0),
                 last=(r - e_k = 0)), g(S, l + j, r - e_k)),   subject to stage memory
    T(c)      = g(|c|, 0, c),  valid when |c| * T(c) <= tpot_slo
    F(n)      = max(0, max over nonzero c <= n of batch / T(c) + F(n - c))

F(pool) is the best total throughput. It covers the max-throughput objective without a TTFT
SLO (TTFT is a second sum along the path, which a min-max DP does not track).

With a topology (kinds are pools (kind, node)) a stage's hop depends on the next stage's
node, so the state also holds the pool p of the stage placed next and the nodes already left:

    h(S, l, r, p, V) = min over layers j, next pool q in r - e_p (none if r = e_p), with
                       node(q) = node(p) or node(q) not in V, of
                       max(stage_s(p, j, first=(l=0), last=(r = e_p),
                                   hop_s = topology.decode_s(node(p), node(q))),
                           h(S, l + j, r - e_p, q, V + {node(q)}))
    T(c)   = min over p in c of h(|c|, 0, c, p, {node(p)})

A pipeline enters each node once (V), as planner/shapes_topology.py assumes; within that,
every ordered sequence of stages is tried.

With a current configuration (max-throughput, no TTFT SLO) the objective is the master's
(planner/master.py): kept pipelines K (the pinned ones among them) and new pipelines c,

    max over K of  -mu * sum_p q_p + sum_{p in K} (v_p + mu * q_p) + G(pool - devices(K))
    G(n)  = max(0, max over nonzero c <= n of batch / T(c) - C*(c) + G(n - c))
    C*(c) = min over ordered layouts of c with every stage within T(c) (and memory) of
            sum_i mu_{p_i} * b_i          (mu * model_weight_bytes with one price)

C* is a second DP over the same ordered sequences, summing each stage's charge: the cheapest
move at the best bottleneck, the master's column cost (planner/shapes_topology.py).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable

from planner.evaluate import usable_current
from planner.master import SPARE_TOKEN_VALUE
from planner.problem import PlanningProblem, PoolProblem


def reference_throughput_tok_s(problem: PlanningProblem) -> float:
    """Returns the optimal total throughput of a small problem (no TTFT SLO, no migration)."""
    if problem.ttft_slo_s is not None or problem.migration is not None:
        raise ValueError("the reference DP covers max-throughput without TTFT SLO or migration")
    return _best_total(problem, _bottleneck_of(problem))


def reference_migration_objective(problem: PlanningProblem) -> float:
    """Returns the optimal max-throughput objective of a small problem with a current
    configuration (no TTFT SLO): the first formula of the docstring's last part."""
    mig = problem.migration
    if mig is None or problem.ttft_slo_s is not None or problem.objective != "max_throughput":
        raise ValueError("the migration reference covers max-throughput with a current one")
    bottleneck = _bottleneck_of(problem)
    g = _best_table(problem, bottleneck, _charge_of(problem, bottleneck))

    kind_of = {d.name: d.kind for d in problem.devices}
    keeps = []
    for i, pipeline in usable_current(problem):
        used = [0] * len(problem.kinds)
        for st in pipeline.stages:
            used[kind_of[st.device]] += 1
        keeps.append(
            (i, pipeline.throughput_tok_s + mig.tok_s_per_byte * mig.kv_bytes_per_pipeline[i], used)
        )
    constant = -mig.tok_s_per_byte * sum(mig.kv_bytes_per_pipeline)
    best = -math.inf
    for chosen in itertools.product((False, True), repeat=len(keeps)):
        if any(
            i in mig.keep_required and not on for (i, _, _), on in zip(keeps, chosen, strict=True)
        ):
            continue
        left = list(problem.kind_counts)
        total = constant
        for (_, v, used), on in zip(keeps, chosen, strict=True):
            if on:
                left = [a - b for a, b in zip(left, used, strict=True)]
                total += v
        if min(left) < 0:
            continue
        best = max(best, total + g(tuple(left)))
    return best


def _charge_of(
    problem: PlanningProblem, bottleneck: Callable[[tuple[int, ...]], float]
) -> Callable[[tuple[int, ...], float], float]:
    """Returns C*(c, T(c)) of the docstring."""
    mig = problem.migration
    assert mig is not None
    if not mig.pool_tok_s_per_byte:
        return lambda c, t: mig.tok_s_per_byte * problem.model_weight_bytes
    L = problem.n_layers
    K = len(problem.kinds)
    node = [k.node for k in problem.kinds]
    topo = problem.topology is not None

    def charge(c: tuple[int, ...], limit_s: float) -> float:
        n_stages = sum(c)
        within = limit_s * (1 + 1e-9)

        @functools.cache
        def k(done: int, rem: tuple[int, ...], p: int, left: frozenset) -> float:
            rest = rem[:p] + (rem[p] - 1,) + rem[p + 1 :]
            n_rest = sum(rest)
            if L - done < n_rest + 1:
                return math.inf
            first, last = done == 0, n_rest == 0
            if last:
                nexts = [-1]
            else:
                nexts = [
                    q
                    for q in range(K)
                    if rest[q] > 0 and (not topo or node[q] == node[p] or node[q] not in left)
                ]
            best = math.inf
            for q in nexts:
                hop_s = None if q < 0 else problem.hop_decode_between_s(node[p], node[q])  # type: ignore[arg-type]
                for j in [L - done] if last else range(1, L - done):
                    if (
                        problem.stage_memory_bytes(j, n_stages, first, last)
                        > problem.kinds[p].memory_bytes
                    ):
                        break
                    if problem.stage_decode_s(p, j, first, last, hop_s) > within:
                        break
                    here = mig.pool_tok_s_per_byte[p] * problem.stage_weight_bytes(j, first, last)
                    after = 0.0 if q < 0 else k(done + j, rest, q, left | {node[q]})
                    best = min(best, here + after)
            return best

        return min(
            (k(0, c, p, frozenset({node[p]})) for p in range(K) if c[p] > 0), default=math.inf
        )

    return charge


def _topology_bottleneck(problem: PlanningProblem) -> Callable[[tuple[int, ...]], float]:
    """Returns T(c) under the topology: h of the docstring, minimised over the first pool."""
    L = problem.n_layers
    K = len(problem.kinds)
    node = [k.node for k in problem.kinds]

    @functools.cache
    def h(n_stages: int, done: int, rem: tuple[int, ...], p: int, left: frozenset[str]) -> float:
        rest = rem[:p] + (rem[p] - 1,) + rem[p + 1 :]
        n_rest = sum(rest)
        if L - done < n_rest + 1:
            return math.inf  # every stage needs a layer
        first, last = done == 0, n_rest == 0
        nexts = [q for q in range(K) if rest[q] > 0 and (node[q] == node[p] or node[q] not in left)]
        if last:
            nexts = [-1]
        best = math.inf
        for q in nexts:
            hop_s = 0.0 if q < 0 else problem.hop_decode_between_s(node[p], node[q])
            for j in [L - done] if last else range(1, L - done):
                if (
                    problem.stage_memory_bytes(j, n_stages, first, last)
                    > problem.kinds[p].memory_bytes
                ):
                    break
                t = problem.stage_decode_s(p, j, first, last, hop_s)
                if t >= best:
                    break
                after = 0.0 if q < 0 else h(n_stages, done + j, rest, q, left | {node[q]})
                best = min(best, max(t, after))
        return best

    def bottleneck(c: tuple[int, ...]) -> float:
        return min(
            (h(sum(c), 0, c, p, frozenset({node[p]})) for p in range(K) if c[p] > 0),
            default=math.inf,
        )

    return bottleneck


def reference_pool_objective(pool: PoolProblem) -> float:
    """Returns the optimal weighted goodput of several models sharing a small pool:

        max over n_1 + ... + n_M <= pool of  sum_m w_m ((1 - eta) min(F_m(n_m), d_m) + eta F_m(n_m))

    with F_m model m's best throughput on its part (F above): the objective grows with each
    T_m, so each part's best is its most throughput."""
    tables = [_best_table(p, _bottleneck_of(p)) for p in pool.problems]
    eta = SPARE_TOKEN_VALUE

    def value(m: int, t: float) -> float:
        good = min(t, pool.problems[m].demand_tok_s)
        return pool.weights[m] * ((1 - eta) * good + eta * t)

    @functools.cache
    def best(m: int, rem: tuple[int, ...]) -> float:
        if m == len(tables):
            return 0.0
        out = -math.inf
        for part in itertools.product(*(range(n + 1) for n in rem)):
            rest = tuple(r - x for r, x in zip(rem, part, strict=True))
            out = max(out, value(m, tables[m](part)) + best(m + 1, rest))
        return out

    return best(0, pool.kind_counts)


def _bottleneck_of(problem: PlanningProblem) -> Callable[[tuple[int, ...]], float]:
    """Returns T(c) of the docstring (with or without a topology)."""
    if problem.topology is not None:
        return _topology_bottleneck(problem)
    L = problem.n_layers
    K = len(problem.kinds)

    @functools.cache
    def g(n_stages: int, done: int, rem: tuple[int, ...]) -> float:
        left = sum(rem)
        if left == 0:
            return 0.0 if done == L else math.inf
        if L - done < left:
            return math.inf
        best = math.inf
        for k in range(K):
            if rem[k] == 0:
                continue
            rest = rem[:k] + (rem[k] - 1,) + rem[k + 1 :]
            last = left == 1
            first = done == 0
            for j in [L - done] if last else range(1, L - done):
                if (
                    problem.stage_memory_bytes(j, n_stages, first, last)
                    > problem.kinds[k].memory_bytes
                ):
                    break
                t = problem.stage_decode_s(k, j, first, last)
                if t >= best:
                    break
                best = min(best, max(t, g(n_stages, done + j, rest)))
        return best

    return lambda c: g(sum(c), 0, c)


def _best_total(problem: PlanningProblem, bottleneck: Callable[[tuple[int, ...]], float]) -> float:
    """Returns F(pool): the best sum of batch / T(c) over pipelines that share the pool."""
    return _best_table(problem, bottleneck)(problem.kind_counts)


def _best_table(
    problem: PlanningProblem,
    bottleneck: Callable[[tuple[int, ...]], float],
    charge: Callable[[tuple[int, ...], float], float] | None = None,
) -> Callable[[tuple[int, ...]], float]:
    """Returns F as a function of any part of the pool: the best sum over pipelines of
    batch / T(c), less each new pipeline's migration charge C*(c, T(c)) when given."""

    def value(c: tuple[int, ...]) -> float:
        s = sum(c)
        if s > problem.max_stages:
            return 0.0
        t = bottleneck(c)
        if not math.isfinite(t):
            return 0.0
        if problem.tpot_slo_s is not None and s * t > problem.tpot_slo_s * (1 + 1e-9):
            return 0.0
        return problem.batch / t - (charge(c, t) if charge is not None else 0.0)

    @functools.cache
    def best(pool: tuple[int, ...]) -> float:
        out = 0.0
        for c in itertools.product(*(range(n + 1) for n in pool)):
            if sum(c) == 0:
                continue
            v = value(c)
            if v > 0:
                out = max(out, v + best(tuple(p - x for p, x in zip(pool, c, strict=True))))
        return out

    return best
