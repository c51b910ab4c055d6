"""Pipeline shapes: how many devices of each kind a pipeline uses, and its best bottleneck.

Devices of one kind are interchangeable and decoder layers are identical, so a pipeline is
fixed, up to symmetry, by its count vector `c` (devices per kind). For a candidate
bottleneck `T` (every value a stage time can take: `j * layer_decode_s[k]` plus hop, embed
or head, for j = 1..L) a device of kind k can hold at most

    cap_k(T) = min(floor((T - extras) / layer_decode_s[k]), floor((mem_k - extra_bytes) / per_layer_bytes(S)))

layers, with extras that depend on whether it is first (embedding) or last (head). Given
the kinds `a` of the first and `b` of the last stage, the pipeline exists iff

    S <= L <= sum_k hi_k(a, b, T)   and   min TTFT(a, b, T) <= ttft_slo   and   S * T <= tpot_slo,

where hi_k sums the caps of kind k's devices, each device takes at least one layer, and the
least TTFT puts the free layers on the kinds with the fastest prefill (exact: layers are unit
items). `T*(c)` is the least feasible candidate (feasibility is monotone in T), found by
binary search. A vector `c` is *minimal* when removing any one device raises `T*`; only
minimal vectors can be needed by an optimal plan (a non-minimal one is a minimal one plus
idle devices), so they are the columns of the master problem.

With a topology the kinds are pools (kind, node) and a stage's hop depends on where the next
stage runs; planner/shapes_topology.py finds those shapes' bottlenecks and layouts.
"""

from __future__ import annotations

import bisect
import itertools
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

from planner.problem import PlanningProblem

_EPS = 1e-9


@dataclass(frozen=True)
class PipelineShape:
    """A pipeline up to the identity of its devices."""

    counts: tuple[int, ...]  # devices per kind
    bottleneck_s: float  # slowest stage's decode step
    first_kind: int
    last_kind: int
    layers_per_kind: tuple[int, ...]
    ttft_s: float  # prefill of the prompt through every stage
    batch: int
    stages: tuple[tuple[int, int], ...] = ()  # (kind, layers) in order, where the shape fixes it

    @property
    def n_stages(self) -> int:
        return sum(self.counts)

    @property
    def throughput_tok_s(self) -> float:
        return self.batch / self.bottleneck_s

    @property
    def tpot_s(self) -> float:
        return self.n_stages * self.bottleneck_s


def candidate_bottlenecks_s(problem: PlanningProblem) -> list[float]:
    """Returns every value a stage's decode time can take, sorted and unique."""
    values: set[float] = set()
    for k in range(len(problem.kinds)):
        hops = problem.out_hops_decode_s(k)
        for j in range(1, problem.n_layers + 1):
            for first, last in ((False, False), (True, False), (False, True), (True, True)):
                for hop_s in [0.0] if last else hops:
                    values.add(problem.stage_decode_s(k, j, first, last, hop_s))
    return sorted(values)


def _floor(x: float) -> int:
    return math.floor(x + _EPS) if x > -_EPS else -1


_FLAGS = ((False, False), (True, False), (False, True), (True, True))  # (first, last)


class CapTable:
    """Per-kind stage capacities: memory caps per stage count, time caps per bottleneck."""

    def __init__(self, problem: PlanningProblem):
        self.problem = problem
        kinds = range(len(problem.kinds))
        self.fixed_s = {(k, f): problem.stage_decode_s(k, 0, *f) for k in kinds for f in _FLAGS}
        self._mem: dict[tuple[int, int, tuple[bool, bool]], int] = {}

    def mem_cap(self, kind: int, n_stages: int, flags: tuple[bool, bool]) -> int:
        key = (kind, n_stages, flags)
        cap = self._mem.get(key)
        if cap is None:
            p = self.problem
            fixed = p.stage_memory_bytes(0, n_stages, *flags)
            per_layer = p.stage_memory_bytes(1, n_stages, False, False)
            cap = _floor((p.kinds[kind].memory_bytes - fixed) / per_layer)
            self._mem[key] = cap
        return cap

    def cap(
        self,
        kind: int,
        bottleneck_s: float,
        n_stages: int,
        flags: tuple[bool, bool],
        hop_s: float | None = None,
    ) -> int:
        """Returns the most layers a stage on `kind` takes within `bottleneck_s` and memory
        (`hop_s`: its outgoing hop, default the problem's uniform one)."""
        fixed_s = (
            self.fixed_s[(kind, flags)]
            if hop_s is None
            else self.problem.stage_decode_s(kind, 0, *flags, hop_s)
        )
        time_cap = _floor((bottleneck_s - fixed_s) / self.problem.kinds[kind].layer_decode_s)
        return max(0, min(time_cap, self.mem_cap(kind, n_stages, flags), self.problem.n_layers))


