"""Continuous batching over one or more pipelines: which requests run where, in which micro-batch.

Requests join and leave at token boundaries. A request is admitted to a pipeline only when
every worker it would occupy can hold the KV of its whole prompt plus `max_tokens` (reserved
up front, so a running request is never evicted); otherwise it waits in arrival order. Among
the pipelines that can take it, it goes to the least loaded (by the fraction of KV blocks
reserved on its workers, then by running requests). Each pipeline spreads its running
requests over `max_inflight` micro-batches so that every stage works while the others do.

Blocks are counted per worker, not per pipeline: while a reconfiguration moves a request, it
occupies the workers of its old pipeline and of its new one (its `footprint`), and a worker
may be shared by an old pipeline and a new one.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from agent.sequence import Sequence, SequenceStatus


@dataclass
class MicroBatch:
    mb_id: int
    seqs: list[Sequence]
    start_pos: list[int]
    tokens: list[list[int]]
    pipeline_id: int = 0
    forks: dict[str, list[Sequence]] = field(default_factory=dict)  # leader -> members forked by this step

    @property
    def num_new(self) -> list[int]:
        return [len(t) for t in self.tokens]


@dataclass
class PipelineSlot:
    """The scheduler's view of one pipeline."""

    pipeline_id: int
    workers: tuple[int, ...]
    max_inflight: int
    admitting: bool = True
    # Workers a request admitted here also occupies (a reconfiguration's destination).
    extra_footprint: frozenset[int] = frozenset()
    running: list[Sequence] = field(default_factory=list)
    inflight: set[int] = field(default_factory=set)

    @property
    def footprint(self) -> frozenset[int]:
        return frozenset(self.workers) | self.extra_footprint


