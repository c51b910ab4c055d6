"""What moving a stage's layers costs: weight bytes from a peer or disk, and in-flight KV.

Contract (the planner and the diff planner import these names):
    layer_move_bytes(arch, n_layers=1, dtype_bytes=2)                          -> int
    layer_move_s(arch, src, dst, same_node=True, n_layers=1, dtype_bytes=2,
                 disk_bandwidth_bytes_per_s=DISK_BANDWIDTH_BYTES_PER_S)        -> float
        src None means "load from the checkpoint on disk into dst"
    kv_move_bytes(arch, n_tokens, n_layers, dtype_bytes=2)                     -> int
    kv_move_s(arch, n_tokens, n_layers, src, dst, same_node, dtype_bytes=2)    -> float
    relayout_s(n_bytes, dev)                                                   -> float
        host-side passes over weights a live move adds (out of the holder's layout, into
        the receiver's); add it to a weight move's time when it happens on a busy device
    link_move_s(n_bytes, link)                                                 -> float
    fetch_s(n_bytes, dst, holder_links, disk_bandwidth_bytes_per_s=...)        -> float
        with a topology (planner/topology.py): the link a node pair really uses

Peer to peer: latency + bytes / link bandwidth (cost_models/transfer.py); with a topology,
              the link between the two nodes (`Link`, from the spec's nodes and links).
Fetch:        min(min over holders h of link_move_s(bytes, link(h -> dst)), disk_load_s):
              the fastest source of bytes some peers hold, the disk always being one.
From disk:    DISK_LATENCY_S + bytes / min(disk bandwidth, dst's host link) - the read
              goes disk -> host memory -> device, and the slower of the two sets the pace.
KV of a request for layers [a, b): n_tokens * (b - a) * kv_bytes_per_token_per_layer.
Embedding and head weights move with the first and last layer; price them with
cost_models.memory.embedding_bytes / head_bytes and `bytes_move_s`.
"""

from __future__ import annotations

from collections.abc import Iterable

from cost_models.device_catalog import DeviceKind
from cost_models.memory import kv_bytes_per_token_per_layer, kv_dtype_bytes_for, layer_weight_bytes
from cost_models.model_catalog import ModelArch
from cost_models.transfer import Link, link_transfer_s, transfer_s

# A datacenter NVMe SSD reads ~2-7 GB/s sequentially; 2 GB/s is a safe floor (and what a
# busy or networked volume gives). Override with what the node measures.
DISK_BANDWIDTH_BYTES_PER_S = 2e9
# Opening a safetensors shard and seeking to a tensor.
DISK_LATENCY_S = 1e-3


def layer_move_bytes(arch: ModelArch, n_layers: int = 1, dtype_bytes: float = 2) -> int:
    """Returns the weight bytes of n_layers decoder blocks: n_layers * layer_weight_bytes."""
    return n_layers * layer_weight_bytes(arch, dtype_bytes)


def disk_load_s(
    n_bytes: float,
    dst: DeviceKind,
    disk_bandwidth_bytes_per_s: float = DISK_BANDWIDTH_BYTES_PER_S,
) -> float:
    """Returns seconds to read n_bytes from disk into dst: latency + bytes / min(disk, host link)."""
    if n_bytes <= 0:
        return 0.0
    bandwidth = min(disk_bandwidth_bytes_per_s, dst.host_link_bandwidth_bytes_per_s)
    return DISK_LATENCY_S + n_bytes / bandwidth


# A weight moved between live workers is read out of the holder's layout (a dense copy),
# then joined and reordered into the receiver's (oneDNN blocked on CPU): about three reads and
# three writes of its bytes. On one CPU core that is ~7 ms per 14 MiB layer, more than the
# loopback transfer itself (~5 ms).
RELAYOUT_PASSES = 6


def relayout_s(n_bytes: float, dev: DeviceKind) -> float:
    """Returns seconds of host-side copying a live weight move adds: passes * bytes / memory bw."""
    return RELAYOUT_PASSES * n_bytes / dev.memory_bandwidth_bytes_per_s


def bytes_move_s(
    n_bytes: float,
    src: DeviceKind | None,
    dst: DeviceKind,
    same_node: bool = True,
    disk_bandwidth_bytes_per_s: float = DISK_BANDWIDTH_BYTES_PER_S,
) -> float:
    """Returns seconds to bring n_bytes to dst from peer src, or from disk when src is None."""
    if src is None:
        return disk_load_s(n_bytes, dst, disk_bandwidth_bytes_per_s)
    return transfer_s(n_bytes, src, dst, same_node)


def layer_move_s(
    arch: ModelArch,
    src: DeviceKind | None,
    dst: DeviceKind,
    same_node: bool = True,
    n_layers: int = 1,
    dtype_bytes: float = 2,
    disk_bandwidth_bytes_per_s: float = DISK_BANDWIDTH_BYTES_PER_S,
) -> float:
    """Returns seconds to move n_layers blocks' weights to dst from peer src (None: from disk)."""
    n_bytes = layer_move_bytes(arch, n_layers, dtype_bytes)
    return bytes_move_s(n_bytes, src, dst, same_node, disk_bandwidth_bytes_per_s)


def kv_move_bytes(arch: ModelArch, n_tokens: int, n_layers: int, dtype_bytes: float = 2) -> int:
    """Returns KV bytes of n_tokens cached positions over n_layers layers.

    n_tokens * n_layers * 2 * n_kv_heads * head_dim * kv element size; `dtype_bytes` is the
    model's weight dtype, the KV element size follows it (4 for fp32, else 2).
    """
    kv_token = kv_bytes_per_token_per_layer(arch, kv_dtype_bytes_for(dtype_bytes))
    return n_tokens * n_layers * kv_token


def kv_move_s(
    arch: ModelArch,
    n_tokens: int,
    n_layers: int,
    src: DeviceKind,
    dst: DeviceKind,
    same_node: bool,
    dtype_bytes: float = 2,
) -> float:
    """Returns seconds to copy n_tokens of KV for n_layers from src to dst: latency + bytes / bw."""
    return transfer_s(kv_move_bytes(arch, n_tokens, n_layers, dtype_bytes), src, dst, same_node)


def link_move_s(n_bytes: float, link: Link) -> float:
    """Returns seconds to move n_bytes between two nodes over the link they use:
    latency + bytes / bandwidth."""
    return link_transfer_s(n_bytes, link)


def fetch_s(
    n_bytes: float,
    dst: DeviceKind,
    holder_links: Iterable[Link],
    disk_bandwidth_bytes_per_s: float = DISK_BANDWIDTH_BYTES_PER_S,
) -> float:
    """Returns seconds to bring n_bytes to dst from its fastest source: a peer over each
    holder's link to dst's node, or dst's disk."""
    options = [link_move_s(n_bytes, link) for link in holder_links]
    options.append(disk_load_s(n_bytes, dst, disk_bandwidth_bytes_per_s))
    return min(options)
