"""The planning problem as plain numbers: what every formulation and the reference DP read.

A stage of `j` layers on a device of kind `k` in a pipeline of `S` stages takes, per decode
step of one micro-batch,

    stage_s = j * layer_decode_s[k] + (hop_decode_s if not last) + (embed_decode_s[k] if first)
              + (head_decode_s[k] if last)

and holds `j * (layer_weight_bytes + S * batch * kv_bytes_per_seq_per_layer)` bytes plus the
embedding (first stage) and the head (last stage). `S` micro-batches of `batch` sequences are
in flight, so a pipeline with bottleneck `T` yields `batch / T` tokens/s, and each sequence
gets a token every `S * T` seconds (its TPOT). TTFT is the prompt's prefill through every
stage, with hops.

Without a topology, hops are costed at the slowest pair of kinds present, cross-node unless
all devices share a node, so a plan's real hops are never slower than planned. With one
(`topology`, from a spec's `nodes`), `kinds` are *pools* - one per (device kind, node) - and
a stage's hop is the one to the next stage's node:

    hop_decode_s(stage i) = topology.decode_s(node(i), node(i + 1))

(the link inside the node, or the network between the two; planner/topology.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cost_models.profiled_latency import CostSource
from planner.topology import Topology


@dataclass(frozen=True)
class KindCosts:
    """Per-kind times (seconds) and usable memory (bytes) at the workload's operating point."""

    name: str
    layer_decode_s: float
    layer_prefill_s: float
    embed_decode_s: float
    embed_prefill_s: float
    head_decode_s: float
    head_prefill_s: float
    memory_bytes: float  # usable: datasheet memory times the utilisation fraction
    node: str | None = None  # with a topology: the node of this pool of devices
    # where these numbers came from (a profile's file, calibration, the roofline); for reports
    cost_source: CostSource | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Device:
    name: str
    kind: int  # index into PlanningProblem.kinds
    node: str


@dataclass(frozen=True)
class CurrentStage:
    device: str
    start: int
    end: int


@dataclass(frozen=True)
class MigrationCosts:
    """How moving bytes is weighed against throughput when a current configuration exists."""

    current: tuple[tuple[CurrentStage, ...], ...]  # pipelines of the configuration serving now
    tok_s_per_byte: float  # objective penalty (tokens/s) per byte a plan moves
    kv_bytes_per_pipeline: tuple[float, ...]  # in-flight KV a dismantled pipeline must move
    keep_required: frozenset[int] = frozenset()  # current pipelines pinned to stay
    # with a topology: mu_p per pool, from its node's fetch bandwidth (planner/migration_prices.py);
    # empty: every byte at tok_s_per_byte. tok_s_per_byte is then the largest (slowest node)
    pool_tok_s_per_byte: tuple[float, ...] = ()


