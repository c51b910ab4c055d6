"""A discrete-event simulation of a request trace over a planned deployment.

    trace = load_trace(path, rate_scale=2.0)  # planner/trace.py
    result = simulate(spec, trace, policy="auto")

Events are arrivals, admissions (prefill) and completions, per pipeline; between two events
the set of sequences a pipeline decodes does not change, so its decode steps are taken as one
chunk, each step costed at the chunk's middle context (step time is linear in context within
a CONTEXT_BUCKET; planner/serving_costs.py). Continuous batching: a pipeline admits queued
requests while it has a free slot (S stages x batch) and KV room for prompt + output; each
admitted prompt is prefilled before decode resumes: a pipeline with sequences running loses
the prompt's whole traversal (each micro-batch waits behind it at every stage in turn), an
idle one only its slowest stage (prompts back to back overlap across stages). Requests go to
the least loaded of up to ROUTE_CHOICES pipelines (load: queued + active per slot).

Policies: `static` serves the initial configuration throughout. `auto` calls
planner.adapt.propose (the controller's decision rule, planner/controller.py) every
`control_interval_s` with the last `window_s` of arrivals (the time so far until a full
window has passed, as the live workload monitor reports it; the backlog counts as demand to
serve within the next interval); an applied change prefetches for
its predicted duration while the old configuration serves (slowed by the paced overhead),
then every pipeline stalls for the predicted switch, and requests of changed or removed
pipelines continue, with their KV, on the new ones. Requests whose KV the diff planner drops
(memory cannot hold it through the change) leave their pipeline at the decision, wait for the
switch, and prefill their prompt and the tokens they made again, first in the new queues. Device-hours count every device a
configuration uses, and during a prefetch the devices of both.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from planner.controller import ControllerPolicy, ControllerState
from planner.serving_costs import PipelineCosts
from planner.spec import Spec, SpecError
from planner.trace import Trace

ROUTE_CHOICES = 4

Stages = list[tuple[str, int, int]]


def shape(config: Sequence[Stages]) -> str:
    """Returns how many pipelines of each depth a configuration has, deepest first: e.g.
    '3x2 + 2x1 stages' for three 2-stage pipelines beside two 1-stage ones."""
    counts: dict[int, int] = {}
    for p in config:
        counts[len(p)] = counts.get(len(p), 0) + 1
    return " + ".join(f"{n}x{s}" for s, n in sorted(counts.items(), reverse=True)) + " stages"


class SimPipeline:
    """One pipeline's queue, active sequences and clock. A sequence admitted at decode step
    a with context c has context c + (steps - a) now; `ctx_base` sums c - a over the active."""

    def __init__(self, stages: Stages, costs: PipelineCosts, now_s: float):
        self.stages = stages
        self.costs = costs
        self.t = now_s
        self.slow = 1.0  # > 1 while a background prefetch runs
        self.queue: deque[int] = deque()
        self.steps = 0  # decode steps taken so far
        self.ends: list[tuple[int, int]] = []  # heap of (step at which it ends, request)
        self.admitted: dict[int, int] = {}  # active request -> its context - admission step
        self.ctx_base = 0
        self.kv_reserved = 0

    @property
    def active(self) -> int:
        return len(self.ends)

    def load(self) -> float:
        return (len(self.queue) + self.active) / self.costs.slots

    def evict(self, run: _Run, requests: Sequence[int]) -> None:
        """Drops the KV of these active requests: each is to prefill its prompt and the tokens
        it has made again (`run.redo`) once admitted anywhere, its first token kept."""
        gone, kept = set(requests), []
        for end, r in self.ends:
            if r not in gone:
                kept.append((end, r))
                continue
            run.remaining[r] = end - self.steps
            run.redo[r] = run.trace.prompt[r] + run.trace.output[r] - 1 - run.remaining[r]
            run.prefilled[r] = False
            self.ctx_base -= self.admitted.pop(r)
            self.kv_reserved -= run.trace.prompt[r] + run.trace.output[r]
        heapq.heapify(kept)
        self.ends = kept

    def detach(self, run: _Run) -> list[int]:
        """Removes and returns every request here, active first, their progress kept."""
        out = []
        for end, r in sorted(self.ends):
            run.remaining[r] = end - self.steps
            out.append(r)
        out.extend(self.queue)
        self.ends, self.queue, self.admitted = [], deque(), {}
        self.ctx_base = self.kv_reserved = 0
        return out


@dataclass
class _Run:
    trace: Trace
    remaining: list[int]  # decode tokens still to produce after the first
    first_s: list[float]
    finish_s: list[float]
    prefilled: list[bool]
    redo: dict[int, int] = field(default_factory=dict)  # request -> positions to prefill again


def _advance(p: SimPipeline, run: _Run, until: float) -> None:
    """Runs pipeline `p` until its clock reaches `until` or it has nothing left to do."""
    tr, costs = run.trace, p.costs
    while True:
        if p.queue and p.active < costs.slots:
            r = p.queue[0]
            need = tr.prompt[r] + tr.output[r]
            if not p.active or p.kv_reserved + need <= costs.kv_capacity_tokens:
                start = max(p.t, tr.arrival_s[r])
                if start > until:
                    p.t = max(p.t, until)
                    return
                p.queue.popleft()
                p.t = start
                if not run.prefilled[r]:
                    redo = run.redo.pop(r, None)  # KV dropped by a change: its first token stays
                    busy, first = costs.prefill_s(redo or tr.prompt[r], p.active)
                    if p.active:  # running sequences pass every stage behind the prompt
                        busy = first
                    if redo is None:
                        run.first_s[r] = p.t + first * p.slow
                    p.t += busy * p.slow
                    run.prefilled[r] = True
                if run.remaining[r] <= 0:
                    run.finish_s[r] = run.first_s[r]
                    continue
                ctx = need - 1 - run.remaining[r]
                p.kv_reserved += need
                heapq.heappush(p.ends, (p.steps + run.remaining[r], r))
                p.admitted[r] = ctx - p.steps
                p.ctx_base += ctx - p.steps
                continue
        if not p.ends:
            p.t = max(p.t, until)
            return
        if p.t >= until:
            return
        n = p.active
        k_max = p.ends[0][0] - p.steps
        mean_ctx = (p.ctx_base + n * p.steps) / n
        step = costs.decode_step_s(n, mean_ctx + k_max / 2) * p.slow
        k = k_max if until == math.inf else min(k_max, max(1, math.ceil((until - p.t) / step)))
        p.t += k * step
        p.steps += k
        while p.ends and p.ends[0][0] <= p.steps:
            _, r = heapq.heappop(p.ends)
            run.finish_s[r] = p.t
            run.remaining[r] = 0
            p.ctx_base -= p.admitted.pop(r)
            p.kv_reserved -= tr.prompt[r] + tr.output[r]


@dataclass
class Reconfiguration:
    decided_s: float
    switch_s: float
    prefetch_s: float
    stall_ms: float
    devices_before: int
    devices_after: int
    pipelines_after: int
    reason: str
    recomputed: int = 0  # requests whose KV the change dropped (they prefilled again)
    shape_after: str = ""  # the configuration it switched to, e.g. '3x2 + 2x1 stages'

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SimResult:
    policy: str
    requests: int
    duration_s: float
    goodput_rps: float
    slo_attainment: float
    device_hours: float
    reconfigurations: list[Reconfiguration]
    ttft_ms: dict[str, float]
    tpot_ms: dict[str, float]
    decisions: list[dict[str, Any]]
    timeline: list[dict[str, Any]]  # per bin: load, devices, configuration, TTFT / TPOT
    initial: list[Stages]
    final: list[Stages]
    wall_s: float = 0.0

    def to_json(self, full: bool = False) -> dict[str, Any]:
        out = {
            "policy": self.policy,
            "requests": self.requests,
            "duration_s": self.duration_s,
            "goodput_rps": self.goodput_rps,
            "slo_attainment": self.slo_attainment,
            "device_hours": self.device_hours,
            "reconfigurations": len(self.reconfigurations),
            "reconfiguration_stall_ms": [r.stall_ms for r in self.reconfigurations],
            "reconfiguration_list": [r.to_json() for r in self.reconfigurations],
            "ttft_ms": self.ttft_ms,
            "tpot_ms": self.tpot_ms,
            "initial": [[list(s) for s in p] for p in self.initial],
            "final": [[list(s) for s in p] for p in self.final],
            "wall_s": round(self.wall_s, 3),
            "decisions": self.decisions,
        }
        if full:
            out["timeline"] = self.timeline
        return out


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    if not values:
        return {"p50": 0.0, "p90": 0.0, "p99": 0.0}
    q = np.percentile(np.asarray(values) * 1000, [50, 90, 99])
    return {"p50": float(q[0]), "p90": float(q[1]), "p99": float(q[2])}


def initial_plan(spec: Spec, trace: Trace, objective: str = "max_throughput") -> list[Stages]:
    """Returns the planner's configuration for the whole trace's workload, or, where none
    meets the SLOs under it, for the spec's own workload (the trace then shows the misses)."""
    from planner.adapt import WorkloadWindow, best_of, candidates, throughput_plans, window_spec

    window = WorkloadWindow.of(trace.prompt, trace.output, max(trace.duration_s, 1.0))
    found: list[list[Stages]] = []
    for base in (window_spec(spec, window, None), spec):
        wspec = base.model_copy(update={"objective": objective})
        if objective == "max_throughput":
            # at a batch the KV does not hold, the most-throughput plans at smaller batches too
            config = best_of(wspec, window, throughput_plans(wspec, 10.0))
            found = [config] if config else []
        else:
            found = candidates(wspec, None, 10.0)
        if found:
            break
    if not found:
        raise SpecError(["the planner finds no configuration for this spec and trace"])
    return found[0] if objective == "max_throughput" else found[-1]


