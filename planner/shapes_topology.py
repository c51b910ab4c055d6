"""Pipeline shapes on a topology: which node each run of stages sits on, in which order.

With a topology the kinds of planner/shapes.py are pools p = (device kind, node), and a
count vector c over pools fixes a pipeline up to its order. A pipeline enters each node it
uses once (a *segment* of consecutive stages per node): the hops inside a segment run over
the node's link, one hop per pair of consecutive segments over the network between them.

At a candidate bottleneck T a stage of pool p holds at most

    cap_p(T, first, last, hop_s) = min(floor((T - embed[first] - head[last] - hop_s)
                                             / layer_decode_s[p]), memory cap)

layers. A segment s, given whether it opens the pipeline, and the hop its exit stage pays
(the network to the next segment's node, or none when it closes the pipeline), holds

    seg_s(first, exit_hop_s) = max over entry pool a (if first) and exit pool b of
        sum_p c_sp * cap_p(T, mid) - cap_a(mid) - cap_b(mid) + cap_a(T, first) + cap_b(T, exit)

(a single-stage segment is both at once), and -inf when any of its stages gets no layer.
The pipeline exists at T iff, over the orders of its segments,

    max_order  sum_s seg_s(first = s opens, exit_hop_s = network(node(s), node(next)))  >= L

a longest Hamiltonian path over the segments, solved exactly by DP over subsets
(2^m * m^2 for m nodes). TTFT is computed on that order with the free layers given to the
fastest prefill; with a TTFT SLO, a multi-node pipeline is checked on the order with the
most room (sound: no pipeline over the SLO is planned; one that only meets it in another
order is missed). planner/dp.py checks all of this against every ordered sequence of stages.

With a current configuration and pool prices (planner/migration_prices.py) the layers beyond
one per stage go first to the nodes where loading them costs least, then to the fastest
prefill, and the segment order is the one whose fill costs least,

    C*(c, T) = min over orders with sum_s seg_s >= L of sum_i mu_{p_i} * b_i

(all orders up to MAX_ORDERED_NODES nodes; more capacity on a node never costs more, so each
segment keeps its most layers). That is the cheapest move at the best bottleneck: a slower
layout that would load less is not weighed against it. Under a TTFT SLO the cheapest fill
that misses it gives way to the least-TTFT one (the column then costs more than C*).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

from planner.migration_prices import (
    has_pool_prices,
    pool_price_tok_s_per_byte,
    stages_charge_tok_s,
)
from planner.problem import PlanningProblem
from planner.shapes import CapTable, PipelineShape

_EPS = 1e-9
_NONE = -math.inf


def _segment_best(
    problem: PlanningProblem,
    table: CapTable,
    seg: Sequence[tuple[int, int]],
    bottleneck_s: float,
    n_stages: int,
    first: bool,
    last: bool,
    exit_hop_s: float,
) -> tuple[float, tuple[int, ...]]:
    """Returns (most layers, pool of each stage in order) of one node's run of stages."""
    node = problem.kinds[seg[0][0]].node
    intra_s = problem.hop_decode_between_s(node, node)  # type: ignore[arg-type]
    size = sum(c for _, c in seg)
    if size == 1:
        ((p, _),) = seg
        cap = table.cap(p, bottleneck_s, n_stages, (first, last), None if last else exit_hop_s)
        return (float(cap), (p,)) if cap >= 1 else (_NONE, ())
    mid = {p: table.cap(p, bottleneck_s, n_stages, (False, False), intra_s) for p, _ in seg}
    counts = dict(seg)
    best: tuple[float, tuple[int, ...]] = (_NONE, ())
    entries = [p for p, _ in seg] if first else [None]
    for a in entries:
        for b, _ in seg:
            if a == b and counts[b] < 2:
                continue
            left = dict(counts)
            left[b] -= 1
            exit_hop = None if last else exit_hop_s
            caps = [table.cap(b, bottleneck_s, n_stages, (False, last), exit_hop)]
            if a is not None:
                left[a] -= 1
                caps.append(table.cap(a, bottleneck_s, n_stages, (True, False), intra_s))
            caps.extend(mid[p] for p, n in left.items() for _ in range(n))
            if min(caps) < 1:
                continue
            value = float(sum(caps))
            if value > best[0]:
                order = (
                    ([a] if a is not None else [])
                    + [p for p, n in sorted(left.items()) for _ in range(n)]
                    + [b]
                )
                best = (value, tuple(order))
    return best


