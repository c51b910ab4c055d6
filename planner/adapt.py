"""From an observed workload window to a decision: re-plan with the migration term, predict
both configurations' goodput, price the change with the diff planner, ask the decision rule.

    window = WorkloadWindow.of(prompts, outputs, seconds)
    proposal = propose(spec, window, current, in_flight, now_s, state, policy)
    proposal.decision.act, proposal.target, proposal.change

The simulator's `auto` policy calls `propose`; the live controller is to call it too, so the
rule is never copied. Goodput of a configuration under a window (`outlook`): each pipeline
whose predicted TTFT and TPOT (planner/evaluate.py, at the window's percentiles) meet the SLOs
has capacity C (planner/serving_costs.py); the deployment's capacity is their sum. The
rate is the window's expected one (WorkloadWindow.expected_rate_per_s: its mean, or its last
quarter's where higher, so that a rise counts at once and a fall only on the whole window). With
rho = rate / C, the share of requests that meet their SLOs is 1 up to UTILISATION (U), falls
linearly to SATURATED_SHARE (f1) at rho = 1 as the queue's tail passes the TTFT SLO, and past
C the queue grows at (rate - C): a request waits longer than the TTFT SLO once the backlog
passes ttft_slo * C, after T_ok = ttft_slo * C / (rate - C) s, so over OVERLOAD_HORIZON_S
the deployment serves in time for T_ok only:

    goodput = rate                                            if rho <= U
            = rate * (1 - (1 - f1) * (rho - U) / (1 - U))     if U < rho <= 1
            = f1 * C * min(1, T_ok / OVERLOAD_HORIZON_S)      otherwise

A backlog of B requests already waiting (the window's `backlog`) is a debt, not a rate: the
part of it beyond what the TTFT SLO lets wait (ttft_slo * C) is late, and so is every request
that arrives behind it until it has drained, after D = (B - ttft_slo * C)+ / (C - rate) s; past
C it never drains, and the queue passes the SLO after T_ok = (ttft_slo * C - B)+ / (rate - C):

    with a backlog:  goodput * H / (H + D)                  if rate < C     (H: OVERLOAD_HORIZON_S)
                     f1 * C * min(1, T_ok / H)              otherwise

(B = 0 gives the formulas above.) H / (H + D) is the share of the time from now to the end of
a horizon that starts once the backlog has drained: it never reaches 0 while C > rate, so a
deployment in overload is drawn to the configuration that drains fastest, instead of every
configuration looking equally lost.

It is continuous and rises with C, so more capacity never looks worse, and it prices
shedding a device below the load at what a FIFO queue in overload really loses (nearly every
request), not at the few requests a plain min(rate, U * C) would say. A candidate with fewer
devices than the current configuration is considered only when it carries the window
(rate <= U * C and its busiest minute <= C, `carries`) and the window spans the policy's
`scale_down_window_s` (`may_shed`): in an overload every goodput is near 0 and the device cost
alone would pick the smallest configuration, and a configuration sized on a minute's evidence
or on the mean rate misses the next burst.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from cost_models.device_catalog import DeviceKind
from cost_models.host_sharing import runnable_workers
from cost_models.memory import (
    embedding_bytes,
    head_bytes,
    kv_bytes_per_token_per_layer,
    kv_dtype_bytes_for,
    layer_weight_bytes,
)
from cost_models.model_catalog import get_model_arch
from planner.build_problem import build_problem, device_kind
from planner.configuration import Configuration, PipelineConfig, StageConfig
from planner.controller import (
    ChangeCost,
    ControllerPolicy,
    ControllerState,
    Decision,
    Outlook,
    decide,
    lost,
)
from planner.evaluate import build_pipeline
from planner.operating_batch import operating_batches
from planner.problem import PlanningProblem
from planner.reconfig import DeviceInfo, ModelFootprint, RequestKV, plan_reconfiguration
from planner.serving_costs import PipelineCosts
from planner.solve import plan
from planner.spec import (
    CurrentConfig,
    DeviceGroup,
    LengthDistribution,
    PipelineSpec,
    Spec,
    StageSpec,
    spec_profiles,
)
from planner.topology import node_hosts

UTILISATION = 0.75  # past this share of capacity, queueing eats the SLOs
SATURATED_SHARE = 0.5  # share of requests meeting the SLOs at exactly full capacity
OVERLOAD_HORIZON_S = 600.0  # how long an overload is assumed to last when predicting goodput
KV_BLOCK_TOKENS = 16
DEMAND_HEADROOM = (1.25, 1.6, 2.0)

Stages = list[tuple[str, int, int]]


PEAK_BIN_S = 60.0  # the peak rate is the busiest bin of this length in the window
# the rate a window is judged at is its mean, or that of its last quarter where higher
RECENT_SHARE = 0.25


@dataclass(frozen=True)
class WorkloadWindow:
    rate_per_s: float
    prompt: LengthDistribution
    output: LengthDistribution
    seconds: float = 0.0  # how much time the window spans (0: unknown)
    peak_rate_per_s: float = 0.0  # the busiest PEAK_BIN_S of it (0: unknown, use the rate)
    recent_rate_per_s: float = 0.0  # its last RECENT_SHARE (0: unknown, use the rate)
    backlog: int = 0  # requests waiting now, not yet admitted
    backlog_within_s: float = 0.0  # the time to serve them in (the decision interval)

    @classmethod
    def of(
        cls,
        prompts: Sequence[int],
        outputs: Sequence[int],
        seconds: float,
        arrivals_s: Sequence[float] | None = None,
        end_s: float | None = None,
    ) -> WorkloadWindow:
        """Returns the window of `prompts` that arrived over `seconds` (at `arrivals_s`, which
        give the peak: the most arrivals in one of the PEAK_BIN_S bins that end at the
        window's end and lie inside it; and, with the window's end `end_s`, the recent rate:
        the arrivals of its last RECENT_SHARE over that span)."""
        rate = max(len(prompts), 1) / seconds
        recent = 0.0
        if arrivals_s is not None and end_s is not None and seconds > 0:
            span = seconds * RECENT_SHARE
            recent = sum(1 for a in arrivals_s if a > end_s - span) / span
        peak = rate
        if arrivals_s and seconds >= PEAK_BIN_S:
            end = max(arrivals_s)
            bins = int(seconds // PEAK_BIN_S)
            counts = [0] * bins
            for a in arrivals_s:
                k = int((end - a) // PEAK_BIN_S)
                if 0 <= k < bins:
                    counts[k] += 1
            peak = max(rate, max(counts) / PEAK_BIN_S)
        return cls(rate, _dist(prompts), _dist(outputs), seconds, peak, recent)

    def with_backlog(self, waiting: int, within_s: float) -> WorkloadWindow:
        """Returns the window with `waiting` requests queued now, to serve within `within_s`
        (the next decision interval): a debt in the goodput (`goodput_rps`), and demand on
        top of the rate where a configuration must carry the window (`carries`)."""
        return replace(self, backlog=waiting, backlog_within_s=within_s)

    @property
    def backlog_rate_per_s(self) -> float:
        """Returns the rate that serves the backlog within its time."""
        return self.backlog / self.backlog_within_s if self.backlog_within_s > 0 else 0.0

    @property
    def expected_rate_per_s(self) -> float:
        """Returns the arrival rate the next interval is judged at: the window's mean, or its
        last RECENT_SHARE's where that is higher. A rise counts on the first evidence, as
        capacity is added; a fall only once the whole window shows it, as devices go back."""
        return max(self.rate_per_s, self.recent_rate_per_s)

    @property
    def demand_rate_per_s(self) -> float:
        """Returns the expected arrival rate plus the rate that serves the backlog in time."""
        return self.expected_rate_per_s + self.backlog_rate_per_s

    @property
    def busiest_rate_per_s(self) -> float:
        """Returns the peak rate (or the expected rate where higher), plus the backlog's."""
        return max(self.expected_rate_per_s, self.peak_rate_per_s) + self.backlog_rate_per_s

    def mean_request_s(self, tpot_s: float, ttft_s: float) -> float:
        """Returns how long a request occupies the deployment: TTFT + output * TPOT."""
        return ttft_s + self.output.mean * tpot_s