def within_context(trace: Trace, max_context: int) -> tuple[Trace, int]:
    """Returns the trace without requests whose prompt + output exceed the model's context
    (a server refuses them), and how many were dropped."""
    keep = [i for i in range(len(trace)) if trace.prompt[i] + trace.output[i] <= max_context]
    return trace.subset(keep), len(trace) - len(keep)


def simulate(
    spec: Spec,
    trace: Trace,
    policy: str = "static",
    initial: list[Stages] | None = None,
    controller: ControllerPolicy | None = None,
    control_interval_s: float = 60.0,
    window_s: float = 300.0,
    bin_s: float = 60.0,
    seed: int = 0,
) -> SimResult:
    """Returns the served figures of `trace` over the deployment under `policy`."""
    import time

    from planner.adapt import WorkloadWindow, propose

    if policy not in ("static", "auto"):
        raise ValueError(f"unknown policy {policy!r}; use static or auto")
    wall0 = time.perf_counter()
    controller = controller or ControllerPolicy()
    # devices go back on a full window's evidence (planner/adapt.may_shed)
    controller = replace(
        controller, scale_down_window_s=min(controller.scale_down_window_s, window_s)
    )
    config = initial if initial is not None else initial_plan(spec, trace)
    batch = spec.workload.batch
    n = len(trace)
    run = _Run(trace, [o - 1 for o in trace.output], [math.nan] * n, [math.nan] * n, [False] * n)
    pipes = [SimPipeline(st, PipelineCosts.of(spec, st, batch, config), 0.0) for st in config]
    rng = random.Random(seed)
    state = ControllerState()
    decisions: list[dict[str, Any]] = []
    reconfigs: list[Reconfiguration] = []
    pending: tuple[float, list[Stages], float, list[int]] | None = None
    devices_now = sum(len(p) for p in config)
    device_s, last_t = 0.0, 0.0
    device_bins: dict[int, float] = {}
    config_bins: dict[int, int] = {}

    def account(t: float) -> None:
        nonlocal device_s, last_t
        if t > last_t:
            device_s += devices_now * (t - last_t)
            for b in range(int(last_t // bin_s), int(t // bin_s) + 1):
                device_bins[b] = max(device_bins.get(b, 0), devices_now)
                config_bins[b] = max(config_bins.get(b, 0), len(pipes))
            last_t = t

    def route(r: int, t: float, only: list[SimPipeline] | None = None) -> None:
        pool = only or pipes
        picks = pool if len(pool) <= ROUTE_CHOICES else rng.sample(pool, ROUTE_CHOICES)
        for p in picks:
            _advance(p, run, t)
        min(picks, key=lambda p: p.load()).queue.append(r)

    def control(t: float) -> None:
        nonlocal pending, devices_now, state
        for p in pipes:
            _advance(p, run, t)
        # the window so far, as the live workload monitor reports it (agent/workload_monitor.py)
        seconds = min(window_s, t)
        lo, hi = _bisect(trace.arrival_s, t - seconds), _bisect(trace.arrival_s, t)
        if hi - lo < 10:
            return
        window = WorkloadWindow.of(
            trace.prompt[lo:hi], trace.output[lo:hi], seconds, trace.arrival_s[lo:hi], t
        )
        # the backlog is demand too: what waits now must be served within the next interval
        window = window.with_backlog(sum(len(p.queue) for p in pipes), control_interval_s)
        running = [(j, r, end) for j, p in enumerate(pipes) for end, r in p.ends]
        in_flight = [
            (j, trace.prompt[r] + trace.output[r] - 1 - (end - pipes[j].steps))
            for j, r, end in running
        ] + [(j, 0) for j, p in enumerate(pipes) for _ in p.queue]
        current = [p.stages for p in pipes]
        prop = propose(spec, window, current, in_flight, t, state, controller)
        d = prop.decision
        decisions.append(
            {
                "t_s": round(t, 1),
                "act": d.act,
                "reason": d.reason,
                "rate_rps": round(window.rate_per_s, 3),
                "recent_rate_rps": round(window.recent_rate_per_s, 3),
                "backlog": window.backlog,
                "value_current": round(d.value_current, 4),
                "value_target": round(d.value_candidate, 4),
                "gain_requests": round(d.gain, 2),
                "cost_requests": round(d.cost, 3),
                "payback_s": None if d.payback_s is None else round(d.payback_s, 1),
                "prefetch_s": round(prop.prefetch_s, 2),
                "stall_ms": round(prop.stall_s * 1000, 2),
                "recompute_requests": prop.change.recompute_requests,
                "devices_target": prop.target_outlook.devices,
            }
        )
        if not d.act:
            return
        account(t)
        before = {s[0] for p in current for s in p}
        after = {s[0] for p in prop.target for s in p}
        devices_now = len(before | after)
        for p in pipes:
            p.slow = 1.0 + prop.change.overhead
        # requests whose KV the change drops wait, without it, for the switch (no room before)
        evicted = [running[i][1] for i in prop.recompute]
        for p in pipes:
            p.evict(run, evicted)
        state = ControllerState(last_apply_end_s=state.last_apply_end_s, applying=True)
        pending = (t + prop.prefetch_s, prop.target, prop.stall_s, evicted)
        reconfigs.append(
            Reconfiguration(
                t,
                t + prop.prefetch_s,
                prop.prefetch_s,
                prop.stall_s * 1000,
                len(before),
                len(after),
                len(prop.target),
                d.reason,
                len(evicted),
                shape(prop.target),
            )
        )

    def switch() -> None:
        nonlocal pending, pipes, devices_now, state
        assert pending is not None
        ts, target, stall_s, evicted = pending
        for p in pipes:
            _advance(p, run, ts)
        account(ts)
        old = {tuple(p.stages): p for p in pipes}
        new_pipes, moved = [], list(evicted)
        for st in target:
            kept = old.pop(tuple(st), None)
            costs = PipelineCosts.of(spec, st, batch, target)  # a kept one's neighbours may change
            if kept is not None:
                kept.costs = costs
            new_pipes.append(kept or SimPipeline(st, costs, ts))
        for p in old.values():
            moved.extend(p.detach(run))
        resume = ts + stall_s
        for p in new_pipes:
            p.t = max(p.t, resume)
            p.slow = 1.0
        pipes = new_pipes
        for r in moved:
            route(r, resume, [p for p in pipes if p.active < p.costs.slots] or pipes)
        devices_now = sum(len(p) for p in target)
        state = ControllerState(last_apply_end_s=resume, applying=False)
        pending = None

    next_control = control_interval_s
    for r in range(n):
        ta = trace.arrival_s[r]
        while True:
            if pending is not None and pending[0] <= min(ta, next_control):
                switch()
            elif policy == "auto" and next_control <= ta:
                control(next_control)
                next_control += control_interval_s
            else:
                break
        route(r, ta)
    if pending is not None:
        switch()
    end_t = trace.arrival_s[-1] if n else 0.0
    for p in pipes:
        _advance(p, run, math.inf)
    account(end_t)
    return _result(
        spec,
        policy,
        run,
        device_s,
        reconfigs,
        decisions,
        config,
        pipes,
        bin_s,
        device_bins,
        config_bins,
        time.perf_counter() - wall0,
    )


def _bisect(values: list[float], x: float) -> int:
    import bisect

    return bisect.bisect_left(values, x)


def _result(
    spec: Spec,
    policy: str,
    run: _Run,
    device_s: float,
    reconfigs: list[Reconfiguration],
    decisions: list[dict[str, Any]],
    initial: list[Stages],
    pipes: list[SimPipeline],
    bin_s: float,
    device_bins: dict[int, float],
    config_bins: dict[int, int],
    wall_s: float,
) -> SimResult:
    tr = run.trace
    ttft_slo = math.inf if spec.slo.ttft_ms is None else spec.slo.ttft_ms / 1000
    tpot_slo = math.inf if spec.slo.tpot_ms is None else spec.slo.tpot_ms / 1000
    ttfts, tpots, met = [], [], 0
    bins: dict[int, dict[str, list[float]]] = {}
    for r in range(len(tr)):
        ttft = run.first_s[r] - tr.arrival_s[r]
        tpot = (run.finish_s[r] - run.first_s[r]) / (tr.output[r] - 1) if tr.output[r] > 1 else 0.0
        ttfts.append(ttft)
        tpots.append(tpot)
        ok = ttft <= ttft_slo and tpot <= tpot_slo
        met += ok
        b = bins.setdefault(int(tr.arrival_s[r] // bin_s), {"ttft": [], "tpot": [], "ok": []})
        b["ttft"].append(ttft)
        b["tpot"].append(tpot)
        b["ok"].append(ok)
    duration = max(tr.duration_s, 1.0)
    timeline = []
    for b in sorted(bins):
        v = bins[b]
        timeline.append(
            {
                "t_s": b * bin_s,
                "rate_rps": len(v["ttft"]) / bin_s,
                "devices": device_bins.get(b, 0),
                "pipelines": config_bins.get(b, 0),
                "ttft_ms": _percentiles(v["ttft"]),
                "tpot_ms": _percentiles(v["tpot"]),
                "slo_attainment": sum(v["ok"]) / len(v["ok"]),
            }
        )
    return SimResult(
        policy=policy,
        requests=len(tr),
        duration_s=duration,
        goodput_rps=met / duration,
        slo_attainment=met / max(len(tr), 1),
        device_hours=device_s / 3600,
        reconfigurations=reconfigs,
        ttft_ms=_percentiles(ttfts),
        tpot_ms=_percentiles(tpots),
        decisions=decisions,
        timeline=timeline,
        initial=initial,
        final=[p.stages for p in pipes],
        wall_s=wall_s,
    )
