"""The diff planner: from the configuration serving now to a target, what moves where.

    plan = plan_reconfiguration(current, target, devices, footprint, requests, epoch=3)
    print(plan.render())            # Terraform-like: + load, - free, ~ move, = unchanged
    plan.to_json()                  # the same object for the admin API and the store

In order (each step one function below):
1. `place_devices`: target stages that name no device get one by a min-cost assignment
   (planner/assign.py) whose cost is the bytes the device would newly hold, so the fewest
   weight bytes move.
2. `map_pipelines`: each current pipeline goes to at most one target pipeline, the assignment
   that keeps the most layers on the device holding them now. A current pipeline mapped
   nowhere is removed; `route_requests` sends its requests to the least loaded targets.
3. `layer_handoffs`: per request, the layer runs whose owner changes (the executor calls it
   at the switch too).
4. `device_change`: per device, the parts it gains, each from the cheaper of a peer that holds
   it now and the checkpoint on disk (cost_models/migration.py), the parts it frees, and its
   memory. A device keeps its old layers until cleanup (requests can fall back to them), so
   during the change it holds old ∪ new; its KV pool is what its budget leaves, at most its cap:
       pool_blocks = floor(min(cap, budget - weight_bytes) / (block_size * kv_bytes * n_layers))
   with kv_bytes per token per layer and n_layers the layers it holds (old ∪ new during).
5. `capacity_problems`: reserved blocks must fit every pool during and after; each shortfall
   is one line with the numbers and what to do. With `recompute_overflow`, `choose_recompute`
   first drops the KV of the requests that do not fit (as vLLM preempts under KV pressure):
   while a device a request holds blocks on during the change is over its pool, or its target
   pipeline over its capacity after, the request costing least to recompute per block it
   frees goes back to the head of the queue and recomputes its KV once admitted again,
       order: cached_tokens / reserved_blocks ascending, then the larger reservation first.
6. `kv_moves`: each request's KV of the layers whose owner changes.
7. `predict`: bytes, and times. Background copies are paced to take at most `max_overhead`
   of the time, so a copy whose link time is t takes t / max_overhead; devices copy in parallel:
       prefetch_s = max_d sum(load_s) / max_overhead,   precopy_s = max_d kv_in_s / max_overhead
   The switch moves only the last token or two of KV per request:
       stall_s = SWITCH_FIXED_S + transfer_s(2 tokens x moving layers x requests, busiest pair)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from cost_models.device_catalog import DeviceKind, get_device_kind
from cost_models.migration import (
    DISK_BANDWIDTH_BYTES_PER_S,
    bytes_move_s,
    disk_load_s,
    relayout_s,
)
from cost_models.transfer import transfer_s
from planner.assign import min_cost_assignment
from planner.configuration import (
    Configuration,
    ConfigurationError,
    PipelineConfig,
    StageConfig,
)

# What a switch costs before any byte moves: one control round trip to each of the two ends
# of the final-delta copy (arm, then done), plus thread wake-ups and scheduling on a host
# whose cores are busy serving (measured on loopback CPU workers).
SWITCH_FIXED_S = 2e-3
# KV positions the blocking switch copies per moving request: the pre-copy rounds leave at
# most the token decoded during the last round and the one being decoded at the pause.
SWITCH_DELTA_TOKENS = 2
DISK = "disk"  # a Load's source when no peer is cheaper (or none holds the part)
MIB = 2**20
GIB = 2**30

Range = tuple[int, int]


# ---- inputs -------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceInfo:
    name: str  # e.g. "worker-0"
    kind: str  # device catalog kind ("cpu" for a local worker)
    node: str  # devices on one node talk over the intra-node link
    memory_budget_bytes: int  # weights + KV pool must fit in this
    kv_pool_cap_bytes: int  # the KV pool never exceeds this (--kv-cache-mb)


@dataclass(frozen=True)
class Parts:
    """What a device holds of the model: decoder layers, and whether the embedding and head."""

    layers: frozenset[int] = frozenset()
    embed: bool = False
    head: bool = False

    @classmethod
    def of_stage(cls, start: int, end: int, n_layers: int) -> Parts:
        """Returns a stage's parts: layers [start, end), the embedding if first, head if last."""
        if end <= start:
            return cls()
        return cls(frozenset(range(start, end)), start == 0, end == n_layers)

    def __or__(self, other: Parts) -> Parts:
        return Parts(self.layers | other.layers, self.embed or other.embed, self.head or other.head)

    def __sub__(self, other: Parts) -> Parts:
        """Returns what self holds and other does not."""
        return Parts(
            self.layers - other.layers,
            self.embed and not other.embed,
            self.head and not other.head,
        )

    def __bool__(self) -> bool:
        return bool(self.layers) or self.embed or self.head

    def layer_runs(self) -> list[Range]:
        """Returns the layers as maximal [start, end) runs, in order."""
        return _runs(sorted(self.layers))

    def describe(self) -> str:
        """Returns `layers 0-9 and embedding`, `layers 20-29 and head`, `nothing`."""
        words = [f"layers {_inclusive(r)}" for r in self.layer_runs()]
        words += [name for name, has in (("embedding", self.embed), ("head", self.head)) if has]
        if not words:
            return "nothing"
        return ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]


NOTHING = Parts()


