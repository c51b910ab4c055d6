"""Roofline latency of decoder layers, embedding, head, and stage-to-stage hops, in seconds.

Contract (the planner imports these names):
    Efficiency(compute, memory, overhead_s, kv_memory=None)   fractions of peak; calibration fits them
    default_efficiency(device)                       -> Efficiency
    load_efficiencies(path)                          -> dict[str, Efficiency] (keyed by lower-cased kind)
    layer_prefill_s(arch, device, n_tokens, dtype_bytes=2, eff=None, batch=1, context_before=0)
    layer_decode_s(arch, device, batch, context, dtype_bytes=2, eff=None)
    layer_decode_memory_s / layer_prefill_memory_s / head_memory_s(...)   their memory term alone
    embed_s(arch, device, n_tokens, dtype_bytes=2, eff=None)
    head_s(arch, device, n_tokens, dtype_bytes=2, eff=None)     n_tokens = rows of logits
    hop_s(arch, n_tokens, src, dst, same_node, dtype_bytes=2)
    stage_prefill_s / stage_decode_s(arch, device, start, end, ...)   a whole stage

The model, per layer:
    time = max(flops / (peak_flops * eff.compute),
               dense_bytes / (bandwidth * eff.memory) + kv_bytes / (bandwidth * eff.kv))
           + eff.overhead_s
with flops, dense_bytes (weights, hidden states) and kv_bytes (KV read and written) of one
layer from cost_models/layer_work.py. The memory term alone,

    memory_s = dense_bytes / (bandwidth * eff.memory) + kv_bytes / (bandwidth * eff.kv),

is what a shared memory bus slows (cost_models/host_sharing.py splits measured times by it).

`dtype_bytes` is bytes per weight (see cost_models/memory.py); compute runs at the fp32 peak
for 4-byte models and at the bf16 peak otherwise; KV and activations are 4 bytes for fp32
models and 2 for everything else.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cost_models.device_catalog import DeviceKind
from cost_models.layer_work import (
    hidden_bytes,
    layer_decode_dense_bytes,
    layer_decode_flops,
    layer_decode_kv_bytes,
    layer_prefill_dense_bytes,
    layer_prefill_flops,
    layer_prefill_kv_bytes,
)
from cost_models.memory import LOGIT_BYTES, kv_dtype_bytes_for
from cost_models.model_catalog import ModelArch
from cost_models.transfer import transfer_s


@dataclass(frozen=True)
class Efficiency:
    """Fractions of peak compute and memory bandwidth a device reaches, plus fixed cost per layer.

    kv_memory is the bandwidth fraction of KV-cache traffic when it differs from weight
    streaming (a gather-then-attend kernel copies the cache; a paged kernel reads it in
    place); None means the same as `memory`.
    """

    compute: float = 0.6
    memory: float = 0.8
    overhead_s: float = 25e-6
    kv_memory: float | None = None
    # True: compute and memory traffic overlap, a layer takes the slower of the two (GPUs);
    # False: they add up (one CPU core both streams the weights and does the math).
    overlap: bool = True

    def __post_init__(self) -> None:
        if self.compute <= 0 or self.memory <= 0 or self.overhead_s < 0:
            raise ValueError(f"efficiency factors must be positive, got {self}")
        if self.kv_memory is not None and self.kv_memory <= 0:
            raise ValueError(f"kv_memory must be positive, got {self}")

    @property
    def kv(self) -> float:
        """Returns the bandwidth fraction that applies to KV-cache bytes."""
        return self.memory if self.kv_memory is None else self.kv_memory


# Defaults before calibration. GPUs: dense GEMMs reach ~60 % of peak, decode's weight
# streaming ~80 % of bandwidth, ~25 us of kernel launches per layer (not measured here).
# CPU workers: `pipeshift calibrate --repeats 5` on SmolLM2-135M fp32, one thread of the
# project's 2-core dev machine (MAPE 7.2 % over batch 1-16 x context 128-4096 and three
# prefills; docs/results.md): compute and memory time add up on one core, ~0.19 ms of
# dispatch per layer, and KV bytes cost ~3.5x weight bytes (the paged cache is gathered
# before attending). The catalog's CPU peak and bandwidth are guesses, hence factors > 1.
GPU_EFFICIENCY = Efficiency(compute=0.6, memory=0.8, overhead_s=25e-6)
CPU_EFFICIENCY = Efficiency(compute=1.23, memory=1.40, overhead_s=188e-6, kv_memory=0.39, overlap=False)


def default_efficiency(device: DeviceKind) -> Efficiency:
    """Returns the uncalibrated efficiency for a device kind."""
    return CPU_EFFICIENCY if device.vendor == "cpu" else GPU_EFFICIENCY


def load_efficiencies(path: str | Path) -> dict[str, Efficiency]:
    """Returns calibrated factors from a calibration JSON file, keyed by lower-cased kind name."""
    raw = json.loads(Path(path).read_text())
    return {
        name.lower(): Efficiency(
            compute=float(v["compute"]),
            memory=float(v["memory"]),
            overhead_s=float(v["overhead_s"]),
            kv_memory=None if v.get("kv_memory") is None else float(v["kv_memory"]),
            overlap=bool(v.get("overlap", True)),
        )
        for name, v in raw["kinds"].items()
    }


def efficiency_for(
    device: DeviceKind, calibrated: Mapping[str, Efficiency] | None = None
) -> Efficiency:
    """Returns the calibrated efficiency of `device` if there is one, else the default."""
    if calibrated and device.name.lower() in calibrated:
        return calibrated[device.name.lower()]
    return default_efficiency(device)


def roofline_s(
    flops: float,
    n_bytes: float,
    device: DeviceKind,
    dtype_bytes: float,
    eff: Efficiency,
    kv_bytes: float = 0.0,
) -> float:
    """Returns combine(flops / (peak * compute), bytes / (bw * memory) + kv_bytes / (bw * kv)),
    where combine is max when the device overlaps compute and memory traffic, else the sum.

    n_bytes is the dense traffic (weights, hidden states); kv_bytes the KV-cache traffic.
    No per-layer overhead is added here.
    """
    compute_s = flops / (device.peak_flops_per_s(dtype_bytes) * eff.compute)
    mem_s = memory_s(n_bytes, device, eff, kv_bytes)
    return max(compute_s, mem_s) if eff.overlap else compute_s + mem_s


def memory_s(n_bytes: float, device: DeviceKind, eff: Efficiency, kv_bytes: float = 0.0) -> float:
    """Returns the roofline's memory term: n_bytes / (bw * memory) + kv_bytes / (bw * kv)."""
    bandwidth = device.memory_bandwidth_bytes_per_s
    return n_bytes / (bandwidth * eff.memory) + kv_bytes / (bandwidth * eff.kv)