@dataclass
class Proposal:
    target: list[Stages]
    current_outlook: Outlook
    target_outlook: Outlook
    change: ChangeCost
    decision: Decision
    prefetch_s: float  # background loads and KV pre-copy before the switch
    stall_s: float
    recompute: list[int] = field(default_factory=list)  # in_flight indices whose KV is dropped
    recompute_overflow: bool = False  # the change was planned (and must be applied) dropping KV that does not fit


def _dist(values: Sequence[int]) -> LengthDistribution:
    if not values:
        return LengthDistribution(mean=1.0)
    v = sorted(values)

    def q(p: float) -> float:
        return float(v[min(len(v) - 1, math.ceil(p / 100 * len(v)) - 1)])

    return LengthDistribution(
        mean=max(1.0, sum(v) / len(v)), p50=q(50), p90=q(90), p95=q(95), p99=q(99), max=q(100)
    )


def window_spec(spec: Spec, window: WorkloadWindow, current: Sequence[Stages] | None) -> Spec:
    """Returns the spec with the window's workload and `current` as the serving configuration."""
    workload = spec.workload.model_copy(
        update={
            "request_rate_per_s": max(window.demand_rate_per_s, 1e-3),
            "prompt_tokens": window.prompt,
            "output_tokens": window.output,
            "trace": None,
        }
    )
    cur = None
    if current:
        cur = CurrentConfig(
            pipelines=[
                PipelineSpec(stages=[StageSpec(device=d, start=s, end=e) for d, s, e in p])
                for p in current
            ]
        )
    return spec.model_copy(update={"workload": workload, "current": cur})