@dataclass(frozen=True)
class ModelFootprint:
    """Sizes as the engine holds them (it measures them)."""

    n_layers: int
    layer_weight_bytes: int  # one decoder layer
    embed_bytes: int  # what a first stage holds for the embedding
    head_bytes: int  # what a last stage holds for the final norm and output projection
    kv_bytes_per_token_per_layer: int
    block_size: int  # tokens per KV block

    def parts(self, start: int, end: int) -> Parts:
        """Returns the parts a stage [start, end) holds."""
        return Parts.of_stage(start, end, self.n_layers)

    def parts_bytes(self, parts: Parts) -> int:
        """Returns bytes = layers * layer_weight_bytes + embed_bytes? + head_bytes?."""
        return (
            len(parts.layers) * self.layer_weight_bytes
            + parts.embed * self.embed_bytes
            + parts.head * self.head_bytes
        )

    def weight_bytes(self, start: int, end: int) -> int:
        """Returns a stage's weight bytes, embedding and head included where it holds them."""
        return self.parts_bytes(self.parts(start, end))

    def kv_block_bytes(self, n_layers: int) -> int:
        """Returns one block's bytes on a device of n_layers: block_size * kv_bytes * n_layers."""
        return self.block_size * self.kv_bytes_per_token_per_layer * n_layers

    def kv_bytes(self, tokens: int, n_layers: int) -> int:
        """Returns the KV bytes of `tokens` positions over n_layers layers."""
        return tokens * n_layers * self.kv_bytes_per_token_per_layer

    def pool_blocks(self, device: DeviceInfo, weight_bytes: int, n_layers: int) -> int:
        """Returns the KV blocks a device holding n_layers (weight_bytes) has room for:
        floor(min(cap, budget - weight_bytes) / kv_block_bytes(n_layers)); 0 holding nothing."""
        room = min(device.kv_pool_cap_bytes, device.memory_budget_bytes - weight_bytes)
        if n_layers == 0 or room <= 0:
            return 0
        return room // self.kv_block_bytes(n_layers)


@dataclass(frozen=True)
class RequestKV:
    """An in-flight request as the plan sees it."""

    request_id: str
    pipeline: int  # index into current.pipelines
    cached_tokens: int  # positions in its KV cache now
    reserved_blocks: int  # blocks the scheduler reserved for it on every stage


# ---- outputs ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Handoff:
    """Layers [start, end) of a request change owner from `src` to `dst`."""

    start: int
    end: int
    src: str
    dst: str


@dataclass(frozen=True)
class Load:
    """A part a device gains before the switch; start, end are 0 for the embedding and head."""

    part: str  # "layers" | "embed" | "head"
    start: int
    end: int
    source: str  # a peer that holds it now (and keeps it until cleanup), or "disk"
    bytes: int
    predicted_s: float  # link (or disk) time plus the receiver's relayout, unpaced

    def describe(self) -> str:
        return f"+ load {_part_words(self.part, self.start, self.end)} from {self.source}"


@dataclass(frozen=True)
class Free:
    """A part a device drops at cleanup; start, end are 0 for the embedding and head."""

    part: str  # "layers" | "embed" | "head"
    start: int
    end: int
    bytes: int


@dataclass
class DeviceChange:
    device: str
    old_range: Range | None  # None: spare before
    new_range: Range | None  # None: spare after
    loads: list[Load] = field(default_factory=list)
    frees: list[Free] = field(default_factory=list)
    pool_blocks_before: int = 0
    pool_blocks_during: int = 0  # holding old ∪ new
    pool_blocks_after: int = 0
    weight_bytes_before: int = 0
    weight_bytes_during: int = 0
    weight_bytes_after: int = 0

    @property
    def changes(self) -> bool:
        """True when the device's stage, or anything it holds, changes."""
        return self.old_range != self.new_range or bool(self.loads or self.frees)

    def to_json(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "old_range": None if self.old_range is None else list(self.old_range),
            "new_range": None if self.new_range is None else list(self.new_range),
        }


@dataclass(frozen=True)
class KVMove:
    """KV of one request for layers [start, end), `tokens` positions, from `src` to `dst`."""

    request_id: str
    src: str
    dst: str
    start: int
    end: int
    tokens: int
    bytes: int


@dataclass(frozen=True)
class Prediction:
    weight_bytes_from_peer: int
    weight_bytes_from_disk: int
    kv_bytes: int
    bytes_total: int  # weights + KV this plan moves
    minimum_bytes: int  # what any plan must move for this target and these devices
    prefetch_s: float  # paced weight loads, devices in parallel
    precopy_s: float  # paced KV pre-copy, devices in parallel
    stall_ms: float  # the blocking switch
    recompute_tokens: int = 0  # KV positions the requests to recompute drop (and compute again)