def layer_decode_memory_s(
    arch: ModelArch,
    device: DeviceKind,
    batch: int,
    context: int,
    dtype_bytes: float = 2,
    eff: Efficiency | None = None,
) -> float:
    """Returns the memory term of layer_decode_s: weights, hidden states and KV moved."""
    eff = eff or default_efficiency(device)
    dense = layer_decode_dense_bytes(arch, batch, dtype_bytes)
    return memory_s(dense, device, eff, layer_decode_kv_bytes(arch, batch, context, dtype_bytes))


def layer_prefill_memory_s(
    arch: ModelArch,
    device: DeviceKind,
    n_tokens: int,
    dtype_bytes: float = 2,
    eff: Efficiency | None = None,
    batch: int = 1,
) -> float:
    """Returns the memory term of layer_prefill_s (no context before the prompt)."""
    eff = eff or default_efficiency(device)
    dense = layer_prefill_dense_bytes(arch, n_tokens, dtype_bytes, batch)
    return memory_s(dense, device, eff, layer_prefill_kv_bytes(arch, n_tokens, dtype_bytes, batch))


def head_memory_s(
    arch: ModelArch,
    device: DeviceKind,
    n_tokens: int,
    dtype_bytes: float = 2,
    eff: Efficiency | None = None,
) -> float:
    """Returns the memory term of head_s: the vocab x hidden matrix and the fp32 logits."""
    eff = eff or default_efficiency(device)
    return memory_s(_head_bytes(arch, n_tokens, dtype_bytes), device, eff)


def layer_prefill_s(
    arch: ModelArch,
    device: DeviceKind,
    n_tokens: int,
    dtype_bytes: float = 2,
    eff: Efficiency | None = None,
    batch: int = 1,
    context_before: int = 0,
) -> float:
    """Returns seconds for one layer to prefill `batch` sequences of n_tokens (roofline + overhead)."""
    eff = eff or default_efficiency(device)
    flops = layer_prefill_flops(arch, n_tokens, batch, context_before)
    dense = layer_prefill_dense_bytes(arch, n_tokens, dtype_bytes, batch)
    kv = layer_prefill_kv_bytes(arch, n_tokens, dtype_bytes, batch, context_before)
    return roofline_s(flops, dense, device, dtype_bytes, eff, kv) + eff.overhead_s


