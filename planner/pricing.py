"""Pricing: the pipeline shape with the best reduced cost, found without listing shapes.

Column generation (planner/column_generation.py) asks, for one model with duals priced in,

    max over pipelines c   A * batch / T*(c) - sum_k B_k c_k

(A: what a token/s of this model is worth at the current duals, B_k: what a device of kind k
costs; with per-node migration prices B_k also holds a stage's least share of the move,
(mu_k - mu_min) * layer_weight_bytes: planner/column_generation.py). For a stage count S
and a candidate bottleneck T the cheapest pipeline is a shortest path over (devices used,
layers covered, first stage placed, last stage placed):

    f_k(s, l, F, G) = min over t, f, g of  f_{k-1}(s - t - f - g, l - t*mid_k - f*first_k - g*last_k,
                                                  F - f, G - g) + (t + f + g) * B_k
    cost_S(T)       = f_K(S, L, 1, 1)       (l capped at L: covering more layers is allowed)

where mid_k, first_k, last_k are the layers a stage of kind k takes within T and memory at S
stages (planner/shapes.py CapTable), t + f + g <= n_k, and a kind whose cap is 0 in a role
cannot take it (every stage holds a layer). cost_S(T) falls as T grows while batch / T falls
too, so the best T of each S is searched by branch and bound over the sorted candidates:
on an interval [T_lo, T_hi] no value beats A * batch / T_lo - cost_S(T_hi), and where
cost_S(T_lo) = cost_S(T_hi) the best is at T_lo.

With a TTFT SLO the TTFT of a pipeline is additive along the path,

    TTFT = sum over stages of x_i * prefill_k(i) + embed_first + head_last + (S - 1) * hop,

where x_i (1 <= x_i <= cap of stage i, sum x_i = L) is least when the layers beyond one per
stage go to the kinds with the fastest prefill first (planner/shapes.py). So the kinds are
taken in order of prefill speed, and a block of d stages of kind k (t middle, f first, g
last; hi = t * mid_k + f * first_k + g * last_k) takes exactly that fill:

    x_k = min(hi, L - l - (S - s - d))          (leave one layer to every later stage)

over states (s, l exact, F, G) that each keep the labels (cost, prefill so far) no other
label beats (the rest of a path depends only on the state, so this is exact). A label is
dropped when its prefill plus L - l layers at the next kind's speed passes the budget, or
(in the branch and bound) when its cost plus the cheapest remaining stages cannot beat what
is known. The relaxed path (TTFT ignored) bounds the cost from below and prunes first; when
its vector meets the SLO at T (planner/shapes.py shape_at) it is the answer.

Exact when the problem has no topology (with or without a TTFT SLO). With a topology each
stage is costed with its pool's fastest outgoing hop and TTFT is ignored: that relaxes the
pipeline, so the value found is an upper bound (the bound column generation certifies stays
valid). In every case the count vector found is costed exactly by planner/shapes.py's
best_shape before it becomes a column.
"""

from __future__ import annotations

import bisect
import math
import time
from dataclasses import dataclass

import numpy as np

from planner.problem import PlanningProblem
from planner.shapes import (
    CapTable,
    PipelineShape,
    best_shape,
    candidate_bottlenecks_s,
    shape_at,
)

_INF = math.inf


@dataclass(frozen=True)
class Priced:
    """What one pricing run found for one model."""

    shapes: tuple[PipelineShape, ...]  # exact shapes of the best vectors (one per stage count)
    best_value: float  # max of A * batch / T - B . c over every pipeline (upper bound if relaxed)
    exact: bool  # best_value is the true maximum, not a relaxation's
    complete: bool = True  # every stage count was searched (not stopped by a deadline)