@dataclass
class ReconfigPlan:
    epoch_from: int
    epoch_to: int
    current: Configuration
    target: Configuration  # every stage with its device
    device_changes: list[DeviceChange]  # every device holding something before or after
    request_routes: dict[str, int]  # request -> target pipeline
    pipeline_map: dict[int, int | None]  # current pipeline -> target pipeline (None: removed)
    kept_pipelines: list[int]  # target pipelines equal to the current one mapped to them
    changed_pipelines: list[int]  # target pipelines that change the current one mapped to them
    added: list[int]  # target pipelines no current one maps to
    removed: list[int]  # current pipelines that go
    kv_moves: list[KVMove]
    prediction: Prediction
    problems: list[str]  # why memory forbids it; empty when it can be applied
    pipeline_capacity_blocks: list[int]  # per target pipeline: min over its stages' pools after
    max_overhead: float
    request_origins: dict[str, int] = field(default_factory=dict)  # request -> current pipeline
    recompute: list[str] = field(default_factory=list)  # requests whose KV is dropped, recomputed

    @property
    def feasible(self) -> bool:
        return not self.problems

    @property
    def has_changes(self) -> bool:
        return bool(self.changed_pipelines or self.added or self.removed)

    @property
    def moved_stages(self) -> list[tuple[int, int]]:
        """Returns (target pipeline, stage) of changed pipelines' stages on a device that held
        none of the stage's layers before."""
        before = {c.device: c.old_range for c in self.device_changes}
        return [
            (j, k)
            for j in self.changed_pipelines
            for k, s in enumerate(self.target.pipelines[j].stages)
            if not _overlaps(before.get(s.device), (s.start, s.end))
        ]

    @property
    def counts(self) -> dict[str, int]:
        """Returns the summary counts: loads and frees (actions), moves ((src, dst) KV pairs
        plus stages that change device), requests to recompute, and pipelines kept, changed,
        added, removed."""
        return {
            "loads": sum(len(c.loads) for c in self.device_changes),
            "frees": sum(len(c.frees) for c in self.device_changes),
            "moves": len({(m.src, m.dst) for m in self.kv_moves}) + len(self.moved_stages),
            "recomputes": len(self.recompute),
            "kept": len(self.kept_pipelines),
            "changed": len(self.changed_pipelines),
            "added": len(self.added),
            "removed": len(self.removed),
        }

    def summary(self) -> str:
        """Returns the one-line summary: `Plan: 3 to load, 2 to free, 2 to move; ...`."""
        if not self.has_changes:
            return "No changes."
        n, p = self.counts, self.prediction
        recompute = f", {n['recomputes']} to recompute" if n["recomputes"] else ""
        return (
            f"Plan: {n['loads']} to load, {n['frees']} to free, {n['moves']} to move{recompute}; "
            f"{_total_size(p.bytes_total)}, predicted prefetch {_duration(p.prefetch_s)}, "
            f"predicted stall {p.stall_ms:.1f} ms"
        )

    def render(self) -> str:
        """Returns the plan as an operator reads it (Terraform's symbols, our units)."""
        if not self.has_changes:
            lines = [f"No changes. Epoch {self.epoch_from} already serves this configuration."]
        else:
            lines = [f"pipeshift will change epoch {self.epoch_from} -> {self.epoch_to}:", ""]
            lines += _pipeline_blocks(self)
            if self.recompute:
                n = len(self.recompute)
                lines.append(
                    f"  -/+ recompute {n} request{'s' * (n != 1)}' KV "
                    f"({self.prediction.recompute_tokens:,} tokens): memory cannot hold "
                    f"{'them' if n != 1 else 'it'} through the change; back at the head of the queue"
                )
            lines += ["", self.summary()]
        lines += [f"Error: {p}" for p in self.problems]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """Returns every field as plain JSON values, plus `counts` and the `summary` line."""
        return {
            "epoch_from": self.epoch_from,
            "epoch_to": self.epoch_to,
            "current": self.current.to_json(),
            "target": self.target.to_json(),
            "has_changes": self.has_changes,
            "feasible": self.feasible,
            "problems": list(self.problems),
            "device_changes": [c.to_json() for c in self.device_changes],
            "request_routes": dict(self.request_routes),
            "pipeline_map": {str(i): j for i, j in self.pipeline_map.items()},
            "kept_pipelines": list(self.kept_pipelines),
            "changed_pipelines": list(self.changed_pipelines),
            "added": list(self.added),
            "removed": list(self.removed),
            "moved_stages": [list(s) for s in self.moved_stages],
            "kv_moves": [asdict(m) for m in self.kv_moves],
            "prediction": asdict(self.prediction),
            "pipeline_capacity_blocks": list(self.pipeline_capacity_blocks),
            "max_overhead": self.max_overhead,
            "request_origins": dict(self.request_origins),
            "recompute": list(self.recompute),
            "counts": self.counts,
            "summary": self.summary(),
        }


# ---- the plan -----------------------------------------------------------------------------
def plan_reconfiguration(
    current: Configuration,
    target: Configuration,
    devices: Sequence[DeviceInfo],
    footprint: ModelFootprint,
    requests: Sequence[RequestKV] = (),
    *,
    epoch: int = 1,
    max_overhead: float = 0.05,
    disk_bandwidth_bytes_per_s: float | None = None,
    recompute_overflow: bool = False,
    kinds: Mapping[str, DeviceKind] | None = None,
) -> ReconfigPlan:
    """Returns the plan from `current` (serving at `epoch`) to `target`.

    Raises ConfigurationError for a malformed target (or current configuration, or devices).
    A plan that memory forbids is returned with `problems` (with the numbers), not feasible.
    With `recompute_overflow`, requests whose KV memory cannot hold during or after the change
    are to recompute it (`recompute`) instead, and only what no dropped KV can fix is a problem.
    `kinds`: device kinds by name where not the catalog's (a spec's profiles define or refine
    them; planner/adapt.py passes the spec's).
    """
    n_layers = footprint.n_layers
    all_requests = list(requests)
    links = _Links.of(devices, disk_bandwidth_bytes_per_s or DISK_BANDWIDTH_BYTES_PER_S, kinds)
    _check_inputs(current, target, devices, n_layers, requests, max_overhead)
    # What present devices hold now: the sources a device can load from. A device of `current`
    # missing from `devices` (gone) is no source, and the KV it holds cannot move.
    held = {d: parts for d, parts in holdings(current, n_layers).items() if d in links.kinds}
    target = place_devices(target, devices, held, footprint)
    pipeline_map = map_pipelines(current, target, n_layers)
    kept, changed, added, removed = classify_pipelines(current, target, pipeline_map)
    changes = [
        device_change(
            d, _stage_on(current, d.name), _stage_on(target, d.name), held, footprint, links
        )
        for d in devices
        if _stage_on(current, d.name) or _stage_on(target, d.name)
    ]
    capacity = pipeline_capacity_blocks(target, changes)
    routes = route_requests(requests, pipeline_map, capacity)
    recompute: list[str] = []
    if recompute_overflow:
        recompute = choose_recompute(
            current, target, changes, requests, routes, capacity, kept, pipeline_map, devices
        )
    dropped = set(recompute)
    if dropped:
        requests = [r for r in requests if r.request_id not in dropped]
        routes = {r.request_id: routes[r.request_id] for r in requests}  # what the choice counted
    moves = kv_moves(current, target, requests, routes, footprint)
    minimum = minimum_bytes(current, target, requests, routes, footprint)
    switching = bool(changed or added or removed)
    return ReconfigPlan(
        epoch_from=epoch,
        epoch_to=epoch + 1,
        current=current,
        target=target,
        device_changes=changes,
        request_routes=routes,
        pipeline_map=pipeline_map,
        kept_pipelines=kept,
        changed_pipelines=changed,
        added=added,
        removed=removed,
        kv_moves=moves,
        prediction=replace(
            predict(changes, moves, minimum, footprint, links, max_overhead, switching),
            recompute_tokens=sum(r.cached_tokens for r in all_requests if r.request_id in dropped),
        ),
        problems=capacity_problems(
            current, target, changes, requests, routes, capacity, devices, footprint
        ),
        pipeline_capacity_blocks=capacity,
        max_overhead=max_overhead,
        request_origins={r.request_id: r.pipeline for r in all_requests},
        recompute=recompute,
    )