def outlook(
    spec: Spec, problem: PlanningProblem, pipelines: Sequence[Stages], window: WorkloadWindow
) -> Outlook:
    """Returns the predicted goodput, capacity and devices of `pipelines` under the window.

    Each pipeline is judged at the batch it holds: A = admitted(...) requests of the window's
    mean lengths (every slot, or what its KV holds; planner/serving_costs.py). It counts when,
    at the SLOs' percentiles of the window,

        TPOT = decode_step_s(A, min(c_q, KV / A)) <= tpot_slo      c_q = prompt_q + output_q / 2
        TTFT = the traversal of prompt_q with A running  <= ttft_slo

    (every sequence of a step waits for the whole step, whose KV read the pool bounds: A
    sequences hold at most KV tokens). A pipeline whose KV holds no request counts nothing."""
    capacity = 0.0
    slo = spec.slo
    for stages in pipelines:
        costs = PipelineCosts.of(spec, list(stages), problem.batch, pipelines)
        active = costs.admitted(window.prompt.mean, window.output.mean)
        if active < 1:
            continue
        if slo.tpot_ms is not None:
            q = slo.tpot_percentile
            context = window.prompt.quantile(q) + window.output.quantile(q) / 2
            context = min(context, costs.kv_capacity_tokens / active)
            if costs.decode_step_s(active, context) * 1000 > slo.tpot_ms * (1 + 1e-9):
                continue  # it would serve, but miss the TPOT SLO
        if slo.ttft_ms is not None:
            prompt = math.ceil(window.prompt.quantile(slo.ttft_percentile))
            if costs.prefill_s(prompt, active)[1] * 1000 > slo.ttft_ms * (1 + 1e-9):
                continue  # nor the TTFT SLO
        capacity += costs.capacity_rps(window.prompt.mean, window.output.mean)
    devices = sum(len(p) for p in pipelines)
    return Outlook(
        goodput_rps=goodput_rps(window.expected_rate_per_s, capacity, spec, window.backlog),
        devices=devices,
        capacity_rps=capacity,
    )


def carries(o: Outlook, window: WorkloadWindow) -> bool:
    """Returns whether the configuration carries the window: its rate within UTILISATION of the
    capacity where the SLOs hold, and its busiest minute within the capacity,

        rate <= U * capacity   and   peak rate <= capacity

    Only such a configuration may take the place of one with more devices; when every
    configuration's predicted goodput collapses (an overload), the device cost alone would
    otherwise favour the smallest, and one sized to the mean rate alone misses the bursts."""
    if o.capacity_rps is None:
        return False
    return (
        window.demand_rate_per_s <= UTILISATION * o.capacity_rps
        and window.busiest_rate_per_s <= o.capacity_rps
    )


