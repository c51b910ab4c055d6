"""Spec + cost models -> PlanningProblem: every number the solvers need, computed once."""

from __future__ import annotations

import math
from pathlib import Path

from cost_models import latency
from cost_models.device_catalog import DeviceKind, get_device_kind
from cost_models.layer_work import hidden_bytes
from cost_models.memory import (
    embedding_bytes,
    head_bytes,
    kv_bytes_per_token_per_layer,
    kv_dtype_bytes_for,
    layer_weight_bytes,
)
from cost_models.model_catalog import get_model_arch
from cost_models.profile import Profile, device_kind_of
from cost_models.profiled_latency import operating_costs
from planner.problem import (
    CurrentStage,
    Device,
    KindCosts,
    MigrationCosts,
    PlanningProblem,
    PoolProblem,
)
from planner.spec import Spec, SpecError, spec_profiles
from planner.topology import (
    build_topology,
    migration_bandwidth_bytes_per_s,
    node_fetch_bandwidths_bytes_per_s,
    node_hosts,
    node_links,
    planning_shares,
    profiled_buses,
)


def build_pool_problem(spec: Spec) -> PoolProblem:
    """Returns several models' problems over one pool (a spec with `models`; raises
    SpecError on bad references). A one-model spec gives a pool of one."""
    if spec.models is None:
        return PoolProblem((build_problem(spec),), (spec.model or "",), (1.0,), spec.objective)
    problems = []
    for label, single in zip(spec.model_labels(), spec.single_model_specs(), strict=True):
        try:
            problems.append(build_problem(single))
        except SpecError as exc:
            raise SpecError([f"models.{label}: {line}" for line in exc.lines]) from None
    return PoolProblem(
        problems=tuple(problems),
        labels=tuple(spec.model_labels()),
        weights=tuple(e.weight for e in spec.models),
        objective=spec.objective,
    )


