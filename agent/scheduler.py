"""Continuous batching: which requests run, and how they are cut into micro-batches.

Requests join and leave at token boundaries. A request is admitted only when every stage can
hold the KV of its whole prompt plus `max_tokens` (reserved up front, so a running request
is never evicted); otherwise it waits in arrival order. Running requests are spread over
`max_inflight` micro-batches so that every stage works while the others do.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass

from agent.sequence import Sequence, SequenceStatus


@dataclass
class MicroBatch:
    mb_id: int
    seqs: list[Sequence]
    start_pos: list[int]
    tokens: list[list[int]]

    @property
    def num_new(self) -> list[int]:
        return [len(t) for t in self.tokens]


class Scheduler:
    def __init__(self, capacity_blocks: int, block_size: int, max_context: int, max_inflight: int,
                 max_batch_size: int = 32, max_prefill_tokens: int = 512):
        self.capacity_blocks = capacity_blocks
        self.block_size = block_size
        self.max_context = max_context
        self.max_inflight = max_inflight
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.inflight: dict[int, MicroBatch] = {}
        self.used_blocks = 0
        self._mb_ids = itertools.count()

    def blocks_needed(self, prompt_tokens: int, max_tokens: int) -> int:
        return math.ceil(min(prompt_tokens + max_tokens, self.max_context) / self.block_size)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Moves waiting requests to running, in arrival order, while their KV fits."""
        admitted = []
        while self.waiting:
            seq = self.waiting[0]
            need = self.blocks_needed(len(seq.prompt_ids), seq.params.max_tokens)
            if self.used_blocks + need > self.capacity_blocks:
                break
            self.waiting.popleft()
            seq.reserved_blocks = need
            self.used_blocks += need
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            admitted.append(seq)
        return admitted

    def next_micro_batch(self) -> MicroBatch | None:
        """Returns the next micro-batch to send, or None when the pipeline is full or idle."""
        if len(self.inflight) >= self.max_inflight:
            return None
        ready = [s for s in self.running if not s.inflight]
        if not ready:
            return None
        target = min(self.max_batch_size, max(1, math.ceil(len(self.running) / self.max_inflight)))
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
        mb = MicroBatch(next(self._mb_ids), seqs, starts, tokens)
        self.inflight[mb.mb_id] = mb
        return mb

    def complete(self, mb_id: int) -> MicroBatch:
        """Marks a micro-batch done: its requests' new positions are now in the cache."""
        mb = self.inflight.pop(mb_id)
        for seq, n in zip(mb.seqs, mb.num_new, strict=True):
            seq.inflight = False
            seq.num_computed += n
        return mb

    def fail(self, mb_id: int) -> MicroBatch:
        mb = self.inflight.pop(mb_id)
        for seq in mb.seqs:
            seq.inflight = False
        return mb

    def finish(self, seq: Sequence) -> None:
        """Releases a request's reservation; the caller frees its blocks on the stages."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
            self.used_blocks -= seq.reserved_blocks
            seq.reserved_blocks = 0
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