def path_shape_at(
    problem: PlanningProblem,
    counts: tuple[int, ...],
    bottleneck_s: float,
    table: CapTable,
) -> PipelineShape | None:
    """Returns the pipeline with these pool counts and every stage within `bottleneck_s`."""
    n_stages = sum(counts)
    n_layers = problem.n_layers
    if n_stages == 0 or n_stages > n_layers:
        return None
    by_node: dict[str, list[tuple[int, int]]] = {}
    for p, c in enumerate(counts):
        if c > 0:
            by_node.setdefault(problem.kinds[p].node, []).append((p, c))  # type: ignore[arg-type]
    nodes = sorted(by_node)
    m = len(nodes)

    memo: dict[tuple[int, bool, int], tuple[float, tuple[int, ...]]] = {}

    def seg(s: int, first: bool, nxt: int) -> tuple[float, tuple[int, ...]]:
        """Segment s opening (first) or not, followed by segment nxt (-1: closes)."""
        key = (s, first, nxt)
        if key not in memo:
            last = nxt < 0
            hop_s = 0.0 if last else problem.hop_decode_between_s(nodes[s], nodes[nxt])
            memo[key] = _segment_best(
                problem, table, by_node[nodes[s]], bottleneck_s, n_stages, first, last, hop_s
            )
        return memo[key]

    # f[mask][s]: most layers of the segments in mask except s, on a path through mask ending
    # at s (s's own layers wait for its successor, which sets its exit hop)
    full = (1 << m) - 1
    f: dict[tuple[int, int], float] = {(1 << s, s): 0.0 for s in range(m)}
    parent: dict[tuple[int, int], int] = {}
    for mask in range(1, full + 1):
        for s in range(m):
            here = f.get((mask, s))
            if here is None or here == _NONE or not mask >> s & 1:
                continue
            opens = mask == 1 << s
            for t in range(m):
                if mask >> t & 1:
                    continue
                value = here + seg(s, opens, t)[0]
                key = (mask | 1 << t, t)
                if value > f.get(key, _NONE):
                    f[key] = value
                    parent[key] = s
    best_end, best_value = -1, _NONE
    for s in range(m):
        here = f.get((full, s), _NONE)
        if here == _NONE:
            continue
        value = here + seg(s, full == 1 << s, -1)[0]
        if value > best_value:
            best_end, best_value = s, value
    if best_value < n_layers:
        return None

    # the order of segments, then every stage's pool and outgoing hop
    path = [best_end]
    mask = full
    while mask != 1 << path[-1]:
        prev = parent[(mask, path[-1])]
        mask &= ~(1 << path[-1])
        path.append(prev)
    path.reverse()

    def layout(
        path: Sequence[int], price: Sequence[float] | None
    ) -> tuple[list[int], list[int], list[float]]:
        """Returns (pool, layers, outgoing prefill hop) per stage of the segments in `path`:
        each stage one layer, the rest to the cheapest loads first (`price`), then to the
        fastest prefill (exact: unit items)."""
        order: list[int] = []
        for i, s in enumerate(path):
            order.extend(seg(s, i == 0, path[i + 1] if i + 1 < m else -1)[1])
        node_of = [problem.kinds[p].node for p in order]
        caps, hops_s = [], []
        for i, p in enumerate(order):
            first, last = i == 0, i == n_stages - 1
            hop_s = None if last else problem.hop_decode_between_s(node_of[i], node_of[i + 1])  # type: ignore[arg-type]
            caps.append(table.cap(p, bottleneck_s, n_stages, (first, last), hop_s))
            if not last:
                hops_s.append(problem.hop_prefill_between_s(node_of[i], node_of[i + 1]))  # type: ignore[arg-type]
        layers = [1] * n_stages
        free = n_layers - n_stages
        kinds = problem.kinds
        for i in sorted(
            range(n_stages),
            key=lambda i: (
                0.0 if price is None else price[order[i]],
                kinds[order[i]].layer_prefill_s,
                i,
            ),
        ):
            add = min(free, caps[i] - 1)
            layers[i] += add
            free -= add
        return order, layers, hops_s

    def ttft_of(order: list[int], layers: list[int], hops_s: list[float]) -> float:
        kinds = problem.kinds
        return (
            sum(n * kinds[p].layer_prefill_s for p, n in zip(order, layers, strict=True))
            + sum(hops_s)
            + kinds[order[0]].embed_prefill_s
            + kinds[order[-1]].head_prefill_s
        )

    chosen = layout(path, None)
    prices = _node_prices(problem, nodes)
    if prices is not None:
        # the pipeline's loads cost its nodes' prices: of the segment orders that fit L layers,
        # the one whose fill (cheapest nodes first) loads cheapest; ties keep the order above
        charged = layout(path, prices)
        best_charge = _charge(problem, charged)
        for other in _orders(m, path):
            if (
                sum(
                    seg(s, i == 0, other[i + 1] if i + 1 < m else -1)[0]
                    for i, s in enumerate(other)
                )
                < n_layers
            ):
                continue
            candidate = layout(other, prices)
            c = _charge(problem, candidate)
            if c < best_charge - 1e-12 * abs(best_charge):
                charged, best_charge = candidate, c
        # a TTFT SLO the cheapest fill misses: the least-TTFT layout, as without prices
        if problem.ttft_slo_s is None or ttft_of(*charged) <= problem.ttft_slo_s * (1 + _EPS):
            chosen = charged
    order, layers, prefill_hops_s = chosen
    ttft_s = ttft_of(order, layers, prefill_hops_s)
    if problem.ttft_slo_s is not None and ttft_s > problem.ttft_slo_s * (1 + _EPS):
        return None
    per_pool = [0] * len(counts)
    for p, n in zip(order, layers, strict=True):
        per_pool[p] += n
    return PipelineShape(
        counts=counts,
        bottleneck_s=bottleneck_s,
        first_kind=order[0],
        last_kind=order[-1],
        layers_per_kind=tuple(per_pool),
        ttft_s=ttft_s,
        batch=problem.batch,
        stages=tuple(zip(order, layers, strict=True)),
    )


