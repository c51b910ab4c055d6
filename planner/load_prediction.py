"""A planned configuration at the load its spec describes: TPOT, TTFT and throughput with the
batches the engine really forms at the spec's request rate (cost_models/load_point.py), next
to the planner's figures at full micro-batches.

    predict_at_load(spec, problem, result) -> LoadPrediction

Stage curves come from the cost model the planner used (the spec's profiles, calibration, or
the roofline); a CPU host with `cpu_cores` shares its cores as cost_models/host_sharing.py
says, with the busy workers the load really keeps (the planner prices the host at every
worker busy): each curve is costed at the factors (f_c, f_m) the load point gives it, a
measured time split by its memory part (operating_costs), the hop to the next stage (no
weights move) at f_c. A configuration over several shared hosts is costed without sharing
(not modelled yet).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cost_models import latency
from cost_models.device_catalog import DeviceKind, get_device_kind
from cost_models.host_sharing import HostShare, contention, engine_inflight
from cost_models.load_point import ALONE, LoadPoint, PipelineTimes, load_point
from cost_models.model_catalog import get_model_arch
from cost_models.profile import Profile, device_kind_of
from cost_models.profiled_latency import operating_costs
from planner.problem import PlanningProblem
from planner.solution import PlanResult
from planner.spec import Spec, spec_profiles
from planner.topology import node_hosts, profiled_buses


@dataclass(frozen=True)
class LoadPrediction:
    at_rate: LoadPoint  # Poisson arrivals at the spec's request rate
    at_full_batches: LoadPoint  # as many clients at once as the plan's micro-batches hold
    full_batch_clients: int


def predict_at_load(spec: Spec, problem: PlanningProblem, result: PlanResult) -> LoadPrediction:
    """Returns the plan's load points at the spec's rate and at full micro-batches."""
    prompt, output = spec.lengths()
    pipes = result.pipelines
    if not pipes:
        raise ValueError("the plan has no pipelines to predict")
    kinds = {s.kind: _kind_costs(spec, s.kind) for p in pipes for s in p.stages}
    cpu_on_node: dict[str, list[DeviceKind]] = {}
    for p in pipes:
        for s in p.stages:
            if kinds[s.kind][0].vendor == "cpu":
                cpu_on_node.setdefault(s.node, []).append(kinds[s.kind][0])
    profiles = {k.name.lower(): prof for k, _, prof in kinds.values() if prof is not None}
    hosts = node_hosts(spec.nodes or [], profiled_buses(cpu_on_node, profiles))
    nodes = {s.node for p in pipes for s in p.stages}
    host = hosts.get(next(iter(nodes))) if len(nodes) == 1 else None
    times = [
        PipelineTimes(
            decode_s=tuple(_decode_curve(spec, problem, p, i, kinds) for i in range(len(p.stages))),
            prefill_s=tuple(_prefill_curve(spec, problem, p, i, kinds) for i in range(len(p.stages))),
            inflight=len(p.stages) if host is None else engine_inflight(len(p.stages), len(pipes), host),
        )
        for p in pipes
    ]
    share_of: Callable[[float], HostShare] | None = None
    if host is not None:
        bandwidth = max(k.memory_bandwidth_bytes_per_s for k, _, _ in kinds.values())
        share_of = lambda busy: contention(busy, host, bandwidth)  # noqa: E731
    rate = spec.workload.request_rate_per_s
    at_rate = load_point(times, prompt.mean, output.mean, rate_per_s=rate, share_of=share_of)
    clients = sum(t.inflight for t in times) * problem.batch
    at_full = load_point(times, prompt.mean, output.mean, concurrent=clients, share_of=share_of)
    return LoadPrediction(at_rate, at_full, clients)


_KindCosts = tuple[DeviceKind, latency.Efficiency, Profile | None]


def _kind_costs(spec: Spec, kind_name: str) -> _KindCosts:
    """Returns the kind (with its profile's fields), its efficiency and its profile."""
    profile = spec_profiles(spec).get(kind_name.lower())
    try:
        catalog = get_device_kind(kind_name)
    except KeyError:
        catalog = None
    kind = catalog if profile is None else device_kind_of(profile, catalog)
    calibrated = None
    if spec.calibration is not None:
        calibrated = latency.load_efficiencies(Path(spec.base_dir) / spec.calibration)
    return kind, latency.efficiency_for(kind, calibrated), profile


def _stage_parts(spec, problem, pipeline, i, kinds):
    arch = get_model_arch(spec.model)
    s = pipeline.stages[i]
    kind, eff, profile = kinds[s.kind]
    nxt = None if i + 1 == len(pipeline.stages) else pipeline.stages[i + 1].node

    def costs(batch: int, context: float, prompt: float, share: HostShare):
        return operating_costs(
            arch, kind, spec.dtype, spec.dtype_bytes, eff, max(1, batch), math.ceil(context),
            math.ceil(prompt), profile=profile, share=None if share == ALONE else share,
        )

    return arch, s, nxt, costs


def _decode_curve(spec, problem, pipeline, i, kinds) -> Callable[[float, float, HostShare], float]:
    arch, s, nxt, costs = _stage_parts(spec, problem, pipeline, i, kinds)
    hop = 0.0 if nxt is None else problem.hop_decode_between_s(s.node, nxt)

    def decode(batch: float, context: float, share: HostShare) -> float:
        k = costs(int(batch), context, 1, share)
        t = (s.end - s.start) * k.layer_decode_s + (k.embed_decode_s if s.start == 0 else 0.0)
        return t + (k.head_decode_s if s.end == arch.n_layers else hop * share.compute)

    return decode


def _prefill_curve(spec, problem, pipeline, i, kinds) -> Callable[[float, HostShare], float]:
    arch, s, nxt, costs = _stage_parts(spec, problem, pipeline, i, kinds)
    hop = 0.0 if nxt is None else problem.hop_prefill_between_s(s.node, nxt)

    def prefill(prompt: float, share: HostShare) -> float:
        k = costs(1, prompt, prompt, share)
        t = (s.end - s.start) * k.layer_prefill_s + (k.embed_prefill_s if s.start == 0 else 0.0)
        return t + (k.head_prefill_s if s.end == arch.n_layers else hop * share.compute)

    return prefill