def _check_inputs(
    current: Configuration,
    target: Configuration,
    devices: Sequence[DeviceInfo],
    n_layers: int,
    requests: Sequence[RequestKV],
    max_overhead: float,
) -> None:
    target.check(n_layers, [d.name for d in devices])
    try:
        current.check(n_layers)
    except ConfigurationError as exc:
        raise ConfigurationError(f"the current configuration: {exc}") from None
    if None in (s.device for p in current.pipelines for s in p.stages):
        raise ConfigurationError("the current configuration must name the device of every stage")
    for r in requests:
        if not 0 <= r.pipeline < len(current.pipelines):
            raise ConfigurationError(
                f"request {r.request_id} runs on pipeline {r.pipeline}; the current configuration "
                f"has {len(current.pipelines)}"
            )
    if not 0 < max_overhead <= 1:
        raise ConfigurationError(f"max_overhead is {max_overhead}: give a fraction in (0, 1]")


def holdings(config: Configuration, n_layers: int) -> dict[str, Parts]:
    """Returns device -> the parts its stage holds, for every named stage of `config`."""
    return {
        s.device: Parts.of_stage(s.start, s.end, n_layers)
        for p in config.pipelines
        for s in p.stages
        if s.device is not None
    }


# ---- 1. devices for the target ------------------------------------------------------------
def place_devices(
    target: Configuration,
    devices: Sequence[DeviceInfo],
    held: dict[str, Parts],
    footprint: ModelFootprint,
) -> Configuration:
    """Returns the target with a device on every stage: those it names, and for the others
    the assignment (among devices it does not name) that loads the fewest bytes:
        cost[stage][device] = bytes(parts of stage - parts the device holds now)."""
    open_slots = [
        (i, k)
        for i, p in enumerate(target.pipelines)
        for k, s in enumerate(p.stages)
        if s.device is None
    ]
    if not open_slots:
        return target
    named = set(target.devices())
    free = [d.name for d in devices if d.name not in named]
    costs = []
    for i, k in open_slots:
        stage = target.pipelines[i].stages[k]
        wanted = footprint.parts(stage.start, stage.end)
        costs.append([footprint.parts_bytes(wanted - held.get(name, NOTHING)) for name in free])
    chosen = {slot: free[c] for slot, c in zip(open_slots, min_cost_assignment(costs), strict=True)}
    return Configuration(
        tuple(
            PipelineConfig(
                tuple(
                    StageConfig(chosen.get((i, k), s.device), s.start, s.end)
                    for k, s in enumerate(p.stages)
                )
            )
            for i, p in enumerate(target.pipelines)
        )
    )


# ---- 2. pipelines old -> new, and where requests go ---------------------------------------
def layers_in_place(old: PipelineConfig, new: PipelineConfig, n_layers: int) -> int:
    """Returns how many layers have the same owner device in both pipelines."""
    return sum(old.owner(layer) == new.owner(layer) for layer in range(n_layers))


def map_pipelines(
    current: Configuration, target: Configuration, n_layers: int
) -> dict[int, int | None]:
    """Returns current -> target pipeline (None: removed), each target used at most once,
    maximising the layers that stay on their device: min sum(n_layers - in_place[i][j]).
    min(#current, #target) pairs are made; the rest of the larger side is removed / added."""
    in_place = [
        [layers_in_place(old, new, n_layers) for new in target.pipelines]
        for old in current.pipelines
    ]
    n_old, n_new = len(current.pipelines), len(target.pipelines)
    if n_old <= n_new:  # rows: current pipelines
        chosen = min_cost_assignment([[n_layers - k for k in row] for row in in_place])
        return dict(enumerate(chosen))
    # rows: target pipelines (the matcher places rows on columns, rows <= columns)
    sources = min_cost_assignment(
        [[n_layers - in_place[i][j] for i in range(n_old)] for j in range(n_new)]
    )
    mapping: dict[int, int | None] = dict.fromkeys(range(n_old))
    for j, i in enumerate(sources):
        mapping[i] = j
    return mapping


def classify_pipelines(
    current: Configuration, target: Configuration, pipeline_map: dict[int, int | None]
) -> tuple[list[int], list[int], list[int], list[int]]:
    """Returns (kept, changed, added, removed): target pipelines equal to the current one mapped
    to them, target pipelines that change theirs, target pipelines no current one maps to, and
    current pipelines mapped nowhere."""
    mapped = {i: j for i, j in pipeline_map.items() if j is not None}
    kept = sorted(j for i, j in mapped.items() if current.pipelines[i] == target.pipelines[j])
    changed = sorted(set(mapped.values()) - set(kept))
    added = [j for j in range(len(target.pipelines)) if j not in mapped.values()]
    removed = sorted(i for i, j in pipeline_map.items() if j is None)
    return kept, changed, added, removed


def route_requests(
    requests: Sequence[RequestKV], pipeline_map: dict[int, int | None], capacity: list[int]
) -> dict[str, int]:
    """Returns request -> target pipeline: the image of its pipeline; a removed pipeline's
    requests, largest first, each to the target least loaded once it is added:
        argmin_j (reserved_j + blocks) / capacity_j   (ties: lower j)."""
    reserved = [0] * len(capacity)
    routes: dict[str, int] = {}
    for r in requests:
        j = pipeline_map[r.pipeline]
        if j is not None:
            routes[r.request_id] = j
            reserved[j] += r.reserved_blocks
    orphans = [r for r in requests if pipeline_map[r.pipeline] is None]
    for r in sorted(orphans, key=lambda r: (-r.reserved_blocks, r.request_id)):

        def load(j: int, blocks: int = r.reserved_blocks) -> tuple[float, int]:
            used = reserved[j] + blocks
            return (used / capacity[j] if capacity[j] else math.inf), j

        j = min(range(len(capacity)), key=load)
        routes[r.request_id] = j
        reserved[j] += r.reserved_blocks
    return routes