def build_problem(spec: Spec) -> PlanningProblem:
    """Returns the planning problem of a validated one-model spec (raises SpecError on bad
    references, and for a spec with several `models`: see build_pool_problem)."""
    if spec.models is not None or spec.model is None or spec.workload is None:
        raise SpecError(
            [
                f"the spec lists {len(spec.models or [])} models under `models`; this plans "
                "one model's deployment: give `model` and `workload`, or plan the pool with "
                "`pipeshift plan -f SPEC`"
            ]
        )
    arch = get_model_arch(spec.model)
    dtype_bytes = spec.dtype_bytes
    prompt, output = spec.lengths()
    ttft_prompt = math.ceil(prompt.quantile(spec.slo.ttft_percentile))
    # decode is costed at the context of the TPOT percentile's request when an SLO is set
    if spec.slo.tpot_ms is not None:
        q = spec.slo.tpot_percentile
        decode_context = math.ceil(prompt.quantile(q) + output.quantile(q) / 2)
    else:
        decode_context = math.ceil(prompt.mean + output.mean / 2)
    kv_context = math.ceil(prompt.mean + output.mean)
    batch = spec.workload.batch

    excluded = set(spec.pins.exclude_devices)
    all_names = {n for n, _, _ in spec.device_names()}
    unknown = sorted(excluded - all_names)
    if unknown:
        raise SpecError(
            [
                f"pins.exclude_devices: unknown devices {', '.join(unknown)}; "
                "use names the devices section gives"
            ]
        )
    # with a topology the solver's "kinds" are pools: one per (device kind, node)
    topology_given = spec.nodes is not None
    pool_keys: list[tuple[str, str | None]] = []
    devices: list[Device] = []
    for name, kind_name, node in spec.device_names():
        if name in excluded:
            continue
        key = (kind_name, node if topology_given else None)
        if key not in pool_keys:
            pool_keys.append(key)
        devices.append(Device(name=name, kind=pool_keys.index(key), node=node))
    if not devices:
        raise SpecError(["pins.exclude_devices: every device is excluded; keep at least one"])
    profiles = spec_profiles(spec)
    dev_kinds = [device_kind(n, profiles.get(n.lower())) for n, _ in pool_keys]
    calibrated = None
    if spec.calibration is not None:
        path = Path(spec.base_dir) / spec.calibration
        try:
            calibrated = latency.load_efficiencies(path)
        except (OSError, KeyError, ValueError) as exc:
            raise SpecError(
                [
                    f"calibration: cannot read {path}: {exc}; run `pipeshift calibrate` "
                    "or drop the field"
                ]
            ) from None

    # CPU workers of a node with `cpu_cores` share its cores and memory bus (planner/topology.py)
    shares = {}
    if spec.nodes is not None:
        cpu_on_node: dict[str, list[DeviceKind]] = {}
        for d in devices:
            if dev_kinds[d.kind].vendor == "cpu":
                cpu_on_node.setdefault(d.node, []).append(dev_kinds[d.kind])
        hosts = node_hosts(spec.nodes, profiled_buses(cpu_on_node, profiles))
        shares = planning_shares(hosts, cpu_on_node)

    kinds = []
    for k, (_, node) in zip(dev_kinds, pool_keys, strict=True):
        origin = "calibration" if calibrated and k.name.lower() in calibrated else "roofline"
        try:
            costs = operating_costs(
                arch,
                k,
                spec.dtype,
                dtype_bytes,
                latency.efficiency_for(k, calibrated),
                batch,
                decode_context,
                ttft_prompt,
                profile=profiles.get(k.name.lower()),
                eff_origin=origin,
                share=shares.get(node) if k.vendor == "cpu" else None,  # type: ignore[arg-type]
            )
        except ValueError as exc:
            raise SpecError([f"profiles: {exc}"]) from None
        kinds.append(
            KindCosts(
                name=k.name,
                layer_decode_s=costs.layer_decode_s,
                layer_prefill_s=costs.layer_prefill_s,
                embed_decode_s=costs.embed_decode_s,
                embed_prefill_s=costs.embed_prefill_s,
                head_decode_s=costs.head_decode_s,
                # only the last position goes through the head at the end of prefill
                head_prefill_s=costs.head_prefill_s,
                memory_bytes=k.memory_bytes * spec.memory_utilization,
                node=node,
                cost_source=costs.source,
            )
        )
    one_node = len({d.node for d in devices}) == 1
    hop_decode_s = max(
        latency.hop_s(arch, batch, a, b, one_node, dtype_bytes)
        for a in dev_kinds
        for b in dev_kinds
    )
    hop_prefill_s = max(
        latency.hop_s(arch, ttft_prompt, a, b, one_node, dtype_bytes)
        for a in dev_kinds
        for b in dev_kinds
    )
    topology = None
    pool_move_bandwidths: list[float] | None = None
    move_bandwidth_bytes_per_s = min(k.network_bandwidth_bytes_per_s for k in dev_kinds)
    if spec.nodes is not None:
        kinds_on_node: dict[str, list[DeviceKind]] = {}
        for d in devices:
            kinds_on_node.setdefault(d.node, []).append(dev_kinds[d.kind])
        links = node_links(spec.nodes, spec.links, kinds_on_node)
        topology = build_topology(
            links,
            decode_bytes=hidden_bytes(arch, batch, dtype_bytes),
            prefill_bytes=hidden_bytes(arch, ttft_prompt, dtype_bytes),
        )
        used = {d.node for d in devices}
        pairs = [(a, b) for a in used for b in used]
        # the scalars stay the worst hop in use (what a topology-blind reader would assume)
        hop_decode_s = max(topology.decode_s(a, b) for a, b in pairs)
        hop_prefill_s = max(topology.prefill_s(a, b) for a, b in pairs)
        # a moved layer comes over the link between the node that holds it now and the one
        # that will, or from disk, whichever is faster (planner/topology.py)
        if spec.current is not None and spec.current.pipelines:
            node_of = {n: node for n, _, node in spec.device_names()}
            holders = [
                node_of[s.device]
                for p in spec.current.pipelines
                for s in p.stages
                if s.device in node_of
            ]
            move_bandwidth_bytes_per_s = migration_bandwidth_bytes_per_s(
                links, holders, kinds_on_node, layer_weight_bytes(arch, dtype_bytes)
            )
            # and a pool's bytes cost what its own node's fetch costs (planner/migration_prices.py)
            node_bw = node_fetch_bandwidths_bytes_per_s(
                links, holders, kinds_on_node, layer_weight_bytes(arch, dtype_bytes)
            )
            pool_move_bandwidths = [node_bw[node] for _, node in pool_keys]  # type: ignore[index]
    kv_token_layer = kv_bytes_per_token_per_layer(arch, kv_dtype_bytes_for(dtype_bytes))

    problem = PlanningProblem(
        model_name=arch.name,
        n_layers=arch.n_layers,
        batch=batch,
        kinds=tuple(kinds),
        devices=tuple(devices),
        layer_weight_bytes=layer_weight_bytes(arch, dtype_bytes),
        embed_weight_bytes=embedding_bytes(arch, dtype_bytes),
        # a tied head on another stage than the embedding holds its own copy
        head_weight_bytes=head_bytes(arch, dtype_bytes, has_embedding=False),
        tied_embeddings=arch.tie_embeddings,
        kv_bytes_per_seq_per_layer=kv_token_layer * kv_context,
        hop_decode_s=hop_decode_s,
        hop_prefill_s=hop_prefill_s,
        tpot_slo_s=None if spec.slo.tpot_ms is None else spec.slo.tpot_ms / 1000,
        ttft_slo_s=None if spec.slo.ttft_ms is None else spec.slo.ttft_ms / 1000,
        objective=spec.objective,
        demand_tok_s=spec.workload.request_rate_per_s * output.mean,
        max_stages=min(spec.max_stages, arch.n_layers, len(devices)),
        dtype_bytes=dtype_bytes,
        notes={
            "decode_context_tokens": str(decode_context),
            "ttft_prompt_tokens": str(ttft_prompt),
            "kv_context_tokens": str(kv_context),
        },
        topology=topology,
    )
    if spec.current is not None and spec.current.pipelines:
        problem = with_current(
            problem,
            [[(s.device, s.start, s.end) for s in p.stages] for p in spec.current.pipelines],
            replan_interval_s=spec.replan_interval_s,
            move_bandwidth_bytes_per_s=move_bandwidth_bytes_per_s,
            keep_required=spec.pins.keep_current,
            pool_move_bandwidths_bytes_per_s=pool_move_bandwidths,
        )
    return problem