MAX_ORDERED_NODES = 5  # a pipeline over more nodes keeps the order with the most layers


def _orders(m: int, path: Sequence[int]) -> list[tuple[int, ...]]:
    """Returns every other order of m segments (none past MAX_ORDERED_NODES)."""
    if m <= 1 or m > MAX_ORDERED_NODES:
        return []
    return [o for o in itertools.permutations(range(m)) if list(o) != list(path)]


def _node_prices(problem: PlanningProblem, used_nodes: Sequence[str]) -> list[float] | None:
    """Returns mu_p of every pool when the pipeline's nodes are priced differently, else None
    (one price: every layout loads the same bytes at it)."""
    if not has_pool_prices(problem):
        return None
    prices = [pool_price_tok_s_per_byte(problem, p) for p in range(len(problem.kinds))]
    on_used = {prices[p] for p, k in enumerate(problem.kinds) if k.node in used_nodes}
    return prices if len(on_used) > 1 else None


def _charge(problem: PlanningProblem, laid: tuple[list[int], list[int], list[float]]) -> float:
    order, layers, _ = laid
    return stages_charge_tok_s(problem, list(zip(order, layers, strict=True)))


class NodeSymmetry:
    """Nodes that are interchangeable: same pools (kind costs, device counts, migration
    price), same link inside, same links to every other node. Count vectors that differ
    only by such a swap have the same best shape, relabelled; `canonical` maps a vector to
    its class representative and back, so each class is evaluated once."""

    def __init__(self, problem: PlanningProblem):
        pools_of: dict[str, dict[str, int]] = {}
        counts = problem.kind_counts
        for p, k in enumerate(problem.kinds):
            pools_of.setdefault(k.node, {})[k.name] = p  # type: ignore[index]
        nodes = sorted(pools_of)
        topo = problem.topology
        assert topo is not None

        def same(u: str, v: str) -> bool:
            if sorted(pools_of[u]) != sorted(pools_of[v]):
                return False
            for name in pools_of[u]:
                pu, pv = pools_of[u][name], pools_of[v][name]
                if pool_price_tok_s_per_byte(problem, pu) != pool_price_tok_s_per_byte(problem, pv):
                    return False  # moves to them cost differently
                if counts[pu] != counts[pv] or {
                    **problem.kinds[pu].__dict__,
                    "node": None,
                } != {**problem.kinds[pv].__dict__, "node": None}:
                    return False
            hops = (topo.hop_decode_s, topo.hop_prefill_s)
            if any(h[(u, u)] != h[(v, v)] or h[(u, v)] != h[(v, u)] for h in hops):
                return False
            return all(
                h[(u, w)] == h[(v, w)] and h[(w, u)] == h[(w, v)]
                for h in hops
                for w in nodes
                if w not in (u, v)
            )

        self.classes: list[list[str]] = []
        for n in nodes:
            for cls in self.classes:
                if all(same(n, m) for m in cls):
                    cls.append(n)
                    break
            else:
                self.classes.append([n])
        self.pools_of = pools_of
        self.names = {n: sorted(pools_of[n]) for n in nodes}

    def canonical(self, counts: tuple[int, ...]) -> tuple[tuple[int, ...], list[int]]:
        """Returns (canonical vector, sigma) with counts[sigma[p]] = canonical[p]."""
        sigma = list(range(len(counts)))
        out = list(counts)
        for cls in self.classes:
            if len(cls) == 1:
                continue

            def load(n: str) -> tuple[int, ...]:
                return tuple(counts[self.pools_of[n][k]] for k in self.names[n])

            ranked = sorted(cls, key=lambda n: (tuple(-x for x in load(n)), n))
            for slot, actual in zip(cls, ranked, strict=True):
                for name in self.names[slot]:
                    p, q = self.pools_of[slot][name], self.pools_of[actual][name]
                    sigma[p] = q
                    out[p] = counts[q]
        return tuple(out), sigma


def relabel(shape: PipelineShape, counts: tuple[int, ...], sigma: list[int]) -> PipelineShape:
    """Returns the canonical vector's shape moved onto the pools `sigma` names."""
    stages = tuple((sigma[p], n) for p, n in shape.stages)
    per_pool = [0] * len(counts)
    for p, n in stages:
        per_pool[p] += n
    return PipelineShape(
        counts=counts,
        bottleneck_s=shape.bottleneck_s,
        first_kind=stages[0][0],
        last_kind=stages[-1][0],
        layers_per_kind=tuple(per_pool),
        ttft_s=shape.ttft_s,
        batch=shape.batch,
        stages=stages,
    )