# ---- 3. layer handoffs --------------------------------------------------------------------
def layer_handoffs(old: PipelineConfig, new: PipelineConfig) -> list[Handoff]:
    """Returns the maximal runs of contiguous layers whose owner differs between two pipelines
    (src: the owner in `old`, dst: in `new`), in layer order."""
    n_layers = old.stages[-1].end
    if new.stages[-1].end != n_layers:
        raise ValueError(f"pipelines of {n_layers} and {new.stages[-1].end} layers")
    out: list[Handoff] = []
    for layer in range(n_layers):
        src, dst = old.owner(layer), new.owner(layer)
        if src == dst:
            continue
        if src is None or dst is None:
            raise ValueError(f"layer {layer} has no device in one of the pipelines")
        last = out[-1] if out else None
        if last is not None and (last.end, last.src, last.dst) == (layer, src, dst):
            out[-1] = Handoff(last.start, layer + 1, src, dst)
        else:
            out.append(Handoff(layer, layer + 1, src, dst))
    return out


# ---- 4. per-device changes ----------------------------------------------------------------
@dataclass(frozen=True)
class _Links:
    """Each device's kind and node, and the disk, as the cost model prices them."""

    kinds: dict[str, DeviceKind]
    nodes: dict[str, str]
    disk_bandwidth_bytes_per_s: float

    @classmethod
    def of(
        cls,
        devices: Sequence[DeviceInfo],
        disk_bandwidth_bytes_per_s: float,
        known_kinds: Mapping[str, DeviceKind] | None = None,
    ) -> _Links:
        """`known_kinds`: kinds by name that the catalog does not hold, or holds with other
        figures (a spec's measured profiles); the others come from the catalog."""
        kinds = {}
        for d in devices:
            if known_kinds is not None and d.kind in known_kinds:
                kinds[d.name] = known_kinds[d.kind]
                continue
            try:
                kinds[d.name] = get_device_kind(d.kind)
            except KeyError as exc:
                raise ConfigurationError(f"device {d.name}: {exc.args[0]}") from None
        return cls(kinds, {d.name: d.node for d in devices}, disk_bandwidth_bytes_per_s)

    def move_s(self, n_bytes: int, source: str, dst: str) -> float:
        """Returns seconds to bring n_bytes of weights to dst from `source` (a peer or disk):
        the link (bytes_move_s) or disk read (disk_load_s), plus dst's relayout (relayout_s)."""
        kind = self.kinds[dst]
        if source == DISK:
            link_s = disk_load_s(n_bytes, kind, self.disk_bandwidth_bytes_per_s)
        else:
            same_node = self.nodes[source] == self.nodes[dst]
            link_s = bytes_move_s(n_bytes, self.kinds[source], kind, same_node)
        return link_s + relayout_s(n_bytes, kind)

    def transfer_s(self, n_bytes: int, src: str, dst: str) -> float:
        """Returns seconds to send n_bytes of KV from src to dst over their link."""
        same_node = self.nodes[src] == self.nodes[dst]
        return transfer_s(n_bytes, self.kinds[src], self.kinds[dst], same_node)

    def cheapest_source(self, n_bytes: int, holders: Iterable[str], dst: str) -> str:
        """Returns the holder, or "disk", that the cost model says brings n_bytes to dst first
        (ties: a peer, then the holder listed first)."""
        options = [(self.move_s(n_bytes, h, dst), 0, n, h) for n, h in enumerate(holders)]
        options.append((self.move_s(n_bytes, DISK, dst), 1, 0, DISK))
        return min(options)[3]


def device_change(
    device: DeviceInfo,
    before: StageConfig | None,
    after: StageConfig | None,
    held: dict[str, Parts],
    footprint: ModelFootprint,
    links: _Links,
) -> DeviceChange:
    """Returns what `device` loads and frees going from its stage `before` to `after` (None:
    spare), and its weights and KV pool before, during (holding old ∪ new, KV for all those
    layers) and after."""
    old = NOTHING if before is None else footprint.parts(before.start, before.end)
    new = NOTHING if after is None else footprint.parts(after.start, after.end)
    during = old | new
    weights = [footprint.parts_bytes(p) for p in (old, during, new)]
    pools = [
        footprint.pool_blocks(device, w, len(p.layers))
        for w, p in zip(weights, (old, during, new), strict=True)
    ]
    return DeviceChange(
        device.name,
        None if before is None else (before.start, before.end),
        None if after is None else (after.start, after.end),
        loads=plan_loads(device.name, new - old, held, footprint, links),
        frees=plan_frees(old - new, footprint),
        pool_blocks_before=pools[0],
        pool_blocks_during=pools[1],
        pool_blocks_after=pools[2],
        weight_bytes_before=weights[0],
        weight_bytes_during=weights[1],
        weight_bytes_after=weights[2],
    )


def plan_loads(
    device: str, gained: Parts, held: dict[str, Parts], footprint: ModelFootprint, links: _Links
) -> list[Load]:
    """Returns the loads that bring `gained` to `device`: layers in contiguous runs, one per
    run of layers with one chosen source, then the embedding and the head."""
    loads: list[Load] = []
    for start, end in _holder_runs(gained, held, device):
        holders = [h for h, parts in held.items() if h != device and start in parts.layers]
        n_bytes = (end - start) * footprint.layer_weight_bytes
        source = links.cheapest_source(n_bytes, holders, device)
        last = loads[-1] if loads else None
        if last is not None and last.end == start and last.source == source:
            start, n_bytes = last.start, last.bytes + n_bytes
            loads.pop()
        loads.append(
            Load("layers", start, end, source, n_bytes, links.move_s(n_bytes, source, device))
        )
    for part, wanted, n_bytes in (
        ("embed", gained.embed, footprint.embed_bytes),
        ("head", gained.head, footprint.head_bytes),
    ):
        if wanted:
            holders = [h for h, parts in held.items() if h != device and getattr(parts, part)]
            source = links.cheapest_source(n_bytes, holders, device)
            loads.append(Load(part, 0, 0, source, n_bytes, links.move_s(n_bytes, source, device)))
    return loads


