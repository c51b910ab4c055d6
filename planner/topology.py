"""Which link each hop between two nodes uses, and what a hop costs on it.

A spec with `nodes` describes each host's NIC (`nic_gbps`, `nic_latency_us`), optionally its
GPU-to-GPU link (`intra_gbps`, `intra_latency_us`; default: the catalog link of the kinds it
holds, NVLink or PCIe), and optionally `links` between two nodes or two regions. The link
of a hop from node a to node b is

    a == b:                 bandwidth = intra_gbps(a)   or min over a's kinds of the catalog link
                            latency   = intra_latency(a) or max over a's kinds of the catalog's
    a != b, a link given:   bandwidth = min(link_gbps, nic_gbps(a), nic_gbps(b)), latency = link's
                            (a node-pair entry wins over a region-pair entry)
    a != b, none given:     bandwidth = min(nic_gbps(a), nic_gbps(b)),
                            latency   = max(nic_latency(a), nic_latency(b))

and a hop of n bytes costs  hop_s = latency_s + n_bytes / bandwidth_bytes_per_s.
Spec units are Gbit/s and microseconds (as NICs are sold); inside, bytes/s and seconds.

A node with `cpu_cores` is a host whose CPU workers share its cores and memory bus
(cost_models/host_sharing.py). The solver prices a pool before it knows how many pipelines
the plan makes, so it prices the host's workers as all busy at once,

    B(node) = the node's CPU workers in the spec (pinned-out ones excepted)
    pool costs on that node = host_sharing.contention(B, host, per-worker bandwidth)

which is exact for a plan that uses every worker with one micro-batch each (what the engine
runs when pipelines outnumber runnable workers) and pessimistic in TPOT, never in
throughput, for deeper pipelines (the engine keeps fewer of their stages busy);
`configuration_shares` re-costs a given configuration with the engine's own count.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cost_models.device_catalog import DeviceKind
from cost_models.host_sharing import (
    Host,
    HostShare,
    bandwidth_from_slowdown,
    busy_workers,
    contention,
)
from cost_models.migration import DISK_BANDWIDTH_BYTES_PER_S, fetch_s
from cost_models.profile import Profile
from cost_models.profiled_latency import slowdown_memory_share
from cost_models.transfer import Link, link_transfer_s

BYTES_PER_S_PER_GBPS = 1e9 / 8


@dataclass(frozen=True)
class Topology:
    """Seconds of one hop between every pair of nodes (a == b: inside node a)."""

    nodes: tuple[str, ...]
    links: Mapping[tuple[str, str], Link]
    hop_decode_s: Mapping[tuple[str, str], float]  # one micro-batch's hidden states
    hop_prefill_s: Mapping[tuple[str, str], float]  # one prompt's hidden states

    def decode_s(self, src: str, dst: str) -> float:
        return self.hop_decode_s[(src, dst)]

    def prefill_s(self, src: str, dst: str) -> float:
        return self.hop_prefill_s[(src, dst)]


def node_links(
    nodes: Sequence[object],
    links: Sequence[object],
    kinds_on_node: Mapping[str, Sequence[DeviceKind]],
) -> dict[tuple[str, str], Link]:
    """Returns the link of every ordered node pair (spec `NodeSpec`/`LinkSpec` objects in)."""
    by_name = {n.name: n for n in nodes}  # type: ignore[attr-defined]
    given: dict[frozenset[str], Link] = {}
    region_given: dict[frozenset[str], Link] = {}
    for link in links:
        a, b = link.between  # type: ignore[attr-defined]
        value = Link(link.gbps * BYTES_PER_S_PER_GBPS, link.latency_us * 1e-6)  # type: ignore[attr-defined]
        (given if a in by_name else region_given)[frozenset((a, b))] = value
    out: dict[tuple[str, str], Link] = {}
    for a, na in by_name.items():
        for b, nb in by_name.items():
            if a == b:
                kinds = kinds_on_node.get(a, ())
                bw = (
                    na.intra_gbps * BYTES_PER_S_PER_GBPS
                    if na.intra_gbps is not None
                    else min((k.link_bandwidth_bytes_per_s for k in kinds), default=1.0)
                )
                lat = (
                    na.intra_latency_us * 1e-6
                    if na.intra_latency_us is not None
                    else max((k.link_latency_s for k in kinds), default=0.0)
                )
                out[(a, b)] = Link(bw, lat)
                continue
            nic_bw = min(na.nic_gbps, nb.nic_gbps) * BYTES_PER_S_PER_GBPS
            path = given.get(frozenset((a, b)))
            if path is None and na.region is not None and nb.region is not None:
                path = region_given.get(frozenset((na.region, nb.region)))
            if path is None:
                out[(a, b)] = Link(nic_bw, max(na.nic_latency_us, nb.nic_latency_us) * 1e-6)
            else:
                out[(a, b)] = Link(min(nic_bw, path.bandwidth_bytes_per_s), path.latency_s)
    return out


def build_topology(
    links: Mapping[tuple[str, str], Link], decode_bytes: float, prefill_bytes: float
) -> Topology:
    """Returns the hop times of every node pair for hidden states of the given sizes."""
    nodes = tuple(sorted({a for a, _ in links}))
    return Topology(
        nodes=nodes,
        links=dict(links),
        hop_decode_s={k: link_transfer_s(decode_bytes, v) for k, v in links.items()},
        hop_prefill_s={k: link_transfer_s(prefill_bytes, v) for k, v in links.items()},
    )


def node_hosts(
    nodes: Sequence[object], measured_bus: Mapping[str, float] | None = None
) -> dict[str, Host]:
    """Returns the Host of every spec node that gives `cpu_cores` (spec `NodeSpec`s in). A
    node's memory bandwidth is its `memory_gb_s`, else what a profile measured on its workers
    (`measured_bus`, bytes/s: profiled_buses), else unlimited but by the cores."""
    out = {}
    for n in nodes:
        cores = getattr(n, "cpu_cores", None)
        if cores is None:
            continue
        gb_s = getattr(n, "memory_gb_s", None)
        bus = (measured_bus or {}).get(n.name) if gb_s is None else gb_s * 1e9  # type: ignore[attr-defined]
        out[n.name] = Host(  # type: ignore[attr-defined]
            cores=cores,
            threads_per_worker=getattr(n, "threads_per_worker", 1),
            memory_bandwidth_bytes_per_s=bus,
        )
    return out


def profiled_buses(
    cpu_kinds_on_node: Mapping[str, Sequence[DeviceKind]], profile_of_kind: Mapping[str, Profile]
) -> dict[str, float]:
    """Returns, per node, the memory bandwidth its CPU workers' profiles measured (bytes/s):
    a profile's host `shared_workers` W and `shared_slowdown` s, timed on a step whose memory
    share is mu (profiled_latency.slowdown_memory_share), give W * bandwidth / (1 + (s - 1) / mu)
    (host_sharing.bandwidth_from_slowdown); the lowest over the node's kinds. `profile_of_kind`
    maps a lower-case kind name to its profile."""
    out: dict[str, float] = {}
    for node, kinds in cpu_kinds_on_node.items():
        for k in kinds:
            profile = profile_of_kind.get(k.name.lower())
            host = {} if profile is None else profile.host
            if profile is None or "shared_slowdown" not in host or "shared_workers" not in host:
                continue
            bus = bandwidth_from_slowdown(
                int(host["shared_workers"]),
                float(host["shared_slowdown"]),
                k.memory_bandwidth_bytes_per_s,
                slowdown_memory_share(profile, k),
            )
            out[node] = min(bus, out.get(node, math.inf))
    return out


def planning_shares(
    hosts: Mapping[str, Host], cpu_workers_on_node: Mapping[str, Sequence[DeviceKind]]
) -> dict[str, HostShare]:
    """Returns the contention the solver prices each CPU host at: all its workers busy."""
    out = {}
    for node, host in hosts.items():
        workers = cpu_workers_on_node.get(node, ())
        if not workers:
            continue
        bandwidth = max(k.memory_bandwidth_bytes_per_s for k in workers)
        out[node] = contention(len(workers), host, bandwidth)
    return out


def configuration_shares(
    hosts: Mapping[str, Host],
    pipelines_nodes: Sequence[Sequence[str]],
    worker_bandwidth_bytes_per_s: Mapping[str, float],
) -> dict[str, HostShare]:
    """Returns each CPU host's contention under a given configuration (the node of every stage
    of every pipeline), with the engine's busy count: B = sum_p min(S_p, M_p) over the
    pipelines on the host (host_sharing.busy_workers; a pipeline's stages on other hosts do
    not count here)."""
    out = {}
    for node, host in hosts.items():
        here = [sum(1 for n in p if n == node) for p in pipelines_nodes]
        here = [s for s in here if s > 0]
        if not here:
            continue
        out[node] = contention(busy_workers(here, host), host, worker_bandwidth_bytes_per_s[node])
    return out


def migration_bandwidth_bytes_per_s(
    links: Mapping[tuple[str, str], Link],
    holder_nodes: Sequence[str],
    kinds_on_node: Mapping[str, Sequence[DeviceKind]],
    n_bytes: float,
    disk_bandwidth_bytes_per_s: float = DISK_BANDWIDTH_BYTES_PER_S,
) -> float:
    """Returns the bandwidth the migration term prices a moved byte at when one price serves
    every node: a new pipeline may land on any node, so the slowest node's fetch sets it,

        bandwidth = min over nodes n of node_fetch_bandwidths_bytes_per_s(...)[n]
    """
    per_node = node_fetch_bandwidths_bytes_per_s(
        links, holder_nodes, kinds_on_node, n_bytes, disk_bandwidth_bytes_per_s
    )
    return min(per_node.values(), default=math.inf)


def node_fetch_bandwidths_bytes_per_s(
    links: Mapping[tuple[str, str], Link],
    holder_nodes: Sequence[str],
    kinds_on_node: Mapping[str, Sequence[DeviceKind]],
    n_bytes: float,
    disk_bandwidth_bytes_per_s: float = DISK_BANDWIDTH_BYTES_PER_S,
) -> dict[str, float]:
    """Returns, per node, the bandwidth its devices fetch n_bytes at: each from its fastest
    source (a holder's node over the link between the two, the node's own link when it holds
    them, or the disk: migration.fetch_s), the node's slowest kind setting it (the
    bandwidth(n) of planner/migration_prices.py),

        bandwidth(n) = n_bytes / max over kinds k on n of fetch_s(n_bytes, k, links(h -> n))
    """
    out = {}
    for node, kinds in kinds_on_node.items():
        holder_links = [links[(h, node)] for h in set(holder_nodes) if (h, node) in links]
        worst_s = max(
            (fetch_s(n_bytes, k, holder_links, disk_bandwidth_bytes_per_s) for k in kinds),
            default=0.0,
        )
        out[node] = n_bytes / worst_s if worst_s > 0 else math.inf
    return out