def device_kind(name: str, profile: Profile | None) -> DeviceKind:
    """Returns the catalog kind, with a profile's measured fields over it; or the kind a
    profile alone defines."""
    try:
        catalog = get_device_kind(name)
    except KeyError:
        catalog = None
    return catalog if profile is None else device_kind_of(profile, catalog)


def with_current(
    problem: PlanningProblem,
    pipelines: list[list[tuple[str, int, int]]],
    replan_interval_s: float,
    move_bandwidth_bytes_per_s: float,
    keep_required: list[int] | None = None,
    reference_tok_s: float | None = None,
    pool_move_bandwidths_bytes_per_s: list[float] | None = None,
) -> PlanningProblem:
    """Returns the problem with a current configuration and the migration term's weight.

    Moving X bytes at bandwidth B stalls roughly X / B seconds of the affected capacity; spread
    over a re-plan interval R that costs `reference_tok_s * X / (B * R)` tokens/s on average,
    so each byte costs `mu = reference_tok_s / (B * R)` in the objective. With
    `pool_move_bandwidths_bytes_per_s` (a topology: B_p per pool, its node's fetch) a byte a
    stage on pool p loads costs `mu_p = reference_tok_s / (B_p * R)` instead
    (planner/migration_prices.py); mu stays the one of `move_bandwidth_bytes_per_s` (the
    slowest node's), for the KV term.
    """
    from dataclasses import replace

    from planner.evaluate import config_throughput_tok_s

    current = tuple(tuple(CurrentStage(d, s, e) for d, s, e in p) for p in pipelines)
    for i, p in enumerate(current):
        if (
            p[0].start != 0
            or p[-1].end != problem.n_layers
            or any(a.end != b.start for a, b in zip(p, p[1:], strict=False))
        ):
            raise SpecError(
                [
                    f"current.pipelines.{i}: stages must cover layers 0..{problem.n_layers} "
                    "in order without gaps"
                ]
            )
    if keep_required:
        bad = [i for i in keep_required if not 0 <= i < len(current)]
        if bad:
            raise SpecError(
                [f"pins.keep_current: no current pipeline {bad}; there are {len(current)}"]
            )
    if reference_tok_s is None:
        reference_tok_s = config_throughput_tok_s(problem, current) or 1.0
    kv_per_pipeline = tuple(
        len(p) * problem.batch * problem.kv_bytes_per_seq_per_layer * problem.n_layers
        for p in current
    )
    migration = MigrationCosts(
        current=current,
        tok_s_per_byte=reference_tok_s / (move_bandwidth_bytes_per_s * replan_interval_s),
        kv_bytes_per_pipeline=kv_per_pipeline,
        keep_required=frozenset(keep_required or ()),
        pool_tok_s_per_byte=tuple(
            reference_tok_s / (b * replan_interval_s)
            for b in pool_move_bandwidths_bytes_per_s or ()
        ),
    )
    return replace(problem, migration=migration)