def layer_decode_s(
    arch: ModelArch,
    device: DeviceKind,
    batch: int,
    context: int,
    dtype_bytes: float = 2,
    eff: Efficiency | None = None,
) -> float:
    """Returns seconds for one layer's decode step of `batch` sequences with `context` cached tokens."""
    eff = eff or default_efficiency(device)
    flops = layer_decode_flops(arch, batch, context)
    dense = layer_decode_dense_bytes(arch, batch, dtype_bytes)
    kv = layer_decode_kv_bytes(arch, batch, context, dtype_bytes)
    return roofline_s(flops, dense, device, dtype_bytes, eff, kv) + eff.overhead_s


def embed_s(
    arch: ModelArch,
    device: DeviceKind,
    n_tokens: int,
    dtype_bytes: float = 2,
    eff: Efficiency | None = None,
) -> float:
    """Returns seconds to look up n_tokens embedding rows: rows read + hidden written, + overhead."""
    eff = eff or default_efficiency(device)
    n_bytes = n_tokens * arch.hidden_size * (dtype_bytes + kv_dtype_bytes_for(dtype_bytes))
    return roofline_s(0.0, n_bytes, device, dtype_bytes, eff) + eff.overhead_s


def head_s(
    arch: ModelArch,
    device: DeviceKind,
    n_tokens: int,
    dtype_bytes: float = 2,
    eff: Efficiency | None = None,
) -> float:
    """Returns seconds for the final norm and output projection of n_tokens rows of logits.

    n_tokens is the batch in decode and the number of sequences in prefill (only the last
    position of a prompt needs logits). flops = 2 * vocab * hidden * n; bytes = the
    vocab x hidden matrix + fp32 logits; twice the per-layer overhead (norm, matmul, sampling).
    """
    eff = eff or default_efficiency(device)
    flops = 2 * arch.vocab_size * arch.hidden_size * n_tokens
    n_bytes = _head_bytes(arch, n_tokens, dtype_bytes)
    return roofline_s(flops, n_bytes, device, dtype_bytes, eff) + 2 * eff.overhead_s


def _head_bytes(arch: ModelArch, n_tokens: int, dtype_bytes: float) -> float:
    return arch.embedding_params * dtype_bytes + n_tokens * arch.vocab_size * LOGIT_BYTES


def hop_s(
    arch: ModelArch,
    n_tokens: int,
    src: DeviceKind,
    dst: DeviceKind,
    same_node: bool,
    dtype_bytes: float = 2,
) -> float:
    """Returns seconds to pass n_tokens hidden states from src's stage to dst's: latency + bytes / bw."""
    return transfer_s(hidden_bytes(arch, n_tokens, dtype_bytes), src, dst, same_node)


def stage_decode_s(
    arch: ModelArch,
    device: DeviceKind,
    start: int,
    end: int,
    batch: int,
    context: int,
    dtype_bytes: float = 2,
    eff: Efficiency | None = None,
) -> float:
    """Returns seconds of one decode step of stage [start, end), with embedding/head at the ends."""
    t = (end - start) * layer_decode_s(arch, device, batch, context, dtype_bytes, eff)
    if start == 0:
        t += embed_s(arch, device, batch, dtype_bytes, eff)
    if end == arch.n_layers:
        t += head_s(arch, device, batch, dtype_bytes, eff)
    return t


def stage_prefill_s(
    arch: ModelArch,
    device: DeviceKind,
    start: int,
    end: int,
    n_tokens: int,
    dtype_bytes: float = 2,
    eff: Efficiency | None = None,
    batch: int = 1,
) -> float:
    """Returns seconds for stage [start, end) to prefill `batch` prompts of n_tokens each."""
    t = (end - start) * layer_prefill_s(arch, device, n_tokens, dtype_bytes, eff, batch)
    if start == 0:
        t += embed_s(arch, device, batch * n_tokens, dtype_bytes, eff)
    if end == arch.n_layers:
        t += head_s(arch, device, batch, dtype_bytes, eff)
    return t
