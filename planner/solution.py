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
    model: str = ""  # with several models on one pool: which one's layers it holds

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
    # what the objective charges the new pipelines' weight loads (tokens/s): sum over their
    # stages of bytes x the stage's pool price (planner/migration_prices.py), mu x model bytes
    # per new pipeline with one price
    weight_charge_tok_s: float = 0.0


@dataclass(frozen=True)
class ModelPlan:
    """One model's share of a pool: its pipelines and what they are predicted to give."""

    label: str
    model_name: str
    n_layers: int
    weight: float
    demand_tok_s: float
    pipelines: tuple[Pipeline, ...]

    @property
    def throughput_tok_s(self) -> float:
        return sum(p.throughput_tok_s for p in self.pipelines)

    @property
    def goodput_tok_s(self) -> float:
        """Returns min(throughput, demand): tokens/s asked for and served within the SLOs."""
        return min(self.throughput_tok_s, self.demand_tok_s)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.label,
            "model": self.model_name,
            "weight": self.weight,
            "demand_tok_s": self.demand_tok_s,
            "predicted": {
                "throughput_tok_s": self.throughput_tok_s,
                "goodput_tok_s": self.goodput_tok_s,
                "ttft_ms": max((p.ttft_s for p in self.pipelines), default=0.0) * 1000,
                "tpot_ms": max((p.tpot_s for p in self.pipelines), default=0.0) * 1000,
                "devices_used": sum(len(p.stages) for p in self.pipelines),
            },
            "pipelines": [_pipeline_json(p) for p in self.pipelines],
        }


def _pipeline_json(p: Pipeline) -> dict[str, Any]:
    out: dict[str, Any] = {
        "batch": p.batch,
        "kept": p.kept,
        "throughput_tok_s": p.throughput_tok_s,
        "ttft_ms": p.ttft_s * 1000,
        "tpot_ms": p.tpot_s * 1000,
        "stages": [
            {**asdict(s), "decode_ms": s.decode_s * 1000, "prefill_ms": s.prefill_s * 1000}
            for s in p.stages
        ],
    }
    if p.model:
        out["model"] = p.model
    return out


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
    models: list[ModelPlan] = field(default_factory=list)  # several models: one entry each

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
            "pipelines": [_pipeline_json(p) for p in self.pipelines],
            **({"models": [m.to_json() for m in self.models]} if self.models else {}),
            "migration": None
            if self.migration is None
            else {
                **{k: v for k, v in asdict(self.migration).items() if k not in ("loads", "frees")},
                "loads": [list(x) for x in self.migration.loads],
                "frees": [list(x) for x in self.migration.frees],
            },
            "details": self.details,
        }
