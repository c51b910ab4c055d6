"""Which link two devices talk over, and how long a transfer takes on it.

Contract:
    link_bandwidth_bytes_per_s(src, dst, same_node) -> float
    link_latency_s(src, dst, same_node)            -> float
    transfer_s(n_bytes, src, dst, same_node)       -> float

Same node: the slower end of the intra-node link (NVLink, or PCIe through the host).
Different nodes: the slower end of the network. A transfer costs
    latency + n_bytes / bandwidth
where latency is the larger of the two ends' fixed per-message costs.
"""

from __future__ import annotations

from cost_models.device_catalog import DeviceKind


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