class Scheduler:
    def __init__(self, block_size: int, max_context: int, max_batch_size: int = 32,
                 max_prefill_tokens: int = 512, capacity_blocks: int | None = None,
                 max_inflight: int = 1):
        """With `capacity_blocks`, starts with one pipeline (id 0) on one worker (id 0)."""
        self.block_size = block_size
        self.max_context = max_context
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.pipelines: dict[int, PipelineSlot] = {}
        self.worker_capacity: dict[int, int] = {}
        self.worker_used: dict[int, int] = {}
        self.inflight: dict[int, MicroBatch] = {}
        self._mb_ids = itertools.count()
        if capacity_blocks is not None:
            self.set_worker_capacity(0, capacity_blocks)
            self.add_pipeline(0, (0,), max_inflight)

    # ---- pipelines and workers ----------------------------------------------------------
    def add_pipeline(self, pipeline_id: int, workers: Iterable[int], max_inflight: int,
                     admitting: bool = True) -> PipelineSlot:
        slot = PipelineSlot(pipeline_id, tuple(workers), max_inflight, admitting)
        self.pipelines[pipeline_id] = slot
        return slot

    def remove_pipeline(self, pipeline_id: int) -> None:
        slot = self.pipelines[pipeline_id]
        if slot.running or slot.inflight:
            raise RuntimeError(f"pipeline {pipeline_id} still has {len(slot.running)} requests")
        del self.pipelines[pipeline_id]

    def set_worker_capacity(self, worker: int, blocks: int) -> None:
        """Sets how many blocks `worker` holds; raises ValueError below what is reserved."""
        used = self.worker_used.get(worker, 0)
        if blocks < used:
            raise ValueError(f"worker {worker}: {used} KV blocks are reserved; cannot hold only {blocks}")
        self.worker_capacity[worker] = blocks
        self.worker_used.setdefault(worker, 0)

    def free_blocks(self, worker: int) -> int:
        return self.worker_capacity.get(worker, 0) - self.worker_used.get(worker, 0)

    def fits(self, workers: Iterable[int], blocks: int) -> bool:
        return all(self.free_blocks(w) >= blocks for w in workers)

    @property
    def running(self) -> list[Sequence]:
        return [s for slot in self.pipelines.values() for s in slot.running]

    @property
    def used_blocks(self) -> int:
        return sum(s.reserved_blocks for s in self.running)

    @property
    def capacity_blocks(self) -> int:
        """The most blocks one request can ever reserve: the largest pipeline's smallest worker."""
        return max(
            (min(self.worker_capacity.get(w, 0) for w in slot.workers) for slot in self.pipelines.values()),
            default=0,
        )

    def blocks_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        return math.ceil(min(prompt_tokens + max_tokens, self.max_context) / self.block_size)

    # ---- admission ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Moves waiting requests to running, in arrival order, while their KV fits somewhere.

        A leader comes in with the members still to fork from it, on the same pipeline. Each
        member reserves as much as a request of its own: the blocks they share are counted
        once per member, because a reconfiguration moves each member's KV on its own."""
        admitted = []
        while self.waiting:
            seq = self.waiting[0]
            need = self.blocks_needed(len(seq.prompt_ids), seq.params.max_tokens)
            group = [seq, *self.fork_group(seq)]
            slot = self._least_loaded(need * len(group))
            if slot is None:
                break
            self.waiting.popleft()
            if seq.awaiting_fork:  # back in the queue alone (a roll-back): it prefills itself
                seq.awaiting_fork = False
            for member in group:
                member.reserved_blocks = need
                member.status = SequenceStatus.RUNNING
                self._occupy(member, slot.footprint)
                member.pipeline_id = slot.pipeline_id
                slot.running.append(member)
                admitted.append(member)
        return admitted

    def fork_group(self, leader: Sequence) -> list[Sequence]:
        """Returns the members still to fork from `leader` that wait for it, not in the queue."""
        return [m for m in leader.forks
                if m.awaiting_fork and m.status is SequenceStatus.WAITING and m not in self.waiting]

    def _least_loaded(self, need: int) -> PipelineSlot | None:
        candidates = [s for s in self.pipelines.values() if s.admitting and self.fits(s.footprint, need)]
        if not candidates:
            return None

        def load(slot: PipelineSlot) -> tuple[float, int, int]:
            used = max(self.worker_used[w] / max(1, self.worker_capacity[w]) for w in slot.workers)
            return used, len(slot.running), slot.pipeline_id

        return min(candidates, key=load)

    def _occupy(self, seq: Sequence, workers: Iterable[int]) -> None:
        for w in set(workers) - seq.footprint:
            self.worker_used[w] = self.worker_used.get(w, 0) + seq.reserved_blocks
        seq.footprint = seq.footprint | frozenset(workers)

    def occupy(self, seq: Sequence, workers: Iterable[int]) -> None:
        """Reserves `seq`'s blocks on more workers too; raises ValueError if one lacks room."""
        new = set(workers) - seq.footprint
        short = [w for w in new if self.free_blocks(w) < seq.reserved_blocks]
        if short:
            raise ValueError(
                f"request {seq.request_id} needs {seq.reserved_blocks} KV blocks on worker {short[0]}, "
                f"which has {self.free_blocks(short[0])} free"
            )
        self._occupy(seq, new)

    def vacate(self, seq: Sequence, workers: Iterable[int]) -> None:
        """Releases `seq`'s reservation on `workers`."""
        for w in set(workers) & seq.footprint:
            self.worker_used[w] -= seq.reserved_blocks
        seq.footprint = seq.footprint - frozenset(workers)

    def unadmit(self, seq: Sequence) -> None:
        """Takes a running request off its pipeline and releases its reservation: it waits
        again, without KV, to be queued by the caller; admitted again, it recomputes every
        position from its tokens (its blocks on the stages are the caller's to free)."""
        self.pipelines[seq.pipeline_id].running.remove(seq)
        self.vacate(seq, seq.footprint)
        seq.status, seq.reserved_blocks, seq.pipeline_id = SequenceStatus.WAITING, 0, None
        seq.num_computed, seq.held = 0, False

    def move(self, seq: Sequence, pipeline_id: int) -> None:
        """Makes `seq` run on another pipeline (its footprint is the caller's business)."""
        self.pipelines[seq.pipeline_id].running.remove(seq)
        self.pipelines[pipeline_id].running.append(seq)
        seq.pipeline_id = pipeline_id

    # ---- micro-batches ------------------------------------------------------------------
    def next_micro_batch(self, pipeline_id: int | None = None) -> MicroBatch | None:
        """Returns the pipeline's next micro-batch to send, or None when it is full or idle."""
        if pipeline_id is None:
            pipeline_id = next(iter(self.pipelines))
        slot = self.pipelines[pipeline_id]
        if len(slot.inflight) >= slot.max_inflight:
            return None
        ready = [s for s in slot.running if not s.inflight and not s.held and not s.awaiting_fork]
        if not ready:
            return None
        target = min(self.max_batch_size, max(1, math.ceil(len(slot.running) / slot.max_inflight)))
        seqs, starts, tokens = [], [], []
        prefill_budget = self.max_prefill_tokens
        for seq in ready:
            if len(seqs) == target:
                break
            if seq.in_prefill:
                if prefill_budget <= 0:
                    continue
                start, chunk = seq.next_chunk(prefill_budget)
                prefill_budget -= len(chunk)
            else:
                start, chunk = seq.next_chunk(1)
            seqs.append(seq)
            starts.append(start)
            tokens.append(chunk)
            seq.inflight = True
        if not seqs:
            return None
        mb = MicroBatch(next(self._mb_ids), seqs, starts, tokens, pipeline_id)
        self.inflight[mb.mb_id] = mb
        slot.inflight.add(mb.mb_id)
        return mb

    def complete(self, mb_id: int) -> MicroBatch:
        """Marks a micro-batch done: its requests' new positions are now in the cache."""
        mb = self._pop(mb_id)
        for seq, n in zip(mb.seqs, mb.num_new, strict=True):
            seq.inflight = False
            seq.num_computed += n
        return mb

    def fail(self, mb_id: int) -> MicroBatch:
        mb = self._pop(mb_id)
        for seq in mb.seqs:
            seq.inflight = False
        return mb

    def _pop(self, mb_id: int) -> MicroBatch:
        mb = self.inflight.pop(mb_id)
        slot = self.pipelines.get(mb.pipeline_id)
        if slot is not None:
            slot.inflight.discard(mb_id)
        return mb

    def finish(self, seq: Sequence) -> None:
        """Releases a request's reservation; the caller frees its blocks on the stages."""
        if seq.status is SequenceStatus.RUNNING:
            slot = self.pipelines.get(seq.pipeline_id)
            if slot is not None and seq in slot.running:
                slot.running.remove(seq)
            self.vacate(seq, seq.footprint)
            seq.reserved_blocks = 0
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