def _holder_runs(gained: Parts, held: dict[str, Parts], device: str) -> list[Range]:
    """Returns the gained layers as maximal runs whose layers have the same set of holders."""
    runs: list[Range] = []
    holders_of_last: frozenset[str] | None = None
    for layer in sorted(gained.layers):
        holders = frozenset(h for h, parts in held.items() if h != device and layer in parts.layers)
        if runs and runs[-1][1] == layer and holders == holders_of_last:
            runs[-1] = (runs[-1][0], layer + 1)
        else:
            runs.append((layer, layer + 1))
        holders_of_last = holders
    return runs


def plan_frees(lost: Parts, footprint: ModelFootprint) -> list[Free]:
    """Returns the frees of the parts a device no longer holds after the switch."""
    frees = [
        Free("layers", s, e, (e - s) * footprint.layer_weight_bytes) for s, e in lost.layer_runs()
    ]
    if lost.embed:
        frees.append(Free("embed", 0, 0, footprint.embed_bytes))
    if lost.head:
        frees.append(Free("head", 0, 0, footprint.head_bytes))
    return frees


def pipeline_capacity_blocks(target: Configuration, changes: list[DeviceChange]) -> list[int]:
    """Returns, per target pipeline, the blocks a request can reserve on all of its stages
    after the change: min over its stages of pool_blocks_after."""
    after = {c.device: c.pool_blocks_after for c in changes}
    return [min(after[s.device] for s in p.stages if s.device) for p in target.pipelines]


# ---- 5. capacity --------------------------------------------------------------------------
def capacity_problems(
    current: Configuration,
    target: Configuration,
    changes: list[DeviceChange],
    requests: Sequence[RequestKV],
    routes: dict[str, int],
    capacity: list[int],
    devices: Sequence[DeviceInfo],
    footprint: ModelFootprint,
) -> list[str]:
    """Returns one line per shortfall, with the numbers and what to do:
    - during the change, a device's weights (old ∪ new, a superset of after) exceed its
      budget, or its pool cannot hold the blocks of the requests of its old and new pipelines;
    - after it, a target pipeline's capacity cannot hold the blocks of the requests routed to
      it (nor one block: it could never serve)."""
    by_name = {d.name: d for d in devices}
    by_device = {c.device: c for c in changes}
    problems, over_budget = [], set()
    in_use = blocks_in_use_during(current, target, requests, routes)
    for c in changes:
        need = in_use.get(c.device, 0)
        line = _shortfall(
            by_name[c.device],
            "during the change",
            _parts_of(c.old_range, footprint) | _parts_of(c.new_range, footprint),
            c.weight_bytes_during,
            c.pool_blocks_during,
            need,
            f"its requests need {need} blocks",
            footprint,
        )
        if line:
            problems.append(line)
        if c.weight_bytes_during > by_name[c.device].memory_budget_bytes:
            over_budget.add(c.device)
    problems += _stranded_kv(kv_moves_from_gone(current, target, requests, routes, by_name))
    routed_blocks = blocks_routed(requests, routes, len(capacity))
    routed = [0] * len(capacity)
    for r in requests:
        routed[routes[r.request_id]] += 1
    for j, p in enumerate(target.pipelines):
        tightest = min(
            (by_device[str(s.device)] for s in p.stages), key=lambda c: c.pool_blocks_after
        )
        need = max(routed_blocks[j], 1)
        if capacity[j] >= need or tightest.device in over_budget:
            continue
        line = _shortfall(
            by_name[tightest.device],
            f"after the change (pipeline {j})",
            _parts_of(tightest.new_range, footprint),
            tightest.weight_bytes_after,
            tightest.pool_blocks_after,
            need,
            f"the {routed[j]} requests routed to pipeline {j} need {need} blocks"
            if routed[j]
            else None,
            footprint,
        )
        if line:
            problems.append(line)
    return problems


def blocks_routed(requests: Sequence[RequestKV], routes: dict[str, int], n: int) -> list[int]:
    """Returns, per target pipeline of `n`, the blocks its routed requests reserve."""
    out = [0] * n
    for r in requests:
        out[routes[r.request_id]] += r.reserved_blocks
    return out


def choose_recompute(
    current: Configuration,
    target: Configuration,
    changes: list[DeviceChange],
    requests: Sequence[RequestKV],
    routes: dict[str, int],
    capacity: list[int],
    kept: list[int],
    pipeline_map: dict[int, int | None],
    devices: Sequence[DeviceInfo],
) -> list[str]:
    """Returns the requests whose KV the change drops, to recompute it once admitted again:
    taken in order of cached_tokens / reserved_blocks (then the larger reservation first),
    a request of a pipeline that changes or goes is dropped while a device it holds blocks on
    during the change is over its pool, or its target pipeline is over its capacity after.
    A device whose weights alone exceed its budget is left to `capacity_problems`."""
    budget = {d.name: d.memory_budget_bytes for d in devices}
    pool = {c.device: c.pool_blocks_during for c in changes if c.weight_bytes_during <= budget[c.device]}
    fixable = [all(str(s.device) in pool for s in p.stages) for p in target.pipelines]
    in_use = blocks_in_use_during(current, target, requests, routes)
    routed = blocks_routed(requests, routes, len(capacity))
    untouched = {i for i, j in pipeline_map.items() if j in kept}
    candidates = sorted(
        (r for r in requests if r.pipeline not in untouched),
        key=lambda r: (r.cached_tokens / max(r.reserved_blocks, 1), -r.reserved_blocks, r.request_id),
    )
    dropped = []
    for r in candidates:
        on = {str(d) for d in current.pipelines[r.pipeline].devices}
        on |= {str(d) for d in target.pipelines[routes[r.request_id]].devices}
        j = routes[r.request_id]
        over_after = fixable[j] and routed[j] > capacity[j]
        if not over_after and all(in_use[d] <= pool.get(d, in_use[d]) for d in on):
            continue
        dropped.append(r.request_id)
        routed[j] -= r.reserved_blocks
        for d in on:
            in_use[d] -= r.reserved_blocks
    return dropped


