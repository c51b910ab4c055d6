"""Which link two devices talk over, and how long a transfer takes on it.

Contract:
    link_bandwidth_bytes_per_s(src, dst, same_node) -> float
    link_latency_s(src, dst, same_node)            -> float
    transfer_s(n_bytes, src, dst, same_node)       -> float
    Link(bandwidth_bytes_per_s, latency_s)         a path a spec describes (planner/topology.py)
    link_transfer_s(n_bytes, link)                 -> float

Same node: the slower end of the intra-node link (NVLink, or PCIe through the host).
Different nodes: the slower end of the network. A transfer costs
    latency + n_bytes / bandwidth
where latency is the larger of the two ends' fixed per-message costs.
"""

from __future__ import annotations

from dataclasses import dataclass

from cost_models.device_catalog import DeviceKind


@dataclass(frozen=True)
class Link:
    """One direction of a path between two devices: bandwidth and fixed cost per message."""

    bandwidth_bytes_per_s: float
    latency_s: float


def link_transfer_s(n_bytes: float, link: Link) -> float:
    """Returns seconds to send n_bytes over `link`: latency + n_bytes / bandwidth."""
    if n_bytes <= 0:
        return 0.0
    return link.latency_s + n_bytes / link.bandwidth_bytes_per_s


def link_bandwidth_bytes_per_s(src: DeviceKind, dst: DeviceKind, same_node: bool) -> float:
    """Returns the one-direction bandwidth between src and dst: min of both ends' links."""
    if same_node:
        return min(src.link_bandwidth_bytes_per_s, dst.link_bandwidth_bytes_per_s)
    return min(src.network_bandwidth_bytes_per_s, dst.network_bandwidth_bytes_per_s)


def link_latency_s(src: DeviceKind, dst: DeviceKind, same_node: bool) -> float:
    """Returns the fixed cost of one message between src and dst: max of both ends' latencies."""
    if same_node:
        return max(src.link_latency_s, dst.link_latency_s)
    return max(src.network_latency_s, dst.network_latency_s)


def transfer_s(n_bytes: float, src: DeviceKind, dst: DeviceKind, same_node: bool) -> float:
    """Returns seconds to send n_bytes from src to dst: latency + n_bytes / bandwidth."""
    if n_bytes <= 0:
        return 0.0
    return link_latency_s(src, dst, same_node) + n_bytes / link_bandwidth_bytes_per_s(
        src, dst, same_node
    )