def shape_at(
    problem: PlanningProblem,
    counts: tuple[int, ...],
    bottleneck_s: float,
    table: CapTable | None = None,
    any_fit: bool = False,
) -> PipelineShape | None:
    """Returns the least-TTFT pipeline with these counts and every stage within `bottleneck_s`.

    With `any_fit` it returns the first pipeline that fits (enough to test feasibility).
    """
    table = table or CapTable(problem)
    if problem.topology is not None:
        from planner.shapes_topology import path_shape_at

        return path_shape_at(problem, counts, bottleneck_s, table)
    n_stages = sum(counts)
    n_layers = problem.n_layers
    if n_stages == 0 or n_stages > n_layers:
        return None
    used = [k for k, c in enumerate(counts) if c > 0]
    kinds = problem.kinds
    if n_stages == 1:
        (a,) = used
        pairs = [(a, a, {a: table.cap(a, bottleneck_s, 1, (True, True))})]
    else:
        mid = {k: table.cap(k, bottleneck_s, n_stages, (False, False)) for k in used}
        firsts = {k: table.cap(k, bottleneck_s, n_stages, (True, False)) for k in used}
        lasts = {k: table.cap(k, bottleneck_s, n_stages, (False, True)) for k in used}
        # kinds that cannot take a middle stage must sit only at the two ends
        weak = {k: counts[k] for k in used if mid[k] < 1}
        if sum(weak.values()) > 2:
            return None
        base = sum(counts[k] * mid[k] for k in used)
        pairs = []
        for a, b in itertools.product(used, used):
            if (a == b and counts[a] < 2) or firsts[a] < 1 or lasts[b] < 1:
                continue
            if base - mid[a] - mid[b] + firsts[a] + lasts[b] < n_layers:
                continue
            if any(c != (k == a) + (k == b) for k, c in weak.items()):
                continue
            hi = {}
            for k in used:
                n_mid = counts[k] - (k == a) - (k == b)
                hi[k] = n_mid * mid[k] + (firsts[a] if k == a else 0) + (lasts[b] if k == b else 0)
            pairs.append((a, b, hi))
    best: PipelineShape | None = None
    by_prefill = sorted(used, key=lambda k: (kinds[k].layer_prefill_s, k))
    for a, b, hi in pairs:
        if sum(hi.values()) < n_layers:
            continue
        layers = {k: counts[k] for k in used}  # every stage takes at least one layer
        free = n_layers - n_stages
        for k in by_prefill:  # the rest go where prefill is fastest (exact: unit items)
            add = min(free, hi[k] - layers[k])
            layers[k] += add
            free -= add
        ttft_s = (
            sum(layers[k] * kinds[k].layer_prefill_s for k in used)
            + (n_stages - 1) * problem.hop_prefill_s
            + kinds[a].embed_prefill_s
            + kinds[b].head_prefill_s
        )
        if problem.ttft_slo_s is not None and ttft_s > problem.ttft_slo_s * (1 + _EPS):
            continue
        if best is None or ttft_s < best.ttft_s - _EPS:
            best = PipelineShape(
                counts=counts,
                bottleneck_s=bottleneck_s,
                first_kind=a,
                last_kind=b,
                layers_per_kind=tuple(layers.get(k, 0) for k in range(len(counts))),
                ttft_s=ttft_s,
                batch=problem.batch,
            )
            if any_fit:
                return best
    return best


def best_shape(
    problem: PlanningProblem,
    counts: tuple[int, ...],
    candidates: list[float],
    table: CapTable | None = None,
) -> PipelineShape | None:
    """Returns the shape with the least bottleneck for these counts, or None if none fits."""
    table = table or CapTable(problem)
    n_stages = sum(counts)
    hi = len(candidates)
    if problem.tpot_slo_s is not None:
        hi = bisect.bisect_right(candidates, problem.tpot_slo_s / n_stages * (1 + _EPS))
    if hi == 0:
        return None
    top = shape_at(problem, counts, candidates[hi - 1], table, any_fit=True)
    if top is None:
        return None
    lo = 0
    while lo < hi - 1:  # invariant: candidates[hi - 1] feasible
        m = (lo + hi - 1) // 2
        shape = shape_at(problem, counts, candidates[m], table, any_fit=True)
        if shape is None:
            lo = m + 1
        else:
            hi, top = m + 1, shape
    # the least-TTFT layout at the least bottleneck (the search only asked "does one fit?")
    return shape_at(problem, counts, candidates[hi - 1], table) or top


def count_vectors(kind_counts: tuple[int, ...], max_stages: int) -> Iterator[tuple[int, ...]]:
    """Yields every count vector within the pool of 1..max_stages devices, fewest devices first."""

    def split(total: int, k: int) -> Iterator[tuple[int, ...]]:
        if k == len(kind_counts):
            if total == 0:
                yield ()
            return
        room = sum(kind_counts[k + 1 :])
        for c in range(min(total, kind_counts[k]), max(0, total - room) - 1, -1):
            for rest in split(total - c, k + 1):
                yield (c, *rest)

    for n in range(1, min(max_stages, sum(kind_counts)) + 1):
        yield from split(n, 0)