class Pricer:
    """Prices one model's pipelines; keeps its cap tables and candidates between calls."""

    def __init__(self, problem: PlanningProblem, kind_counts: tuple[int, ...]):
        self.problem = problem
        self.kind_counts = kind_counts
        self.table = CapTable(problem)
        self.candidates = candidate_bottlenecks_s(problem)
        self.exact = problem.topology is None
        # a TTFT SLO without topology: labels (cost, prefill), kinds by prefill speed
        self.ttft = problem.ttft_slo_s is not None and problem.topology is None
        self.by_prefill = sorted(
            range(len(problem.kinds)), key=lambda k: (problem.kinds[k].layer_prefill_s, k)
        )
        self.max_stages = min(problem.max_stages, problem.n_layers, sum(kind_counts))
        # with a topology, the relaxation: every non-last stage pays its pool's fastest hop
        self.fast_hop_s = (
            None
            if problem.topology is None
            else [min(problem.out_hops_decode_s(k)) for k in range(len(problem.kinds))]
        )
        self._feasible: dict[tuple[int, int], int | None] = {}
        self._last_best: dict[int, int] = {}  # stage count -> candidate of its last best
        # CapTable.cap for every kind at once: fixed seconds per role, seconds per layer
        kinds = range(len(problem.kinds))
        hop = self.fast_hop_s or [None] * len(problem.kinds)
        self.layer_s = np.array([k.layer_decode_s for k in problem.kinds])
        self.fixed_s = {
            role: np.array(
                [problem.stage_decode_s(k, 0, *flags, hop[k] if out else 0.0) for k in kinds]
            )
            for role, flags, out in (
                ("mid", (False, False), True),
                ("first", (True, False), True),
                ("last", (False, True), False),  # the last stage sends nothing on
                ("only", (True, True), False),
            )
        }
        self._mem: dict[tuple[int, str], np.ndarray] = {}

    def caps(self, n_stages: int, idx: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Returns (mid, first, last) layers per kind at candidate idx with n_stages stages
        (one stage alone: `last` is its cap, first and last at once)."""
        t = self.candidates[idx]
        out = []
        for role, flags in (
            ("mid", (False, False)),
            ("first", (True, False)),
            ("only", (True, True)) if n_stages == 1 else ("last", (False, True)),
        ):
            key = (n_stages, role)
            if key not in self._mem:
                self._mem[key] = np.array(
                    [self.table.mem_cap(k, n_stages, flags) for k in range(len(self.layer_s))]
                )
            x = (t - self.fixed_s[role]) / self.layer_s
            time_cap = np.where(x > -1e-9, np.floor(x + 1e-9), -1)
            cap = np.minimum(np.minimum(time_cap, self._mem[key]), self.problem.n_layers)
            out.append(np.maximum(cap, 0).astype(np.int64))
        return out[0], out[1], out[2]

    def cheapest(
        self,
        n_stages: int,
        idx: int,
        prices: np.ndarray,
        want_vector: bool = False,
        relaxed: bool = False,
    ) -> tuple[float, tuple[int, ...] | None]:
        """Returns cost_S(T) and, if wanted, its count vector (None when no pipeline fits);
        `relaxed`: ignoring the TTFT SLO (a lower bound on the cost, faster)."""
        if self.ttft and not relaxed:
            return self.within_ttft(
                n_stages, idx, prices, self.cheapest(n_stages, idx, prices, True, True)
            )
        mid, first, last = self.caps(n_stages, idx)
        L = self.problem.n_layers
        K = len(prices)
        if n_stages == 1:
            ok = [k for k in range(K) if last[k] >= L and self.kind_counts[k] > 0]
            if not ok:
                return _INF, None
            k = min(ok, key=lambda k: (prices[k], k))
            return float(prices[k]), tuple(int(j == k) for j in range(K))
        S = n_stages
        f = np.full((S + 1, 2, 2, L + 1), _INF)  # (stages, first placed, last placed, layers)
        f[0, 0, 0, 0] = 0.0
        # kinds with fewer devices than stages go one by one (their count limit can bind)...
        limited = [k for k in range(K) if self.kind_counts[k] < S]
        history = []
        for k in limited:
            history.append(f)
            f = self._add_kind(f, k, S, prices, mid, first, last)
        bounded = f
        # ...the others in one pass over s, any of them in any role (no limit can bind)
        free = [k for k in range(K) if self.kind_counts[k] >= S]
        if free:
            f = bounded.copy()
            # in each role only kinds no other beats (more layers for no more) can matter
            roles = [_pareto(free, cap, prices) for cap in (mid, first, last)]
            gathers = [
                _Gather(L, cap[ks]) for ks, cap in zip(roles, (mid, first, last), strict=True)
            ]
            role_prices = [prices[ks][:, None] for ks in roles]
            # prev's layers, then their suffix minima, then an infinite entry (_Gather's index)
            ext = np.full((2, 2, 2 * (L + 1) + 1), _INF)
            for s in range(1, S + 1):
                ext[..., : L + 1] = f[s - 1]
                ext[..., L + 1 : 2 * (L + 1)] = np.minimum.accumulate(f[s - 1][..., ::-1], axis=-1)[
                    ..., ::-1
                ]
                for role, dst, src in (
                    (0, f[s], ext),
                    (1, f[s, 1], ext[0]),
                    (2, f[s, :, 1], ext[:, 0]),
                ):
                    if len(roles[role]):
                        step = (src[..., gathers[role].index] + role_prices[role]).min(axis=-2)
                        np.minimum(dst, step, out=dst)
        best = f[S, 1, 1, L]
        if not math.isfinite(best):
            return _INF, None
        if not want_vector:
            return float(best), None
        counts = [0] * K
        state = (S, 1, 1, L)
        if free:
            state = self._backtrack_free(f, bounded, state, free, prices, mid, first, last, counts)
        self._backtrack(history, bounded, state, limited, prices, mid, first, last, counts)
        return float(best), tuple(counts)

    def within_ttft(
        self,
        n_stages: int,
        idx: int,
        prices: np.ndarray,
        relaxed: tuple[float, tuple[int, ...] | None],
        cost_cap: float = _INF,
    ) -> tuple[float, tuple[int, ...] | None]:
        """Returns cost_S(T) under the TTFT SLO given the relaxed (cost, vector): the relaxed
        one when its vector meets the SLO at T (it is then the cheapest), else the labels'
        (infinite when it is `cost_cap` or more)."""
        cost, vec = relaxed
        if vec is None or cost >= cost_cap:
            return _INF, None
        if shape_at(self.problem, vec, self.candidates[idx], self.table, any_fit=True):
            return cost, vec
        return self.cheapest_within_ttft(n_stages, idx, prices, cost_cap)

    def cheapest_within_ttft(
        self, n_stages: int, idx: int, prices: np.ndarray, cost_cap: float = _INF
    ) -> tuple[float, tuple[int, ...] | None]:
        """Returns cost_S(T) among pipelines that meet the TTFT SLO, and its count vector
        (None when none does): labels (cost, prefill) per state, kinds fastest prefill
        first, each block of kind k taking x_k = min(hi, L - l - (S - s - d)) layers (module
        docstring)."""
        p = self.problem
        mid, first, last = self.caps(n_stages, idx)
        L, S, K = p.n_layers, n_stages, len(prices)
        kinds = p.kinds
        budget_s = p.ttft_slo_s * (1 + 1e-9) - (S - 1) * p.hop_prefill_s
        if S == 1:
            ok = [
                k
                for k in range(K)
                if last[k] >= L
                and self.kind_counts[k] > 0
                and L * kinds[k].layer_prefill_s + kinds[k].embed_prefill_s
                + kinds[k].head_prefill_s
                <= budget_s
            ]
            if not ok:
                return _INF, None
            k = min(ok, key=lambda k: (prices[k], k))
            return float(prices[k]), tuple(int(j == k) for j in range(K))
        order = [k for k in self.by_prefill if self.kind_counts[k] > 0]
        # the least price of a stage from the kinds at or after each position
        after = np.minimum.accumulate(np.array([prices[k] for k in order] + [_INF])[::-1])[::-1]
        base = max(self.kind_counts) + 1  # count vectors packed base `base`, kind k at base**k
        # labels: stages, first placed, last placed, layers, cost, prefill seconds, counts
        s, F, G, lay, code = (np.zeros(1, np.int64) for _ in range(5))
        cost, pre = np.zeros(1), np.zeros(1)
        for pos, k in enumerate(order):
            n_k, kind = self.kind_counts[k], kinds[k]
            # kind k's blocks: f first, g last, t middle stages (0, 0, 0: kind k unused)
            opts = np.array(
                [
                    (f, g, t)
                    for f in ((0, 1) if first[k] >= 1 else (0,))
                    for g in ((0, 1) if last[k] >= 1 else (0,))
                    for t in range(0, (n_k - f - g) + 1 if mid[k] >= 1 else 1)
                    if f + g + t <= min(n_k, S)
                ],
                np.int64,
            )
            of, og, ot = opts.T
            d = of + og + ot
            hi = ot * int(mid[k]) + of * int(first[k]) + og * int(last[k])
            ok = (F[:, None] + of <= 1) & (G[:, None] + og <= 1) & (s[:, None] + d <= S)
            li, oi = np.nonzero(ok)
            x = np.minimum(hi[oi], L - lay[li] - (S - s[li] - d[oi]))
            s, F, G = s[li] + d[oi], F[li] + of[oi], G[li] + og[oi]
            lay = lay[li] + x
            pre = (
                pre[li]
                + x * kind.layer_prefill_s
                + of[oi] * kind.embed_prefill_s
                + og[oi] * kind.head_prefill_s
            )
            cost = cost[li] + d[oi] * float(prices[k])
            code = code[li] + d[oi] * base**k
            # every layer still to place goes to a kind no faster than the next one
            rest = L - lay
            if pos + 1 < len(order):
                keep = pre + rest * kinds[order[pos + 1]].layer_prefill_s <= budget_s
                if math.isfinite(cost_cap):  # labels that cannot end below the cap
                    more = S - s
                    keep &= cost + np.where(more > 0, more * after[pos + 1], 0.0) < cost_cap
            else:
                keep = (rest == 0) & (pre <= budget_s) & (s == S) & (F == 1) & (G == 1)
                keep &= cost < cost_cap
            s, F, G, lay, cost, pre, code = _pareto_labels(
                *(a[keep] for a in (s, F, G, lay, cost, pre, code)), L
            )
        if len(cost) == 0:
            return _INF, None
        i = int(np.argmin(cost))
        return float(cost[i]), tuple(int(code[i]) // base**k % base for k in range(K))

    def _add_kind(
        self,
        f: np.ndarray,
        k: int,
        S: int,
        prices: np.ndarray,
        mid: np.ndarray,
        first: np.ndarray,
        last: np.ndarray,
    ) -> np.ndarray:
        """Returns f after kind k: maybe the first stage, maybe the last, then t middle ones,
        within its n_k devices (t grows one stage at a time: f = min(f, f plus one stage))."""
        L = self.problem.n_layers
        n_k, price = self.kind_counts[k], float(prices[k])
        with_first = _add_stage(f, int(first[k]), price, L, role=2) if first[k] >= 1 else None
        parts = [(f.copy(), n_k)]
        if with_first is not None and n_k >= 1:
            parts.append((with_first, n_k - 1))
        if last[k] >= 1 and n_k >= 1:
            parts.append((_add_stage(f, int(last[k]), price, L, role=3), n_k - 1))
            if with_first is not None and n_k >= 2:
                parts.append((_add_stage(with_first, int(last[k]), price, L, role=3), n_k - 2))
        new = None
        for part, room in parts:
            if mid[k] >= 1:
                for _ in range(min(room, S)):
                    step = _add_stage(part, int(mid[k]), price, L, role=1)
                    if not (step < part).any():
                        break
                    np.minimum(part, step, out=part)
            new = part if new is None else np.minimum(new, part)
        assert new is not None
        return new

    def _backtrack_free(
        self,
        f: np.ndarray,
        bounded: np.ndarray,
        state: tuple[int, int, int, int],
        free: list[int],
        prices: np.ndarray,
        mid: np.ndarray,
        first: np.ndarray,
        last: np.ndarray,
        counts: list[int],
    ) -> tuple[int, int, int, int]:
        """Walks the one-pass part back to where the kinds taken one by one left off."""
        L = self.problem.n_layers
        value = f[state]
        while not _close(bounded[state], value):
            s, F, G, covered = state
            found = None
            for k in free:
                for role, cap in ((0, mid[k]), (1, first[k]), (2, last[k])):
                    if cap < 1 or (role == 1 and not F) or (role == 2 and not G):
                        continue
                    sources = range(max(0, L - cap), L + 1) if covered == L else [covered - cap]
                    for src_l in sources:
                        if src_l < 0:
                            continue
                        src = (s - 1, F - (role == 1), G - (role == 2), int(src_l))
                        if _close(f[src] + prices[k], value):
                            found = (k, src)
                            break
                    if found:
                        break
                if found:
                    break
            assert found is not None, "pricing backtrack lost its path"
            counts[found[0]] += 1
            state = found[1]
            value = f[state]
        return state

    def _backtrack(
        self,
        history: list[np.ndarray],
        final: np.ndarray,
        state: tuple[int, int, int, int],
        limited: list[int],
        prices: np.ndarray,
        mid: np.ndarray,
        first: np.ndarray,
        last: np.ndarray,
        counts: list[int],
    ) -> None:
        """Adds to `counts` the stages of the kinds taken one by one, walking them backwards."""
        L = self.problem.n_layers
        value = final[state]
        for k, f in zip(reversed(limited), reversed(history), strict=True):
            s, F, G, covered = state
            found = None
            if _close(f[state], value):
                found = (state, 0)
            options = [
                (fa, ga, t)
                for fa in ((0, 1) if first[k] >= 1 and F else (0,))
                for ga in ((0, 1) if last[k] >= 1 and G else (0,))
                for t in range(0, (s - fa - ga) + 1 if mid[k] >= 1 else 1)
                if 0 < t + fa + ga <= min(s, self.kind_counts[k])
            ]
            for fa, ga, t in options if found is None else ():
                d = t + fa + ga
                add = t * int(mid[k]) + fa * int(first[k]) + ga * int(last[k])
                sources = range(max(0, L - add), L + 1) if covered == L else [covered - add]
                for src_l in sources:
                    if src_l < 0:
                        continue
                    src = (s - d, F - fa, G - ga, src_l)
                    if _close(f[src] + d * prices[k], value):
                        found = (src, d)
                        break
                if found is not None:
                    break
            assert found is not None, "pricing backtrack lost its path"
            state, counts[k] = found
            value = f[state]

    def price(
        self,
        value_per_tok_s: float,
        prices: np.ndarray,
        constant: float,
        floor: float,
        deadline: float | None = None,
    ) -> Priced:
        """Returns shapes worth more than `floor` at these prices (each one better than the
        last found, the best among them) and the best value any pipeline reaches, or at
        least `floor` (A = value_per_tok_s, B = prices, minus `constant` per pipeline).
        Stage counts go in the order of their bounds, and each search prunes with the best
        value found so far."""
        p = self.problem
        # per stage count S: the candidates allowed (TPOT), where pipelines start to fit, and
        # a bound on its best value (least feasible T, cheapest cost at the loosest T)
        plans = []
        for S in range(1, self.max_stages + 1):
            hi = len(self.candidates)
            if p.tpot_slo_s is not None:
                hi = bisect.bisect_right(self.candidates, p.tpot_slo_s / S * (1 + 1e-9))
            lo = self.first_feasible(S, hi) if hi > 0 else None
            if lo is None:
                continue
            loosest = self.cheapest(S, hi - 1, prices)[0]
            bound = value_per_tok_s * p.batch / self.candidates[lo] - loosest - constant
            plans.append((bound, S, lo, hi))
        best_value = max(floor, -_INF) if plans else -_INF
        vectors: list[tuple[int, ...]] = []
        complete = True
        if self.exact:
            # warm start: last call's best bottleneck of each S is often near this call's, and
            # a good value found first prunes the searches below
            for S, i in self._last_best.items():
                cost, vec = self.cheapest(S, i, prices, want_vector=True)
                if vec is not None:
                    value = value_per_tok_s * p.batch / self.candidates[i] - cost - constant
                    if value > best_value:
                        best_value = value
                        vectors.append(vec)
        for bound, S, lo, hi in sorted(plans, reverse=True):
            if bound <= best_value:
                break  # no later S can beat the best found (bounds are sorted)
            if deadline is not None and time.perf_counter() > deadline:
                complete = False
                break
            # relaxed pricing keeps every S's best: the best one may not be a real pipeline
            threshold = best_value if self.exact else max(floor, -_INF)
            s_best, s_vec, s_i = self._best_of_stages(
                S, lo, hi, value_per_tok_s, prices, constant, threshold
            )
            if s_vec is not None and s_best > threshold:
                best_value = max(best_value, s_best)
                vectors.append(s_vec)
                self._last_best[S] = s_i
        shapes = []
        for vec in dict.fromkeys(vectors):
            shape = best_shape(p, vec, self.candidates, self.table)
            if shape is not None:
                shapes.append(shape)
        return Priced(tuple(shapes), best_value, self.exact, complete)

    def first_feasible(self, S: int, hi: int) -> int | None:
        """Returns the least candidate index below `hi` at which some S-stage pipeline fits
        (prices do not matter: kept between calls), or None."""
        key = (S, hi)
        if key not in self._feasible:
            zero = np.zeros(len(self.kind_counts))

            def fits(i: int) -> bool:
                return math.isfinite(self.cheapest(S, i, zero)[0])

            if not fits(hi - 1):
                self._feasible[key] = None
            else:
                lo, up = 0, hi - 1  # fits(up)
                while lo < up:
                    m = (lo + up) // 2
                    if fits(m):
                        up = m
                    else:
                        lo = m + 1
                self._feasible[key] = up
        return self._feasible[key]

    def _best_of_stages(
        self,
        S: int,
        lo: int,
        hi: int,
        value_per_tok_s: float,
        prices: np.ndarray,
        constant: float,
        floor: float,
    ) -> tuple[float, tuple[int, ...] | None, int]:
        """Returns the best value of S-stage pipelines over candidates [lo, hi), its vector
        and candidate if it beats `floor` (branch and bound over the candidates; module
        docstring)."""
        memo: dict[int, tuple[float, tuple[int, ...] | None]] = {}
        capped: dict[int, float] = {}  # TTFT SLO: candidates whose cost is known >= this
        relaxed: dict[int, tuple[float, tuple[int, ...] | None]] = {}

        def relaxed_cost(i: int) -> float:  # with its vector when there is a TTFT SLO
            if i not in relaxed:
                relaxed[i] = self.cheapest(S, i, prices, want_vector=self.ttft, relaxed=True)
            return relaxed[i][0]

        def cost(i: int, cap: float = _INF) -> float:
            """cost_S at candidate i; under a TTFT SLO infinite when it is `cap` or more."""
            if i in memo:
                return memo[i][0]
            if not self.ttft:
                memo[i] = self.cheapest(S, i, prices)
                return memo[i][0]
            if capped.get(i, -_INF) >= cap:
                return _INF
            relaxed_cost(i)
            c, vec = self.within_ttft(S, i, prices, relaxed[i], cap)
            if math.isfinite(c) or not math.isfinite(cap):
                memo[i] = (c, vec)
            else:
                capped[i] = cap
            return c

        def value(i: int, c: float) -> float:
            return value_per_tok_s * self.problem.batch / self.candidates[i] - c - constant

        best, best_i = floor, None
        stack = [(lo, hi - 1)]
        while stack:
            lo, up = stack.pop()
            # what a pipeline in [lo, up] may cost at most to beat what is known
            cap = value(lo, 0.0) - best if self.ttft else _INF
            if self.ttft and relaxed_cost(up) >= cap:
                continue  # the cost without the TTFT SLO already bounds it
            c_up = cost(up, cap)
            if value(lo, c_up) <= best:
                continue  # nothing in [lo, up] beats what is known
            c_lo = cost(lo, cap)
            if c_lo == c_up or up - lo <= 1:
                for i, c in ((lo, c_lo), (up, c_up)):
                    if math.isfinite(c) and value(i, c) > best:
                        best, best_i = value(i, c), i
                continue
            half = (lo + up) // 2
            stack.append((half, up))
            stack.append((lo, half))
        if best_i is None:
            return best, None, -1
        if self.ttft:
            return best, memo[best_i][1], best_i
        return best, self.cheapest(S, best_i, prices, want_vector=True)[1], best_i


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(1.0, abs(b))


def _pareto(kinds: list[int], cap: np.ndarray, prices: np.ndarray) -> list[int]:
    """Returns the kinds (cap >= 1) that no other kind beats: as many layers or more for a
    lower price, or more layers for the same price (ties keep the first)."""
    usable = sorted((k for k in kinds if cap[k] >= 1), key=lambda k: (prices[k], -cap[k], k))
    out, most = [], 0
    for k in usable:
        if cap[k] > most:
            out.append(k)
            most = cap[k]
    return out


class _Gather:
    """One more stage of any of several kinds in one role: for each kind and each layer count
    reached, where in [src layers 0..L, their suffix minima, inf] it comes from."""

    def __init__(self, L: int, caps: np.ndarray):
        never = 2 * (L + 1)  # index of an infinite entry
        cap = caps[:, None]
        rows = np.arange(L + 1)[None, :] - cap
        rows[rows < 0] = never
        # every l >= L - cap reaches L: the suffix minimum from L - cap
        rows[:, L] = (L + 1) + np.maximum(0, L - caps)
        self.index = rows  # into [layers 0..L, their suffix minima, inf]


def _add_stage(f: np.ndarray, layers: int, price: float, L: int, role: int) -> np.ndarray:
    """Returns f with one more stage of `layers` layers at `price`: a middle stage (role 1),
    the first (2: F 0 -> 1) or the last (3: G 0 -> 1); layers past L count as L."""
    out = np.full(f.shape, _INF)
    if role == 1:
        src, dst = f[:-1], out[1:]
    elif role == 2:
        src, dst = f[:-1, :1], out[1:, 1:]
    else:
        src, dst = f[:-1, :, :1], out[1:, :, 1:]
    # src moved `layers` up along its last axis (layers >= 1), everything at or past L
    # landing on L with the cheapest
    if layers <= L:
        np.add(src[..., : L + 1 - layers], price, out=dst[..., layers:])
    dst[..., L] = src[..., max(0, L - layers) :].min(axis=-1) + price
    return out


def _pareto_labels(
    s: np.ndarray,
    F: np.ndarray,
    G: np.ndarray,
    lay: np.ndarray,
    cost: np.ndarray,
    pre: np.ndarray,
    code: np.ndarray,
    L: int,
) -> tuple[np.ndarray, ...]:
    """Returns the labels no other label of the same state (s, F, G, layers) beats: as cheap
    or cheaper with no more prefill (ties keep one)."""
    if len(s) == 0:
        return s, F, G, lay, cost, pre, code
    key = ((s * 2 + F) * 2 + G) * (L + 1) + lay
    order = np.lexsort((cost, key))  # equal costs in any order: keeps a few extra labels
    key_sorted, pre_sorted = key[order], pre[order]
    starts = np.r_[True, key_sorted[1:] != key_sorted[:-1]]
    # least prefill so far within each state: shift each state below all earlier ones
    shift = float(pre_sorted.max(initial=0.0)) + 1.0
    v = pre_sorted - key_sorted * shift
    least = np.minimum.accumulate(v)
    keep = starts.copy()
    keep[1:] |= v[1:] < least[:-1] - 1e-12 * shift
    idx = order[keep]
    return s[idx], F[idx], G[idx], lay[idx], cost[idx], pre[idx], code[idx]
