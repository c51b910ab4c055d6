"""TPOT, TTFT and throughput of a configuration at a given load: the batches the engine really
forms when requests arrive at a rate (or a fixed number stream at once), not the planner's
full micro-batches.

Contract:
    PipelineTimes(decode_s, prefill_s, n_stages, inflight, node)   one pipeline's cost curves
    load_point(pipelines, rate_per_s=..., prompt_tokens, output_tokens, share_of=...)  -> LoadPoint
    load_point(pipelines, concurrent=N, ...)                                           -> LoadPoint

The engine sends each new request to the least loaded pipeline (so each of P pipelines gets
lambda / P) and keeps M_p micro-batches in flight (cost_models/host_sharing.engine_inflight),
spreading its N_p running requests over them. Per pipeline, at a fixed point in N_p:

    m_p    = min(M_p, max(1, ceil(N_p)))               micro-batches actually in flight
    b_p    = max(1, N_p / m_p)                         sequences per micro-batch
    k_p    = min(S_p, m_p)                             its busy workers while it has work
    u_p    = min(1, N_p)                               the chance that it has work
    f_p    = E[share_of(k_p + sum_{q != p} k_q [w.p. u_q])]
                                                       the host contention its requests see:
                                                       (E[f_c], E[f_m]), both factors

With arrivals at a rate the running requests are counted as Poisson (a request sees the
others: m_p = min(M_p, round(1 + N_p)), b_p = 1 + N_p / m_p), and since each new request
goes to the least loaded pipeline the others, M ~ Poisson(N = sum_p N_p), keep
min(P - 1, M) other pipelines busy: f_p = E[share_of(k_p + min(P - 1, M) * mean k_q)],
and u_p = E[min(P, N)] / P.
A stage's curves give its time on the host at the factors f = (f_c, f_m) its requests see:
a time on a worker alone split into its memory part m and the rest, m * f_m + (t - m) * f_c
(cost_models/host_sharing.py), linear in both factors, so the curve at (E[f_c], E[f_m]) is
its expected time. Then, with f = f_p:
    t_s    = decode_s[s](b_p, context; f)              context = prompt + output / 2
    cycle  = max(sum_s t_s, m_p * max_s t_s)           every running request gets one token
    stall  = sum_s max(0, prefill_s[s](f) - decode_s[s](1, prompt; f))
                                                       what a prompt delays the decodes by: it
                                                       rides in a micro-batch with them (the
                                                       engine's scheduler puts prefill chunks,
                                                       up to 512 tokens, beside the decode
                                                       tokens), so the step they share - weights
                                                       streamed once, the head's weights, the
                                                       return to the engine - is paid once
    rho    = lambda_p * stall * a                      share of time the decodes stall, where
                                                       a = 1 with `concurrent` clients and
                                                       P(M >= P - 1) with arrivals at a rate
                                                       (a prompt goes to an idle pipeline
                                                       while one is left)
    TPOT   = cycle / (1 - rho)
    TTFT   = sum_s prefill_s[s](f) + cycle / 2         its prefill, after half a step's wait
    N_p    = lambda_p * (TTFT + (output - 1) * TPOT)   Little's law

and throughput = lambda * output while every rho < 1 and N_p stays below what the pipeline
admits; with `concurrent` clients the N_p are fixed (N / P each) and lambda_p is the unknown:
lambda_p = N_p / (TTFT + (output - 1) * TPOT), throughput = sum_p lambda_p * output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cost_models.host_sharing import HostShare

# (sequences per micro-batch, context, the host's factors) -> s on the shared host
DecodeCurve = Callable[[float, float, HostShare], float]
PrefillCurve = Callable[[float, HostShare], float]  # (prompt tokens, the host's factors) -> s
ALONE = HostShare()  # a worker alone: f_c = f_m = 1


@dataclass(frozen=True)
class PipelineTimes:
    """One pipeline: every stage's decode and prefill time (hops included) on the host at the
    factors given, linear in f_c and f_m (a worker alone at ALONE)."""

    decode_s: tuple[DecodeCurve, ...]
    prefill_s: tuple[PrefillCurve, ...]
    inflight: int  # M_p: micro-batches the engine keeps in flight
    node: str = "local"

    @property
    def n_stages(self) -> int:
        return len(self.decode_s)


@dataclass(frozen=True)
class LoadPoint:
    tpot_s: float
    ttft_s: float
    throughput_tok_s: float
    running_per_pipeline: tuple[float, ...]
    batch_per_pipeline: tuple[float, ...]  # b_p
    busy_workers: float
    contention: float  # E[f_m] the running requests see
    saturated: bool  # the rate exceeds what the configuration serves
    compute_contention: float = 1.0  # E[f_c] they see


def load_point(
    pipelines: Sequence[PipelineTimes],
    prompt_tokens: float,
    output_tokens: float,
    rate_per_s: float | None = None,
    concurrent: int | None = None,
    share_of: Callable[[float], HostShare] | None = None,
    max_running_per_pipeline: float = 1e4,
    iterations: int = 400,
) -> LoadPoint:
    """Returns the load point of the configuration (formulas in the module docstring)."""
    if (rate_per_s is None) == (concurrent is None):
        raise ValueError("give exactly one of rate_per_s and concurrent")
    n_pipes = len(pipelines)
    context = prompt_tokens + output_tokens / 2
    running = [1.0] * n_pipes if concurrent is None else [concurrent / n_pipes] * n_pipes
    lam = [0.0 if rate_per_s is None else rate_per_s / n_pipes] * n_pipes
    state: tuple = ()
    saturated = False
    for _ in range(iterations):
        if concurrent is None:
            # a request sees the others as Poisson: 1 + N_p / m_p in its micro-batch
            mb = [min(p.inflight, max(1, round(1 + n))) for p, n in zip(pipelines, running, strict=True)]
            batch = [1 + n / m for n, m in zip(running, mb, strict=True)]
            # the engine sends a request to the least loaded pipeline, so the others running
            # fill idle pipelines first: of P pipelines, min(P, N) are busy, N ~ Poisson
            total = sum(running)
            busy_prob = [_busy_share(total, n_pipes)] * n_pipes
        else:
            mb = [min(p.inflight, max(1, math.ceil(n - 1e-9))) for p, n in zip(pipelines, running, strict=True)]
            batch = [max(1.0, n / m) for n, m in zip(running, mb, strict=True)]
            busy_prob = [min(1.0, n) for n in running]
        stages_busy = [min(p.n_stages, m) for p, m in zip(pipelines, mb, strict=True)]
        busy = sum(k * u for k, u in zip(stages_busy, busy_prob, strict=True))
        tpots, ttfts, new_running, new_lam, seen = [], [], [], [], []
        for i, (p, n, m, lam_p) in enumerate(zip(pipelines, running, mb, lam, strict=True)):
            if concurrent is None:
                f = _seen_contention_spread(i, stages_busy, sum(running), share_of)
            else:
                f = _seen_contention(i, stages_busy, busy_prob, share_of)
            times = [_at(curve, batch[i], context, f) for curve in p.decode_s]
            cycle = max(sum(times), m * max(times))
            prefills = [curve(prompt_tokens, f) for curve in p.prefill_s]
            prefill = sum(prefills)
            # the step a prompt shares with the decodes beside it is not a stall
            stall = sum(
                max(0.0, t - curve(1, prompt_tokens, f))
                for t, curve in zip(prefills, p.decode_s, strict=True)
            )
            ttft = prefill + cycle / 2
            if concurrent is not None:
                # lam_p from Little's law with the previous TPOT guess, then TPOT from it
                lam_p = n / (ttft + (output_tokens - 1) * cycle)
                for _ in range(50):
                    rho = min(0.95, lam_p * stall)
                    tpot = cycle / (1 - rho)
                    lam_p = n / (ttft + (output_tokens - 1) * tpot)
                new_lam.append(lam_p)
                new_running.append(n)
            else:
                # a new prompt delays a running request's decodes only when it lands on its
                # pipeline, and it goes to an idle one while one is left: only when the
                # others running, M ~ Poisson(N), keep the other P - 1 pipelines busy
                rho = lam_p * stall * _all_busy(sum(running), n_pipes - 1)
                if rho >= 1:
                    saturated = True
                    rho = 0.99
                tpot = cycle / (1 - rho)
                new_running.append(lam_p * (ttft + (output_tokens - 1) * tpot))
                new_lam.append(lam_p)
            tpots.append(tpot)
            ttfts.append(ttft)
            seen.append(f)
        weights = [max(n, 1e-12) for n in running]
        f = HostShare(
            compute=sum(x.compute * w for x, w in zip(seen, weights, strict=True)) / sum(weights),
            memory=sum(x.memory * w for x, w in zip(seen, weights, strict=True)) / sum(weights),
        )
        state = (tpots, ttfts, batch, busy, f)
        if any(n > max_running_per_pipeline for n in new_running):
            saturated = True
            break
        done = all(abs(a - b) <= 1e-6 * max(1.0, b) for a, b in zip(new_running, running, strict=True))
        # damped: the running count feeds back through the batch and the contention
        running = [0.5 * a + 0.5 * b for a, b in zip(new_running, running, strict=True)]
        lam = new_lam
        if done:
            break
    tpots, ttfts, batches, busy, f = state
    throughput = sum(lam) * output_tokens
    return LoadPoint(
        tpot_s=sum(t * n for t, n in zip(tpots, running, strict=True)) / max(1e-12, sum(running)),
        ttft_s=max(ttfts),
        throughput_tok_s=throughput,
        running_per_pipeline=tuple(running),
        batch_per_pipeline=tuple(batches),
        busy_workers=busy,
        contention=f.memory,
        saturated=saturated,
        compute_contention=f.compute,
    )


def _at(curve: DecodeCurve, batch: float, context: float, share: HostShare) -> float:
    """Returns the curve at a fractional batch, linear between the whole batches around it."""
    lo = math.floor(batch)
    hi = math.ceil(batch)
    if lo == hi:
        return curve(lo, context, share)
    w = batch - lo
    return (1 - w) * curve(lo, context, share) + w * curve(hi, context, share)


def _poisson_below(total: float, n: int) -> list[float]:
    """Returns P(M = k) for k < n, M ~ Poisson(total)."""
    out, term = [], math.exp(-total)
    for k in range(n):
        out.append(term)
        term *= total / (k + 1)
    return out


def _all_busy(total: float, n_pipes: int) -> float:
    """Returns P(M >= n) for M ~ Poisson(total): the chance that M requests keep n pipelines
    busy (1 - P(M < n); 1 for n = 0)."""
    return max(0.0, 1.0 - sum(_poisson_below(total, n_pipes)))


def _busy_share(total: float, n_pipes: int) -> float:
    """Returns E[min(P, N)] / P for N ~ Poisson(total): the share of P pipelines with work
    when requests go to the least loaded one."""
    if total <= 0:
        return 0.0
    # E[min(P, N)] = sum_{k<P} k p_k + P * P(N >= P)
    below = _poisson_below(total, n_pipes)
    expected = sum(k * pk for k, pk in enumerate(below))
    return (expected + n_pipes * max(0.0, 1.0 - sum(below))) / n_pipes


def _seen_contention_spread(
    i: int,
    stages_busy: Sequence[int],
    total_running: float,
    share_of: Callable[[float], HostShare] | None,
) -> HostShare:
    """Returns (E[f_c], E[f_m]) a running request of pipeline i sees when requests go to the
    least loaded pipeline: the others running, M ~ Poisson(N), keep min(P - 1, M) other
    pipelines busy, each with the mean busy workers of the other pipelines."""
    if share_of is None:
        return ALONE
    others = [k for q, k in enumerate(stages_busy) if q != i]
    if not others:
        return share_of(stages_busy[i])
    k_other = sum(others) / len(others)
    below = _poisson_below(total_running, len(others))
    dist = [(stages_busy[i] + m * k_other, pm) for m, pm in enumerate(below)]
    dist.append((stages_busy[i] + len(others) * k_other, max(0.0, 1.0 - sum(below))))
    return _expected(dist, share_of)


def _expected(dist: Sequence[tuple[float, float]], share_of: Callable[[float], HostShare]) -> HostShare:
    """Returns (E[f_c], E[f_m]) over (busy workers, probability) pairs."""
    shares = [(share_of(b), pr) for b, pr in dist]
    return HostShare(
        compute=sum(s.compute * pr for s, pr in shares),
        memory=sum(s.memory * pr for s, pr in shares),
        busy_workers=sum(b * pr for b, pr in dist),
    )


def _seen_contention(
    i: int,
    stages_busy: Sequence[int],
    busy_prob: Sequence[float],
    share_of: Callable[[float], HostShare] | None,
) -> HostShare:
    """Returns (E[f_c], E[f_m]) a running request of pipeline i sees: its own k_i busy stages
    plus each other pipeline's k_q with probability u_q (independent)."""
    if share_of is None:
        return ALONE
    dist = {stages_busy[i]: 1.0}  # busy workers -> probability
    for q, (k, u) in enumerate(zip(stages_busy, busy_prob, strict=True)):
        if q == i:
            continue
        nxt: dict[int, float] = {}
        for b, pr in dist.items():
            nxt[b + k] = nxt.get(b + k, 0.0) + pr * u
            nxt[b] = nxt.get(b, 0.0) + pr * (1 - u)
        dist = nxt
    return _expected(list(dist.items()), share_of)