@dataclass(frozen=True)
class PlanningProblem:
    model_name: str
    n_layers: int
    batch: int  # sequences per micro-batch
    kinds: tuple[KindCosts, ...]
    devices: tuple[Device, ...]  # usable devices (pinned-out ones already removed)
    layer_weight_bytes: float
    embed_weight_bytes: float
    head_weight_bytes: float  # what the last stage holds for the head (a copy when tied)
    tied_embeddings: bool
    kv_bytes_per_seq_per_layer: float
    hop_decode_s: float
    hop_prefill_s: float
    tpot_slo_s: float | None = None
    ttft_slo_s: float | None = None
    objective: str = "max_throughput"  # or "min_devices"
    demand_tok_s: float = 0.0  # output tokens/s the workload asks for
    max_stages: int = 16
    migration: MigrationCosts | None = None
    dtype_bytes: float = 2.0
    notes: dict[str, str] = field(default_factory=dict)
    topology: Topology | None = None  # None: every hop costs hop_decode_s / hop_prefill_s

    def hop_decode_between_s(self, src_node: str, dst_node: str) -> float:
        """Returns one decode hop's seconds from a stage on src_node to one on dst_node."""
        if self.topology is None:
            return self.hop_decode_s
        return self.topology.decode_s(src_node, dst_node)

    def hop_prefill_between_s(self, src_node: str, dst_node: str) -> float:
        """Returns one prefill hop's seconds from a stage on src_node to one on dst_node."""
        if self.topology is None:
            return self.hop_prefill_s
        return self.topology.prefill_s(src_node, dst_node)

    def out_hops_decode_s(self, kind: int) -> list[float]:
        """Returns every decode hop a non-last stage of this kind (pool) can pay."""
        if self.topology is None:
            return [self.hop_decode_s]
        src = self.kinds[kind].node
        used = {k.node for k in self.kinds}
        return sorted({self.topology.decode_s(src, dst) for dst in used})  # type: ignore[arg-type]

    @property
    def kind_counts(self) -> tuple[int, ...]:
        counts = [0] * len(self.kinds)
        for d in self.devices:
            counts[d.kind] += 1
        return tuple(counts)

    @property
    def model_weight_bytes(self) -> float:
        head = 0.0 if self.tied_embeddings else self.head_weight_bytes
        return self.n_layers * self.layer_weight_bytes + self.embed_weight_bytes + head

    def stage_memory_bytes(self, n_layers: int, n_stages: int, first: bool, last: bool) -> float:
        """Returns the bytes a stage of `n_layers` needs in a pipeline of `n_stages` stages."""
        per_layer = (
            self.layer_weight_bytes + n_stages * self.batch * self.kv_bytes_per_seq_per_layer
        )
        extra = self.embed_weight_bytes if first else 0.0
        if last and not (first and self.tied_embeddings):
            extra += self.head_weight_bytes
        return n_layers * per_layer + extra

    def stage_weight_bytes(self, n_layers: int, first: bool, last: bool) -> float:
        """Returns the weight bytes a stage loads: its layers, the embedding (first) and the
        head (last; a copy of the embedding when tied and not also first)."""
        extra = self.embed_weight_bytes if first else 0.0
        if last and not (first and self.tied_embeddings):
            extra += self.head_weight_bytes
        return n_layers * self.layer_weight_bytes + extra

    def stage_decode_s(
        self, kind: int, n_layers: int, first: bool, last: bool, hop_s: float | None = None
    ) -> float:
        """Returns one decode step of a stage; `hop_s` is its outgoing hop (default: the
        problem's uniform hop)."""
        k = self.kinds[kind]
        t = n_layers * k.layer_decode_s
        if first:
            t += k.embed_decode_s
        if last:
            t += k.head_decode_s
        else:
            t += self.hop_decode_s if hop_s is None else hop_s
        return t

    def stage_prefill_s(
        self, kind: int, n_layers: int, first: bool, last: bool, hop_s: float | None = None
    ) -> float:
        """Returns a stage's prefill of the TTFT prompt; `hop_s` as in stage_decode_s."""
        k = self.kinds[kind]
        t = n_layers * k.layer_prefill_s
        if first:
            t += k.embed_prefill_s
        if last:
            t += k.head_prefill_s
        else:
            t += self.hop_prefill_s if hop_s is None else hop_s
        return t


@dataclass(frozen=True)
class PoolProblem:
    """Several models sharing one pool of devices (a spec's `models`).

    problems[m] is model m's planning problem: its own layers, costs at its own workload,
    SLOs and demand, over the same pools (kinds) and devices in the same order, so a device
    index means the same device in every one. planner/master.py states the objective.
    """

    problems: tuple[PlanningProblem, ...]
    labels: tuple[str, ...]  # one name per model, unique (the spec's `name`, or the model's)
    weights: tuple[float, ...]  # w_m: value of one of model m's tokens/s
    objective: str = "max_throughput"  # weighted SLO goodput; or "min_devices"

    @property
    def devices(self) -> tuple[Device, ...]:
        return self.problems[0].devices

    @property
    def kind_counts(self) -> tuple[int, ...]:
        return self.problems[0].kind_counts
