"""Random small planning problems with nodes and links, for the topology checks and bench."""

from __future__ import annotations

import random
from dataclasses import replace

from cost_models.transfer import Link
from planner.instances import random_small_problem
from planner.problem import Device, KindCosts, PlanningProblem
from planner.topology import build_topology

DECODE_HOP_BYTES = 64 * 1024  # a micro-batch's hidden states
PREFILL_HOP_BYTES = 8 * 2**20  # a prompt's


def random_topology_problem(
    seed: int, max_devices: int = 7, max_layers: int = 24
) -> PlanningProblem:
    """Returns a random problem on 2-3 nodes: pools (kind, node), NVLink-ish links inside a
    node, network links between nodes from as fast as inside to 100x slower."""
    rng = random.Random(1000 + seed)
    base = random_small_problem(seed, max_devices=max_devices, max_layers=max_layers)
    nodes = [f"n{i}" for i in range(rng.randint(2, 3))]
    devices_by_pool: dict[tuple[int, str], list[str]] = {}
    for d in base.devices:
        devices_by_pool.setdefault((d.kind, rng.choice(nodes)), []).append(d.name)
    pools = sorted(devices_by_pool)
    kinds = tuple(
        KindCosts(**{**base.kinds[k].__dict__, "name": base.kinds[k].name, "node": node})
        for k, node in pools
    )
    devices = tuple(
        Device(name=name, kind=i, node=pools[i][1])
        for i, key in enumerate(pools)
        for name in devices_by_pool[key]
    )
    links: dict[tuple[str, str], Link] = {}
    for a in nodes:
        for b in nodes:
            if a == b:
                links[(a, b)] = Link(rng.uniform(50e9, 300e9), rng.uniform(2e-6, 20e-6))
            elif (b, a) in links:
                links[(a, b)] = links[(b, a)]
            else:
                links[(a, b)] = Link(rng.uniform(0.2e9, 50e9), rng.uniform(10e-6, 2e-3))
    topology = build_topology(links, DECODE_HOP_BYTES, PREFILL_HOP_BYTES)
    used = {d.node for d in devices}
    return replace(
        base,
        model_name=f"random-topology-{seed}",
        kinds=kinds,
        devices=devices,
        topology=topology,
        hop_decode_s=max(topology.decode_s(a, b) for a in used for b in used),
        hop_prefill_s=max(topology.prefill_s(a, b) for a in used for b in used),
        ttft_slo_s=None,
    )


def random_topology_problem_with_current(seed: int, max_devices: int = 6) -> PlanningProblem:
    """Returns random_topology_problem(seed) serving a current pipeline of 1-2 devices, with
    migration priced per pool: a node fetches a layer at its own link when it holds the
    weights, else over the fastest holder's link, or from a 2 GB/s disk when that is faster
    (planner/migration_prices.py); the re-plan interval makes the slowest node's charge for
    a whole model half the current throughput, so where a pipeline lands matters."""
    from planner.build_problem import with_current

    rng = random.Random(3000 + seed)
    problem = random_topology_problem(seed, max_devices=max_devices, max_layers=16)
    picked = rng.sample(problem.devices, min(len(problem.devices), rng.randint(1, 2)))
    L = problem.n_layers
    cut = [0] + sorted(rng.sample(range(1, L), len(picked) - 1)) + [L]
    current = [[(d.name, cut[i], cut[i + 1]) for i, d in enumerate(picked)]]
    topo = problem.topology
    assert topo is not None
    holders = {d.node for d in picked}
    disk_bytes_per_s = 2e9
    node_bw = {
        n: max([disk_bytes_per_s] + [topo.links[(h, n)].bandwidth_bytes_per_s for h in holders])
        for n in topo.nodes
    }
    pool_bw = [node_bw[k.node] for k in problem.kinds]  # type: ignore[index]
    slowest = min(pool_bw)
    probe = with_current(problem, current, 1.0, slowest)
    reference = probe.migration.tok_s_per_byte * slowest  # type: ignore[union-attr]
    interval_s = 2 * problem.model_weight_bytes / slowest
    return with_current(
        problem,
        current,
        replan_interval_s=interval_s,
        move_bandwidth_bytes_per_s=slowest,
        reference_tok_s=reference,
        pool_move_bandwidths_bytes_per_s=pool_bw,
    )