def kv_moves_from_gone(
    current: Configuration,
    target: Configuration,
    requests: Sequence[RequestKV],
    routes: dict[str, int],
    present: Collection[str],
) -> dict[str, list[tuple[str, Handoff]]]:
    """Returns gone device -> (request, handoff) of each request's KV that would have to leave
    a device of `current` that is not among the present ones."""
    out: dict[str, list[tuple[str, Handoff]]] = defaultdict(list)
    for r in requests:
        if r.cached_tokens == 0:
            continue
        new = target.pipelines[routes[r.request_id]]
        for h in layer_handoffs(current.pipelines[r.pipeline], new):
            if h.src not in present:
                out[h.src].append((r.request_id, h))
    return out


def _stranded_kv(gone: dict[str, list[tuple[str, Handoff]]]) -> list[str]:
    lines = []
    for device, held in gone.items():
        n = len({rid for rid, _ in held})
        runs = sorted({(h.start, h.end) for _, h in held})
        lines.append(
            f"{device} is not among the devices and holds the KV of {n} request{'s' * (n != 1)} "
            f"for layers {', '.join(_inclusive(r) for r in runs)}, which must move: wait for "
            "those requests to finish, or bring it back"
        )
    return lines


def blocks_in_use_during(
    current: Configuration,
    target: Configuration,
    requests: Sequence[RequestKV],
    routes: dict[str, int],
) -> dict[str, int]:
    """Returns device -> blocks reserved on it during the change: each request's blocks on
    every device of its current pipeline and of the target pipeline it goes to (once each)."""
    in_use: dict[str, int] = defaultdict(int)
    for r in requests:
        old = current.pipelines[r.pipeline].devices
        new = target.pipelines[routes[r.request_id]].devices
        for d in {*old, *new}:
            in_use[str(d)] += r.reserved_blocks
    return in_use


def _shortfall(
    device: DeviceInfo,
    when: str,
    parts: Parts,
    weight_bytes: int,
    pool_blocks: int,
    need_blocks: int,
    needs: str | None,
    footprint: ModelFootprint,
) -> str | None:
    """Returns the problem line when `weight_bytes` exceed the budget or `need_blocks` do not
    fit the pool (`needs` says whose blocks they are; None: no request, one block to serve),
    else None."""
    budget = device.memory_budget_bytes
    holds = (
        f"{device.name}: {when} it holds {parts.describe()} "
        f"({weight_bytes / MIB:.1f} MiB of weights) and its budget is {budget / MIB:.0f} MiB"
    )
    pool_bytes = max(need_blocks, 1) * footprint.kv_block_bytes(len(parts.layers))
    if weight_bytes > budget:
        return (
            f"{holds}: raise --memory-budget to at least {_mib_up(weight_bytes + pool_bytes)} MiB "
            "(weights and KV pool), or choose a target that puts fewer layers on it"
        )
    if pool_blocks >= need_blocks:
        return None
    fixes = []
    if budget - weight_bytes < pool_bytes:
        fixes.append(f"raise --memory-budget to at least {_mib_up(weight_bytes + pool_bytes)} MiB")
    if device.kv_pool_cap_bytes < pool_bytes:
        fixes.append(f"raise --kv-cache-mb to at least {_mib_up(pool_bytes)}")
    later = (
        ", or apply when fewer requests are running, or let those that do not fit recompute "
        "their KV (--recompute-overflow)"
    )
    if needs is None:
        needs, later = "it needs at least 1 block to serve a request", ""
    return (
        f"{holds}, leaving a KV pool of {pool_blocks} blocks; {needs}: {' and '.join(fixes)}{later}"
    )


# ---- 6. KV moves --------------------------------------------------------------------------
def kv_moves(
    current: Configuration,
    target: Configuration,
    requests: Sequence[RequestKV],
    routes: dict[str, int],
    footprint: ModelFootprint,
) -> list[KVMove]:
    """Returns, per request with KV and per handoff between its old and new pipeline, the
    move of its KV: bytes = tokens * (end - start) * kv_bytes_per_token_per_layer."""
    return [
        KVMove(
            r.request_id,
            h.src,
            h.dst,
            h.start,
            h.end,
            r.cached_tokens,
            footprint.kv_bytes(r.cached_tokens, h.end - h.start),
        )
        for r in requests
        if r.cached_tokens > 0
        for h in layer_handoffs(
            current.pipelines[r.pipeline], target.pipelines[routes[r.request_id]]
        )
    ]


# ---- 7. predictions -----------------------------------------------------------------------
def minimum_bytes(
    current: Configuration,
    target: Configuration,
    requests: Sequence[RequestKV],
    routes: dict[str, int],
    footprint: ModelFootprint,
) -> int:
    """Returns the bytes any plan must move to reach `target` on its devices, counted from the
    configurations alone: sum over devices of bytes(new parts - old parts) + sum over requests
    of tokens * (layers whose owner changes) * kv_bytes_per_token_per_layer."""
    n_layers = footprint.n_layers
    old, new = holdings(current, n_layers), holdings(target, n_layers)
    weights = sum(footprint.parts_bytes(parts - old.get(d, NOTHING)) for d, parts in new.items())
    kv = 0
    for r in requests:
        before, after = current.pipelines[r.pipeline], target.pipelines[routes[r.request_id]]
        moving = sum(before.owner(layer) != after.owner(layer) for layer in range(n_layers))
        kv += footprint.kv_bytes(r.cached_tokens, moving)
    return weights + kv