def may_shed(o: Outlook, current: Outlook, window: WorkloadWindow, policy: ControllerPolicy) -> bool:
    """Returns whether `o` may replace `current`: always with as many devices or more; with
    fewer only when it `carries` the window and the window spans at least the policy's
    `scale_down_window_s` (capacity is added on the first evidence, given back on a full
    window's, as a Kubernetes autoscaler stabilises its scale-down)."""
    if o.devices >= current.devices:
        return True
    return carries(o, window) and window.seconds >= policy.scale_down_window_s - 1e-9


def goodput_rps(rate_per_s: float, capacity_rps: float, spec: Spec, backlog: int = 0) -> float:
    """Returns requests/s meeting the SLOs at `rate_per_s` on `capacity_rps` with `backlog`
    requests waiting (module doc)."""
    if capacity_rps <= 0:
        return 0.0
    ttft_s = (spec.slo.ttft_ms or 10_000.0) / 1000
    late = max(0.0, backlog - ttft_s * capacity_rps)  # waiting beyond what the SLO lets wait
    rho = rate_per_s / capacity_rps
    if rho < 1:
        drain_s = late / (capacity_rps - rate_per_s)
        drain_share = OVERLOAD_HORIZON_S / (OVERLOAD_HORIZON_S + drain_s)
        if rho <= UTILISATION:
            return rate_per_s * drain_share
        saturated = 1 - (1 - SATURATED_SHARE) * (rho - UTILISATION) / (1 - UTILISATION)
        return rate_per_s * saturated * drain_share
    if rate_per_s == capacity_rps:
        return SATURATED_SHARE * capacity_rps * (late == 0)
    ok_s = max(0.0, ttft_s * capacity_rps - backlog) / (rate_per_s - capacity_rps)
    return SATURATED_SHARE * capacity_rps * min(1.0, ok_s / OVERLOAD_HORIZON_S)


def candidates(spec: Spec, current: Sequence[Stages] | None, time_limit_s: float) -> list[Stages]:
    """Returns the planner's configurations for the spec: the most throughput, and the fewest
    devices that carry the demand times each of DEMAND_HEADROOM (the planner's throughput
    leaves out prefill and queueing), each with the migration term when `current` is set,
    planned at each of operating_batches; and with `current` set, the most throughput without
    the migration term too (the term keeps plans close to what serves; the change's cost is
    priced by the diff planner anyway)."""
    runs = [("max_throughput", 1.0)] + [("min_devices", h) for h in DEMAND_HEADROOM]
    found = _plans(spec, runs, time_limit_s)
    if spec.current is not None:  # the migration term favours staying close; look afar too
        fresh = spec.model_copy(update={"current": None})
        found += [c for c in _plans(fresh, runs[:1], time_limit_s) if c not in found]
    pool = full_speed_pool(spec, current)
    if pool is not None:  # the planner priced every worker busy; plan where that is exact too
        found += [c for c in _plans(pool, runs, time_limit_s) if c not in found]
    return found


def full_speed_pool(spec: Spec, current: Sequence[Stages] | None) -> Spec | None:
    """Returns the spec cut to the CPU workers each shared host runs at full speed, R = cores /
    threads_per_worker of them (those serving now first), where a host lists more; else None.

    The planner prices a shared host's workers all busy (planner/topology.py), so on a host of
    2 cores listing 4 workers it sees each at half speed and plans 4 where 2 serve as much: on
    this pool the price is exact."""
    kinds = spec_device_kinds(spec)
    named = spec.device_names()
    serving = {d for p in current or [] for d, _, _ in p}
    dropped: list[str] = []
    for node, host in node_hosts(spec.nodes or []).items():
        workers = [n for n, k, nd in named if nd == node and kinds[k].vendor == "cpu"]
        workers.sort(key=lambda n: n not in serving)  # stable: spec order otherwise
        dropped += workers[runnable_workers(host):]
    if not dropped:
        return None
    groups = [DeviceGroup(kind=k, count=1, node=nd, names=[n]) for n, k, nd in named if n not in dropped]
    return spec.model_copy(update={"devices": groups, "current": None})


