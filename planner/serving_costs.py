"""What one pipeline costs per request at any batch and context: the planner's latency model,
cached, for the simulator and the controller's predictions.

    costs = PipelineCosts.of(spec, [(device, start, end), ...], batch)
    costs.decode_step_s(active, mean_context)   one token for every active sequence
    costs.prefill_s(prompt)                     (pipeline busy, first token after)
    costs.capacity_rps(prompt_mean, output_mean)

Every time comes from cost_models/latency.py (stage_decode_s, stage_prefill_s, hop_s) with the
spec's calibration, as build_problem uses them. With S stages, S micro-batches of
ceil(active / S) sequences are in flight (planner/problem.py), so a decode step for all of
them takes max(S * bottleneck, sum of stages). A prefill keeps the pipeline busy for its
slowest stage; its first token comes after every stage. Contexts are costed in buckets of
CONTEXT_BUCKET tokens, prompts in buckets of PROMPT_BUCKET (rounded up).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from cost_models import latency
from cost_models.device_catalog import DeviceKind, get_device_kind
from cost_models.memory import (
    embedding_bytes,
    head_bytes,
    kv_bytes_per_token_per_layer,
    kv_dtype_bytes_for,
    layer_weight_bytes,
)
from cost_models.model_catalog import ModelArch, get_model_arch
from planner.spec import Spec

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


@dataclass(frozen=True)
class PipelineCosts:
    arch: ModelArch
    dtype_bytes: float
    stages: tuple[StageCost, ...]
    batch: int  # sequences per micro-batch
    kv_capacity_tokens: int  # KV positions the tightest stage holds

    @classmethod
    def of(cls, spec: Spec, stages: list[tuple[str, int, int]], batch: int) -> PipelineCosts:
        arch = get_model_arch(spec.model)
        by_name = {n: (k, node) for n, k, node in spec.device_names()}
        calibrated = None
        if spec.calibration is not None:
            calibrated = latency.load_efficiencies(Path(spec.base_dir) / spec.calibration)
        out, kv_tokens = [], math.inf
        kv_tok = kv_bytes_per_token_per_layer(arch, kv_dtype_bytes_for(spec.dtype_bytes))
        for i, (name, start, end) in enumerate(stages):
            kind_name, node = by_name[name]
            kind = get_device_kind(kind_name)
            nxt = by_name[stages[i + 1][0]] if i + 1 < len(stages) else None
            out.append(
                StageCost(
                    kind=kind,
                    node=node,
                    start=start,
                    end=end,
                    eff=latency.efficiency_for(kind, calibrated),
                    next_kind=None if nxt is None else get_device_kind(nxt[0]),
                    next_same_node=nxt is not None and nxt[1] == node,
                )
            )
            weights = (end - start) * layer_weight_bytes(arch, spec.dtype_bytes)
            weights += embedding_bytes(arch, spec.dtype_bytes) if start == 0 else 0
            weights += head_bytes(arch, spec.dtype_bytes) if end == arch.n_layers else 0
            room = kind.memory_bytes * spec.memory_utilization - weights
            kv_tokens = min(kv_tokens, max(0.0, room) / (kv_tok * (end - start)))
        return cls(arch, spec.dtype_bytes, tuple(out), batch, int(kv_tokens))

    @property
    def n_stages(self) -> int:
        return len(self.stages)

    @property
    def slots(self) -> int:
        """Sequences in flight at most: S micro-batches of `batch`."""
        return self.n_stages * self.batch

    def decode_step_s(self, active: int, mean_context: float) -> float:
        """Returns seconds for every one of `active` sequences to get its next token."""
        micro = max(1, math.ceil(active / self.n_stages))
        bucket = max(1, math.ceil(mean_context / CONTEXT_BUCKET))
        times = [
            _stage_decode_s(self.arch, s, self.dtype_bytes, micro, bucket) for s in self.stages
        ]
        return max(self.n_stages * max(times), sum(times))

    def prefill_s(self, prompt: int) -> tuple[float, float]:
        """Returns (seconds the pipeline is busy, seconds until the first token) of one prompt."""
        bucket = max(1, math.ceil(prompt / PROMPT_BUCKET))
        times = [_stage_prefill_s(self.arch, s, self.dtype_bytes, bucket) for s in self.stages]
        return max(times), sum(times)

    def capacity_rps(self, prompt_mean: float, output_mean: float) -> float:
        """Returns requests/s at full batches: 1 / (prefill busy + output * step / slots)."""
        step = self.decode_step_s(self.slots, prompt_mean + output_mean / 2)
        busy, _ = self.prefill_s(math.ceil(prompt_mean))
        return 1.0 / (busy + output_mean * step / self.slots)


@lru_cache(maxsize=1 << 16)
def _stage_decode_s(arch: ModelArch, s: StageCost, dtype: float, micro: int, bucket: int) -> float:
    t = latency.stage_decode_s(
        arch, s.kind, s.start, s.end, micro, bucket * CONTEXT_BUCKET, dtype, s.eff
    )
    if s.next_kind is not None:
        t += latency.hop_s(arch, micro, s.kind, s.next_kind, s.next_same_node, dtype)
    return t


@lru_cache(maxsize=1 << 16)
def _stage_prefill_s(arch: ModelArch, s: StageCost, dtype: float, bucket: int) -> float:
    n = bucket * PROMPT_BUCKET
    t = latency.stage_prefill_s(arch, s.kind, s.start, s.end, n, dtype, s.eff)
    if s.next_kind is not None:
        t += latency.hop_s(arch, n, s.kind, s.next_kind, s.next_same_node, dtype)
    return t