def count_vectors_total(kind_counts: tuple[int, ...], max_stages: int) -> int:
    """Returns how many vectors count_vectors yields (without listing them)."""
    ways = [1] + [0] * max_stages  # ways[s]: vectors over the kinds so far with s devices
    for n_k in kind_counts:
        ways = [sum(ways[s - c] for c in range(0, min(n_k, s) + 1)) for s in range(max_stages + 1)]
    return sum(ways[1:])


@dataclass
class ShapeSet:
    """The best shape of every feasible count vector tried; `complete` when none was skipped."""

    shapes: dict[tuple[int, ...], PipelineShape]
    complete: bool
    max_stages_done: int  # every vector up to this many devices was tried


def all_shapes(problem: PlanningProblem) -> dict[tuple[int, ...], PipelineShape]:
    """Returns the best shape of every feasible count vector (minimal or not)."""
    return enumerate_shapes(problem).shapes


def split_beats(
    counts: tuple[int, ...],
    shapes: dict[tuple[int, ...], PipelineShape],
    target_tok_s: float,
) -> bool:
    """Returns whether the devices `counts` also form two pipelines worth >= target_tok_s."""
    for c1 in itertools.product(*(range(n + 1) for n in counts)):
        c2 = tuple(n - m for n, m in zip(counts, c1, strict=True))
        if c1 > c2 or not any(c1):
            continue  # each split once
        s1, s2 = shapes.get(c1), shapes.get(c2)
        if s1 is not None and s2 is not None:
            if s1.throughput_tok_s + s2.throughput_tok_s >= target_tok_s * (1 + 1e-12):
                return True
    return False


def enumerate_shapes(problem: PlanningProblem, deadline: float | None = None) -> ShapeSet:
    """Returns the shapes of every count vector, stopping (incomplete) at `deadline`.

    Vectors go fewest devices first, so a stopped run still holds every pipeline of up to
    `max_stages_done` stages.
    """
    candidates = candidate_bottlenecks_s(problem)
    table = CapTable(problem)
    shapes: dict[tuple[int, ...], PipelineShape] = {}
    symmetry = None
    if problem.topology is not None:
        from planner.shapes_topology import NodeSymmetry, relabel

        symmetry = NodeSymmetry(problem)
        canonical_shapes: dict[tuple[int, ...], PipelineShape | None] = {}
    done = 0
    for counts in count_vectors(problem.kind_counts, problem.max_stages):
        n = sum(counts)
        if n > done + 1:
            done = n - 1
        if deadline is not None and time.perf_counter() > deadline:
            return ShapeSet(shapes, complete=False, max_stages_done=done)
        if symmetry is None:
            shape = best_shape(problem, counts, candidates, table)
        else:  # interchangeable nodes: evaluate one vector per class, relabel the rest
            key, sigma = symmetry.canonical(counts)
            if key not in canonical_shapes:
                canonical_shapes[key] = best_shape(problem, key, candidates, table)
            found = canonical_shapes[key]
            shape = None if found is None else relabel(found, counts, sigma)
        if shape is not None:
            shapes[counts] = shape
    return ShapeSet(shapes, complete=True, max_stages_done=problem.max_stages)


def minimal_shapes(shapes: dict[tuple[int, ...], PipelineShape]) -> list[PipelineShape]:
    """Returns the shapes that lose speed when any one device is taken out, in a fixed order."""
    out = []
    for counts, shape in sorted(shapes.items()):
        minimal = True
        for k, c in enumerate(counts):
            if c == 0:
                continue
            smaller = shapes.get(counts[:k] + (c - 1,) + counts[k + 1 :])
            if smaller is not None and smaller.bottleneck_s <= shape.bottleneck_s:
                minimal = False
                break
        if minimal:
            out.append(shape)
    return out


def stage_layers(problem: PlanningProblem, shape: PipelineShape) -> list[tuple[int, int]]:
    """Returns (kind, layers) per stage in pipeline order for a shape, balanced within kinds."""
    if shape.stages:
        return list(shape.stages)
    order = [shape.first_kind]
    rest = list(shape.counts)
    rest[shape.first_kind] -= 1
    if shape.n_stages > 1:
        rest[shape.last_kind] -= 1
    for k, c in enumerate(rest):
        order.extend([k] * c)
    if shape.n_stages > 1:
        order.append(shape.last_kind)
    n = len(order)
    flags = [(i == 0, i == n - 1) for i in range(n)]
    table = CapTable(problem)
    caps = [table.cap(k, shape.bottleneck_s, n, f) for k, f in zip(order, flags, strict=True)]
    layers = [1] * n
    for k, total in enumerate(shape.layers_per_kind):
        idx = [i for i in range(n) if order[i] == k]
        for _ in range(total - len(idx)):
            # give the next layer to the stage of this kind that stays fastest with it
            i = min(
                (i for i in idx if layers[i] < caps[i]),
                key=lambda i: (problem.stage_decode_s(k, layers[i] + 1, *flags[i]), i),
            )
            layers[i] += 1
    return list(zip(order, layers, strict=True))