def throughput_plans(spec: Spec, time_limit_s: float) -> list[list[Stages]]:
    """Returns the planner's most-throughput configuration at each of operating_batches."""
    return _plans(spec, [("max_throughput", 1.0)], time_limit_s)  # type: ignore[return-value]


def _plans(spec: Spec, runs: list[tuple[str, float]], time_limit_s: float) -> list[Stages]:
    """Returns the distinct configurations the planner finds for each (objective, demand
    headroom) of `runs` at each of operating_batches, in that order."""
    out: list[list[Stages]] = []
    rate = spec.workload.request_rate_per_s
    for batch in operating_batches(build_problem(spec)):
        for objective, headroom in runs:
            workload = spec.workload.model_copy(
                update={"request_rate_per_s": rate * headroom, "batch": batch}
            )
            s = spec.model_copy(update={"objective": objective, "workload": workload})
            result = plan(build_problem(s), time_limit_s=time_limit_s)
            found = [[(st.device, st.start, st.end) for st in p.stages] for p in result.pipelines]
            if found and found not in out:
                out.append(found)
    return out  # type: ignore[return-value]


def best_of(spec: Spec, window: WorkloadWindow, configs: Sequence[list[Stages]]) -> list[Stages]:
    """Returns the configuration with the most predicted goodput under the window (`outlook`),
    the first among equals; [] for none."""
    wspec = window_spec(spec, window, None)
    problem = build_problem(wspec)
    best: list[Stages] = []
    best_rps = -1.0
    for config in configs:
        rps = outlook(wspec, problem, config, window).goodput_rps
        if rps > best_rps + 1e-9:
            best, best_rps = config, rps
    return best


def spec_device_kinds(spec: Spec) -> dict[str, DeviceKind]:
    """Returns each of the spec's device kinds by name as the planner costs it: the catalog's,
    with a profile's measured fields over it, or the kind a profile alone defines."""
    profiles = spec_profiles(spec)
    return {
        kind_name: device_kind(kind_name, profiles.get(kind_name.lower()))
        for _, kind_name, _ in spec.device_names()
    }


def device_infos(spec: Spec, kinds: dict[str, DeviceKind] | None = None) -> list[DeviceInfo]:
    kinds = kinds if kinds is not None else spec_device_kinds(spec)
    out = []
    for name, kind_name, node in spec.device_names():
        budget = int(kinds[kind_name].memory_bytes * spec.memory_utilization)
        out.append(DeviceInfo(name, kind_name, node, budget, budget))
    return out


def footprint(spec: Spec) -> ModelFootprint:
    arch = get_model_arch(spec.model)
    d = spec.dtype_bytes
    return ModelFootprint(
        n_layers=arch.n_layers,
        layer_weight_bytes=layer_weight_bytes(arch, d),
        embed_bytes=embedding_bytes(arch, d),
        head_bytes=head_bytes(arch, d),
        kv_bytes_per_token_per_layer=kv_bytes_per_token_per_layer(arch, kv_dtype_bytes_for(d)),
        block_size=KV_BLOCK_TOKENS,
    )


def configuration(pipelines: Sequence[Stages]) -> Configuration:
    return Configuration(
        tuple(PipelineConfig(tuple(StageConfig(d, s, e) for d, s, e in p)) for p in pipelines)
    )