def predict(
    changes: list[DeviceChange],
    moves: list[KVMove],
    minimum: int,
    footprint: ModelFootprint,
    links: _Links,
    max_overhead: float,
    switching: bool,
) -> Prediction:
    """Returns bytes and times (formulas in the module docstring); no switch, no stall."""
    loads = [ld for c in changes for ld in c.loads]
    peer = sum(ld.bytes for ld in loads if ld.source != DISK)
    disk = sum(ld.bytes for ld in loads if ld.source == DISK)
    kv = sum(m.bytes for m in moves)
    load_s = max((sum(ld.predicted_s for ld in c.loads) for c in changes), default=0.0)
    by_pair: dict[tuple[str, str], list[KVMove]] = defaultdict(list)
    for m in moves:
        by_pair[(m.src, m.dst)].append(m)
    kv_in_s: dict[str, float] = defaultdict(float)
    delta_s = 0.0
    for (src, dst), pair in by_pair.items():
        if src not in links.kinds:
            continue  # a gone device: no link to price (the plan has a problem for it)
        kv_in_s[dst] += links.transfer_s(sum(m.bytes for m in pair), src, dst)
        delta = sum(
            footprint.kv_bytes(min(SWITCH_DELTA_TOKENS, m.tokens), m.end - m.start) for m in pair
        )
        delta_s = max(delta_s, links.transfer_s(delta, src, dst))
    stall_s = SWITCH_FIXED_S + delta_s if switching else 0.0
    return Prediction(
        weight_bytes_from_peer=peer,
        weight_bytes_from_disk=disk,
        kv_bytes=kv,
        bytes_total=peer + disk + kv,
        minimum_bytes=minimum,
        prefetch_s=load_s / max_overhead,
        precopy_s=max(kv_in_s.values(), default=0.0) / max_overhead,
        stall_ms=stall_s * 1000,
    )


# ---- rendering ----------------------------------------------------------------------------
def _pipeline_blocks(plan: ReconfigPlan) -> list[str]:
    """Returns one block per target pipeline, then one per removed current pipeline."""
    changes = {c.device: c for c in plan.device_changes}
    placed = set(plan.target.devices())
    source = {j: i for i, j in plan.pipeline_map.items() if j is not None}
    moves_into: dict[int, list[KVMove]] = defaultdict(list)
    for m in plan.kv_moves:
        moves_into[plan.request_routes[m.request_id]].append(m)
    lines = []
    for j, new in enumerate(plan.target.pipelines):
        devices: list[str | None] = list(new.devices)
        if j in plan.kept_pipelines:
            lines.append(f"  = pipeline {j}  {new.describe()}  (unchanged)")
        elif j in plan.added:
            lines.append(f"  + pipeline {j}  {new.describe()}")
        else:
            old = plan.current.pipelines[source[j]]
            was = "" if source[j] == j else f" (was {source[j]})"
            lines.append(f"  ~ pipeline {j}{was}  {old.describe()}   ->   {new.describe()}")
            devices += [d for d in old.devices if d not in placed]  # now spare
        for d in devices:
            if d in changes and changes[d].changes:  # (a gone device has no change)
                lines += _device_lines(changes[d])
        lines += _kv_lines(moves_into[j])
    for i in plan.removed:
        old = plan.current.pipelines[i]
        goes = sorted({plan.request_routes[r] for r, o in plan.request_origins.items() if o == i})
        to = f"; its requests go to pipeline {', '.join(map(str, goes))}" if goes else ""
        lines.append(f"  - pipeline {i} (current)  {old.describe()}  (removed{to})")
        for d in old.devices:
            if d in changes and d not in placed:
                lines += _device_lines(changes[d])
    return lines


def _device_lines(change: DeviceChange) -> list[str]:
    old, new = change.old_range, change.new_range
    if old is None and new is not None:
        head = f"+ {change.device}  layers {_inclusive(new)} (was spare)"
    elif new is None and old is not None:
        head = f"- {change.device}  layers {_inclusive(old)} -> spare"
    elif old is not None and new is not None:
        head = f"~ {change.device}  layers {_inclusive(old)} -> {_inclusive(new)}"
    else:
        head = f"~ {change.device}"
    lines = [f"      {head}"]
    for load in change.loads:
        lines.append(
            f"          {load.describe():<40}{_size(load.bytes):>11}{_duration(load.predicted_s):>9}"
        )
    if change.frees:
        words = [_part_words(f.part, f.start, f.end) for f in change.frees]
        text = "- free " + (
            ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]
        )
        lines.append(f"          {text:<40}{_size(sum(f.bytes for f in change.frees)):>11}")
    pools = (change.pool_blocks_before, change.pool_blocks_during, change.pool_blocks_after)
    if len(set(pools)) > 1:
        lines.append(
            f"          ~ kv pool {pools[0]} -> {pools[2]} blocks ({pools[1]} during the change)"
        )
    return lines


def _kv_lines(moves: list[KVMove]) -> list[str]:
    groups: dict[tuple[int, int, str, str], list[KVMove]] = defaultdict(list)
    for m in moves:
        groups[(m.start, m.end, m.src, m.dst)].append(m)
    lines = []
    for (start, end, src, dst), group in sorted(groups.items()):
        n = len({m.request_id for m in group})
        text = (
            f"~ kv  {n} request{'s' * (n != 1)}, layers {_inclusive((start, end))}: {src} -> {dst}"
        )
        lines.append(f"      {text:<44}{_size(sum(m.bytes for m in group)):>11}")
    return lines


def _stage_on(config: Configuration, device: str) -> StageConfig | None:
    found = config.stage_of(device)
    return None if found is None else found[1]


def _parts_of(rng: Range | None, footprint: ModelFootprint) -> Parts:
    return NOTHING if rng is None else footprint.parts(*rng)


def _part_words(part: str, start: int, end: int) -> str:
    if part == "layers":
        return f"layers {_inclusive((start, end))}"
    return "embedding" if part == "embed" else part


def _inclusive(rng: Range) -> str:
    """Returns [10, 15) as `10-14`."""
    return f"{rng[0]}-{rng[1] - 1}"


def _overlaps(a: Range | None, b: Range) -> bool:
    return a is not None and max(a[0], b[0]) < min(a[1], b[1])


def _runs(layers: list[int]) -> list[Range]:
    runs: list[Range] = []
    for layer in layers:
        if runs and runs[-1][1] == layer:
            runs[-1] = (runs[-1][0], layer + 1)
        else:
            runs.append((layer, layer + 1))
    return runs


def _mib_up(n_bytes: int) -> int:
    return math.ceil(n_bytes / MIB)


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= 10 * GIB else f"{n_bytes / MIB:.1f} MiB"


def _total_size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.2f} GiB" if n_bytes >= GIB / 10 else f"{n_bytes / MIB:.1f} MiB"


def _duration(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"
