"""A request as the engine tracks it: its tokens, how far its KV is computed, its stream."""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.engine_api import SamplingParams, TokenEvent


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # admitted to the queue, no KV blocks yet
    RUNNING = "running"  # holds KV blocks on every stage
    FINISHED = "finished"


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[TokenEvent], None]  # thread-safe delivery to the request's stream
    arrival_s: float = field(default_factory=time.monotonic)
    output_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # positions whose KV is in the cache on every stage
    reserved_blocks: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    inflight: bool = False
    aborted: bool = False
    text: str = ""  # detokenised output so far (for stop strings)
    emitted_chars: int = 0  # how much of `text` has been sent to the client
    first_token_s: float | None = None
    pipeline_id: int | None = None  # where it runs
    footprint: frozenset[int] = frozenset()  # workers holding its reserved KV blocks
    held: bool = False  # a reconfiguration is moving it: no step until it is released
    index: int = 0  # its choice in the request (prompt position * n + member)
    # n > 1: member 0 of a prompt leads; the others are forked from it once its prompt is
    # prefilled (they share its KV blocks) and take no step of their own before that.
    forks: list[Sequence] = field(default_factory=list)  # the leader's members still to fork
    awaiting_fork: bool = False  # a member whose prompt KV is still its leader's to compute
    # Asked for with prompt_logprobs: [token, logprob, [[token, logprob], ...]] of prompt
    # positions 1, 2, ... as the prefill computes them.
    prompt_logprobs: list[list] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        """Whether more than the last token lacks KV: the prompt's prefill, or a catch-up
        after KV was dropped (a reconfiguration that fell back recomputes a few positions)."""
        return self.num_computed < self.num_tokens - 1

    def prompt_logprobs_wanted(self, start: int, end: int) -> dict | None:
        """Returns what a step over positions `[start, end)` asks the last stage for the
        prompt's logprobs (its rows q give prompt token q + 1's), or None. Each position is
        asked once, so a step that recomputes KV asks nothing again."""
        k = self.params.prompt_logprobs
        if k is None or self.output_ids:
            return None
        first, last = max(start, len(self.prompt_logprobs)), min(end, len(self.prompt_ids) - 1)
        if last <= first:
            return None
        return {"k": k, "skip": first - start, "targets": self.prompt_ids[first + 1:last + 1]}

    def next_chunk(self, max_tokens: int) -> tuple[int, list[int]]:
        """Returns (start position, token ids) of the next step: a chunk of the tokens whose KV
        is missing, or the last token alone."""
        tokens = self.prompt_ids + self.output_ids if self.output_ids else self.prompt_ids
        end = min(self.num_tokens, self.num_computed + max_tokens) if self.in_prefill else self.num_computed + 1
        return self.num_computed, tokens[self.num_computed : end]