def propose(
    spec: Spec,
    window: WorkloadWindow,
    current: list[Stages],
    in_flight: Sequence[tuple[int, int]],  # per request: (current pipeline, cached tokens)
    now_s: float,
    state: ControllerState,
    policy: ControllerPolicy,
    time_limit_s: float = 5.0,
) -> Proposal:
    """Returns the best re-plan for the window, its predicted change cost and the decision."""
    wspec = window_spec(spec, window, current)
    problem = build_problem(wspec)
    cur_outlook = outlook(wspec, problem, current, window)
    best, best_outlook = current, cur_outlook
    for cand in candidates(wspec, current, time_limit_s):
        o = outlook(wspec, problem, cand, window)
        if not may_shed(o, cur_outlook, window, policy):
            continue  # devices go back only to a configuration that carries the load
        if _better(o, best_outlook, policy):
            best, best_outlook = cand, o
    fp = footprint(spec)
    requests = [
        RequestKV(f"r{i}", p, tokens, math.ceil(tokens / KV_BLOCK_TOKENS) + 1)
        for i, (p, tokens) in enumerate(in_flight)
    ]
    kinds = spec_device_kinds(spec)
    may_recompute = policy.may_recompute(cur_outlook, window.expected_rate_per_s)
    rp = plan_reconfiguration(
        configuration(current),
        configuration(best),
        device_infos(spec, kinds),
        fp,
        requests,
        recompute_overflow=may_recompute,
        kinds=kinds,
    )
    # requests still queued hold no KV: only those with positions computed recompute anything
    dropped = [i for i in (int(rid[1:]) for rid in rp.recompute) if in_flight[i][1] > 0]
    touched_pipelines = set(rp.removed) | {
        c for c, t in rp.pipeline_map.items() if t is not None and t in rp.changed_pipelines
    }
    touched = sum(1 for p, _ in in_flight if p in touched_pipelines)
    pred = rp.prediction
    prefetch_s = pred.prefetch_s + pred.precopy_s
    change = ChangeCost(
        stall_s=pred.stall_ms / 1000,
        touched_requests=touched,
        prefetch_s=prefetch_s,
        in_flight_requests=len(in_flight),
        overhead=rp.max_overhead,
        recompute_requests=len(dropped),
        recompute_request_s=recompute_request_s(
            spec, best, [in_flight[i][1] for i in dropped], prefetch_s, len(in_flight)
        ),
    )
    ref = build_pipeline(problem, current[0]) if current else None
    mean_request_s = window.mean_request_s(ref.tpot_s if ref else 0.05, ref.ttft_s if ref else 0.5)
    if best is current:
        decision = decide(now_s, state, cur_outlook, cur_outlook, change, mean_request_s, policy)
    elif not rp.feasible:
        decision = Decision(
            False,
            "memory forbids the change: " + "; ".join(rp.problems[:2]),
            cur_outlook.value(policy),
            best_outlook.value(policy),
            0.0,
            math.inf,
            None,
        )
    else:
        decision = decide(now_s, state, cur_outlook, best_outlook, change, mean_request_s, policy)
    return Proposal(
        target=best,
        current_outlook=cur_outlook,
        target_outlook=best_outlook,
        change=change,
        decision=decision,
        prefetch_s=prefetch_s,
        stall_s=pred.stall_ms / 1000,
        recompute=dropped,
        recompute_overflow=may_recompute,
    )


def _better(o: Outlook, best: Outlook, policy: ControllerPolicy) -> bool:
    """Returns whether `o` beats `best`: a higher value, at an equal value more capacity;
    where neither meets the SLOs (an overload), a higher overload value (planner/controller.py:
    what it serves, late, less its devices)."""
    if lost(o) and lost(best):
        return o.overload_value(policy) > best.overload_value(policy) + 1e-9
    if abs(o.value(policy) - best.value(policy)) <= 1e-9:
        return (o.capacity_rps or 0.0) > (best.capacity_rps or 0.0) + 1e-9
    return o.value(policy) > best.value(policy)


def recompute_request_s(
    spec: Spec, target: list[Stages], tokens: Sequence[int], prefetch_s: float, in_flight: int
) -> float:
    """Returns the request-seconds that recomputing dropped KV takes from serving: each dropped
    request waits through the prefetch (its KV is gone, and memory has no room for it until
    the switch) and for its re-prefill of `tokens` positions on a target pipeline, and the
    requests decoding there beside it wait for that prefill too:
        sum_r [prefetch_s + prefill_s(tokens_r) * (1 + in_flight / pipelines)]"""
    if not tokens:
        return 0.0
    costs = PipelineCosts.of(spec, target[0], spec.workload.batch, target)
    beside = in_flight / max(len(target), 1)
    return sum(prefetch_s + costs.prefill_s(t, 1)[1] * (1 + beside) for t in tokens if t > 0)
