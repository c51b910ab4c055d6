"""What one pipeline costs per request at any batch and context: the planner's latency model,
cached, for the simulator and the controller's predictions.

    costs = PipelineCosts.of(spec, [(device, start, end), ...], batch)
    costs.decode_step_s(active, mean_context)   one token for every active sequence
    costs.prefill_s(prompt, active)             (pipeline busy, first token after)
    costs.admitted(prompt_mean, output_mean)    requests running at once (slots or KV)
    costs.capacity_rps(prompt_mean, output_mean)

Every time comes from the planner's cost models as build_problem uses them: per kind
cost_models/profiled_latency.operating_costs (a measured profile where the spec gives one, the
roofline with the spec's calibration elsewhere; CPU workers that share a host's `cpu_cores`
slowed by host_sharing.contention(B), where this pipeline's own stages count busy only while
they have work, min(S, active) in decode, and the host's other workers count busy: the other
pipelines' when the configuration is given, else every other worker there, as
planner/topology.planning_shares prices a pool), and latency.hop_s. With S stages, S micro-batches of
ceil(active / S) sequences are in flight (planner/problem.py), so a decode step for all of
them takes max(S * bottleneck, sum of stages). A prefill keeps the pipeline busy for its
slowest stage; its first token comes after every stage. Contexts are costed in buckets of
CONTEXT_BUCKET tokens (rounded up); prompts linearly between multiples of PROMPT_BUCKET.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

from cost_models import latency
from cost_models.device_catalog import DeviceKind, get_device_kind
from cost_models.host_sharing import Host, HostShare, contention
from cost_models.memory import (
    embedding_bytes,
    head_bytes,
    kv_bytes_per_token_per_layer,
    kv_dtype_bytes_for,
    layer_weight_bytes,
)
from cost_models.model_catalog import ModelArch, get_model_arch
from cost_models.profile import Profile, device_kind_of
from cost_models.profiled_latency import operating_costs
from planner.spec import Spec, spec_profiles
from planner.topology import node_hosts, planning_shares, profiled_buses

CONTEXT_BUCKET = 64
PROMPT_BUCKET = 32


@dataclass(frozen=True)
class StageCost:
    kind: DeviceKind
    node: str
    start: int
    end: int
    eff: latency.Efficiency
    next_kind: DeviceKind | None  # None: the last stage
    next_same_node: bool
    dtype: str = "bf16"
    share: HostShare | None = None  # a CPU host's contention (None: not shared)
    profile_path: str | None = None  # keys the cache; the profile itself is not hashable
    profile: Profile | None = field(default=None, compare=False, hash=False)


def _kind(name: str, profile: Profile | None) -> DeviceKind:
    """Returns the catalog kind with a profile's measured fields over it, or the kind a
    profile alone defines (as build_problem resolves kinds)."""
    try:
        catalog = get_device_kind(name)
    except KeyError:
        catalog = None
    return catalog if profile is None else device_kind_of(profile, catalog)


@dataclass(frozen=True)
class PipelineCosts:
    arch: ModelArch
    dtype_bytes: float
    stages: tuple[StageCost, ...]
    batch: int  # sequences per micro-batch
    kv_capacity_tokens: int  # KV positions the tightest stage holds
    # (micro, context bucket, busy stages) -> step s, (prompt bucket, busy stages) -> (busy s,
    # first token s): the
    # simulator asks millions of times, and hashing the stages each time was most of its run
    _steps: dict[tuple[int, int, int], float] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )
    _prefills: dict[tuple[int, int], tuple[float, float]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )
    # CPU hosts this pipeline's stages share: node -> (host, worker bandwidth, the other CPU
    # workers there that count busy: `of`)
    hosts: dict[str, tuple[Host, float, int]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )
    _by_busy: dict[int, tuple[StageCost, ...]] = field(
        default_factory=dict, compare=False, hash=False, repr=False
    )

    @classmethod
    def of(
        cls,
        spec: Spec,
        stages: list[tuple[str, int, int]],
        batch: int,
        configuration: Sequence[Sequence[tuple[str, int, int]]] | None = None,
    ) -> PipelineCosts:
        """Returns the costs of `stages` at `batch` sequences per micro-batch. On a shared CPU
        host the other workers count busy: the other stages there of the `configuration` it
        belongs to when given (spare workers idle), else every other CPU worker the spec puts
        there, as the planner prices a pool before it knows the configuration."""
        arch = get_model_arch(spec.model)
        profiles = spec_profiles(spec)
        kinds = {k: _kind(k, profiles.get(k.lower())) for _, k, _ in spec.device_names()}
        by_name = {n: (kinds[k], node) for n, k, node in spec.device_names()}
        calibrated = None
        if spec.calibration is not None:
            calibrated = latency.load_efficiencies(Path(spec.base_dir) / spec.calibration)
        shares: dict[str, HostShare] = {}
        hosts: dict[str, tuple[Host, float, int]] = {}
        if spec.nodes is not None:
            cpu_on_node: dict[str, list[DeviceKind]] = {}
            for kind, node in by_name.values():
                if kind.vendor == "cpu":
                    cpu_on_node.setdefault(node, []).append(kind)
            buses = profiled_buses(cpu_on_node, profiles)
            node_host = node_hosts(spec.nodes, buses)
            shares = planning_shares(node_host, cpu_on_node)
            for node, kinds_here in cpu_on_node.items():
                mine = sum(1 for n, _, _ in stages if by_name[n][1] == node)
                if node in node_host and mine:
                    bandwidth = max(k.memory_bandwidth_bytes_per_s for k in kinds_here)
                    if configuration is None:
                        there = len(kinds_here)
                    else:
                        there = sum(1 for p in configuration for n, _, _ in p if by_name[n][1] == node)
                    hosts[node] = (node_host[node], bandwidth, there - mine)
        out, kv_tokens = [], math.inf
        kv_tok = kv_bytes_per_token_per_layer(arch, kv_dtype_bytes_for(spec.dtype_bytes))
        for i, (name, start, end) in enumerate(stages):
            kind, node = by_name[name]
            nxt = by_name[stages[i + 1][0]] if i + 1 < len(stages) else None
            profile = profiles.get(kind.name.lower())
            out.append(
                StageCost(
                    kind=kind,
                    node=node,
                    start=start,
                    end=end,
                    eff=latency.efficiency_for(kind, calibrated),
                    next_kind=None if nxt is None else nxt[0],
                    next_same_node=nxt is not None and nxt[1] == node,
                    dtype=spec.dtype,
                    share=shares.get(node) if kind.vendor == "cpu" else None,
                    profile_path=None if profile is None else profile.path,
                    profile=profile,
                )
            )
            weights = (end - start) * layer_weight_bytes(arch, spec.dtype_bytes)
            weights += embedding_bytes(arch, spec.dtype_bytes) if start == 0 else 0
            weights += head_bytes(arch, spec.dtype_bytes) if end == arch.n_layers else 0
            room = kind.memory_bytes * spec.memory_utilization - weights
            kv_tokens = min(kv_tokens, max(0.0, room) / (kv_tok * (end - start)))
        return cls(arch, spec.dtype_bytes, tuple(out), batch, int(kv_tokens), hosts=hosts)

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def slots(self) -> int:
        """Sequences in flight at most: S micro-batches of `batch`."""
        return self.n_stages * self.batch

    def stages_busy(self, busy: int) -> tuple[StageCost, ...]:
        """Returns the stages costed with `busy` of this pipeline's stages working at once: on
        a shared CPU host, contention(min(busy, its stages there) + the host's other busy
        workers, as `of` counts them)."""
        busy = min(busy, self.n_stages)
        out = self._by_busy.get(busy)
        if out is None:
            out = self.stages
            if self.hosts:
                out = tuple(
                    s if s.share is None or s.node not in self.hosts else replace(
                        s, share=self._share(s.node, busy)
                    )
                    for s in self.stages
                )
            self._by_busy[busy] = out
        return out

    def _share(self, node: str, busy: int) -> HostShare:
        host, bandwidth, others = self.hosts[node]
        here = sum(1 for s in self.stages if s.node == node)
        return contention(min(busy, here) + others, host, bandwidth)

    def decode_step_s(self, active: int, mean_context: float) -> float:
        """Returns seconds for every one of `active` sequences to get its next token (with
        S micro-batches in flight, min(S, active) stages work at once)."""
        micro = max(1, math.ceil(active / self.n_stages))
        bucket = max(1, math.ceil(mean_context / CONTEXT_BUCKET))
        busy = min(self.n_stages, max(1, active))
        step = self._steps.get((micro, bucket, busy))
        if step is None:
            times = [
                _stage_decode_s(self.arch, s, self.dtype_bytes, micro, bucket)
                for s in self.stages_busy(busy)
            ]
            step = self._steps[(micro, bucket, busy)] = max(self.n_stages * max(times), sum(times))
        return step

    def prefill_s(self, prompt: int, active: int = 0) -> tuple[float, float]:
        """Returns (seconds the pipeline is busy, seconds until the first token) of one prompt
        while `active` sequences decode: linear between the PROMPT_BUCKET multiples around it
        (from the first bucket up)."""
        lo = max(1, prompt // PROMPT_BUCKET)
        w = min(1.0, max(0.0, prompt / PROMPT_BUCKET - lo))
        busy = min(self.n_stages, 1 + active)
        a = self._prefill_bucket(lo, busy)
        if w == 0.0:
            return a
        b = self._prefill_bucket(lo + 1, busy)
        return ((1 - w) * a[0] + w * b[0], (1 - w) * a[1] + w * b[1])

    def _prefill_bucket(self, bucket: int, busy: int) -> tuple[float, float]:
        out = self._prefills.get((bucket, busy))
        if out is None:
            times = [
                _stage_prefill_s(self.arch, s, self.dtype_bytes, bucket)
                for s in self.stages_busy(busy)
            ]
            out = self._prefills[(bucket, busy)] = (max(times), sum(times))
        return out

    def admitted(self, prompt_mean: float, output_mean: float) -> int:
        """Returns how many requests of the mean lengths run at once: every slot, or as many as
        the tightest stage's KV holds when each reserves its prompt + output (the simulator's
        admission rule, and the engine's: a request is admitted only with KV room for it),

            admitted = min(slots, floor(kv_capacity_tokens / (prompt_mean + output_mean)))

        0 when not even one fits."""
        need = max(1.0, prompt_mean + output_mean)
        return min(self.slots, int(self.kv_capacity_tokens // need))

    def capacity_rps(self, prompt_mean: float, output_mean: float) -> float:
        """Returns requests/s with every admissible request running (A = admitted(...)):
        1 / (prefill + output * step(A) / A), where a prompt costs the running sequences its
        whole traversal of the stages; 0 when the KV holds no request."""
        active = self.admitted(prompt_mean, output_mean)
        if active < 1:
            return 0.0
        step = self.decode_step_s(active, prompt_mean + output_mean / 2)
        _, traversal = self.prefill_s(math.ceil(prompt_mean), active)
        return 1.0 / (traversal + output_mean * step / active)


def _operating(s: StageCost, arch: ModelArch, dtype: float, batch: int, context: int, prompt: int):
    return operating_costs(
        arch,
        s.kind,
        s.dtype,
        dtype,
        s.eff,
        batch,
        context,
        prompt,
        profile=s.profile,
        share=s.share,
    )


@lru_cache(maxsize=1 << 16)
def _stage_decode_s(arch: ModelArch, s: StageCost, dtype: float, micro: int, bucket: int) -> float:
    """Returns one decode step of the stage: layers, embedding at the start, head at the end."""
    c = _operating(s, arch, dtype, micro, bucket * CONTEXT_BUCKET, 1)
    t = (s.end - s.start) * c.layer_decode_s
    t += c.embed_decode_s if s.start == 0 else 0.0
    t += c.head_decode_s if s.end == arch.n_layers else 0.0
    if s.next_kind is not None:
        t += latency.hop_s(arch, micro, s.kind, s.next_kind, s.next_same_node, dtype)
    return t


@lru_cache(maxsize=1 << 16)
def _stage_prefill_s(arch: ModelArch, s: StageCost, dtype: float, bucket: int) -> float:
    """Returns the stage's prefill of one prompt of bucket * PROMPT_BUCKET tokens."""
    n = bucket * PROMPT_BUCKET
    c = _operating(s, arch, dtype, 1, n, n)
    t = (s.end - s.start) * c.layer_prefill_s
    t += c.embed_prefill_s if s.start == 0 else 0.0
    t += c.head_prefill_s if s.end == arch.n_layers else 0.0
    if s.next_kind is not None:
        t += latency.hop_s(arch, n, s.kind, s.next_kind, s.next_same_node, dtype)
    return t
