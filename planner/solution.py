"""A configuration as plain data: what the engine consumes and what `plan --json` prints."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class Stage:
    device: str
    kind: str
    node: str
    start: int  # first layer
    end: int  # one past the last layer
    memory_bytes: float
    memory_capacity_bytes: float
    decode_s: float  # one decode step of one micro-batch, hop to the next stage included
    prefill_s: float


@dataclass(frozen=True)
class Pipeline:
    stages: tuple[Stage, ...]
    batch: int
    kept: bool = False  # unchanged from the current configuration

    @property
    def bottleneck_s(self) -> float:
        return max(s.decode_s for s in self.stages)

    @property
    def throughput_tok_s(self) -> float:
        return self.batch / self.bottleneck_s

    @property
    def tpot_s(self) -> float:
        # S micro-batches in flight: a sequence's next token waits for S bottleneck slots
        return max(len(self.stages) * self.bottleneck_s, sum(s.decode_s for s in self.stages))

    @property
    def ttft_s(self) -> float:
        return sum(s.prefill_s for s in self.stages)


@dataclass(frozen=True)
class Migration:
    weight_bytes: float  # layers devices must newly load
    weight_bytes_from_peer: float
    weight_bytes_from_disk: float
    kv_bytes: float  # in-flight KV of dismantled pipelines
    kept_pipelines: int
    loads: tuple[tuple[str, int, int], ...] = ()  # (device, start, end) newly loaded ranges
    frees: tuple[tuple[str, int, int], ...] = ()  # (device, start, end) ranges dropped


@dataclass
class PlanResult:
    status: str  # OPTIMAL | FEASIBLE (gap stated) | INFEASIBLE | UNKNOWN
    objective: float | None
    bound: float | None
    gap: float | None
    solve_s: float
    backend: str
    pipelines: list[Pipeline] = field(default_factory=list)
    migration: Migration | None = None
    objective_kind: str = "max_throughput"
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput_tok_s(self) -> float:
        return sum(p.throughput_tok_s for p in self.pipelines)

    @property
    def ttft_s(self) -> float:
        return max((p.ttft_s for p in self.pipelines), default=0.0)

    @property
    def tpot_s(self) -> float:
        return max((p.tpot_s for p in self.pipelines), default=0.0)

    @property
    def devices_used(self) -> int:
        return sum(len(p.stages) for p in self.pipelines)

    def to_json(self) -> dict[str, Any]:
        """Returns the plan as one JSON-ready object (`pipelines[].stages[]` the engine reads)."""
        return {
            "status": self.status,
            "objective": self.objective,
            "objective_kind": self.objective_kind,
            "bound": self.bound,
            "gap": self.gap,
            "solve_s": round(self.solve_s, 4),
            "backend": self.backend,
            "message": self.message,
            "predicted": {
                "ttft_ms": self.ttft_s * 1000,
                "tpot_ms": self.tpot_s * 1000,
                "throughput_tok_s": self.throughput_tok_s,
                "devices_used": self.devices_used,
            },
            "pipelines": [
                {
                    "batch": p.batch,
                    "kept": p.kept,
                    "throughput_tok_s": p.throughput_tok_s,
                    "ttft_ms": p.ttft_s * 1000,
                    "tpot_ms": p.tpot_s * 1000,
                    "stages": [
                        {
                            **asdict(s),
                            "decode_ms": s.decode_s * 1000,
                            "prefill_ms": s.prefill_s * 1000,
                        }
                        for s in p.stages
                    ],
                }
                for p in self.pipelines
            ],
            "migration": None
            if self.migration is None
            else {
                **{k: v for k, v in asdict(self.migration).items() if k not in ("loads", "frees")},
                "loads": [list(x) for x in self.migration.loads],
                "frees": [list(x) for x in self.migration.frees],
            },
            "details": self.details,
        }
