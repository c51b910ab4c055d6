"""A scripted stand-in for the pipeline engine: fixed tokens, recorded calls and aborts."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from agent.engine_api import EngineError, SamplingParams, TokenEvent, TokenLogprob, prompt_batch

SCRIPT = ("Hello", ",", " world", "!")


@dataclass
class FakeEngine:
    """Each character of a prompt is one token, so prompt lengths are easy to aim at; token t
    reads back as chr(t)."""

    model_name: str = "fake-model"
    max_context: int = 64
    script: tuple[str, ...] = SCRIPT
    delay_s: float = 0.0
    error_at: int | None = None  # index of the event that reports finish_reason "error"
    error: str = "stage 1 worker died"  # what it reports
    refuse: EngineError | None = None  # raised before the first event
    healthy: tuple[bool, str] = (True, "")
    stats_values: dict[str, float] = field(
        default_factory=lambda: {
            "queue_length": 3,
            "running": 2,  # the key agent/engine.py reports
            "stage_busy_s.0": 1.5,
            "stage_busy_s.1": 2.25,
            "kv_blocks_free": 40,
        }
    )
    calls: list[tuple[str, list[int], SamplingParams]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    events_sent: int = 0
    abort_seen: threading.Event = field(default_factory=threading.Event)
    kv_tokens: int | None = None  # what the KV cache holds for one request (None: the context)

    @property
    def max_model_len(self) -> int:
        return min(self.max_context, self.kv_tokens or self.max_context)
    chats: list[list[dict[str, str]]] = field(default_factory=list)

    def encode_prompt(self, prompt: str) -> list[int]:
        return [ord(c) % 256 for c in prompt]

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        self.chats.append(messages)
        return [t for m in messages for t in [1, *self.encode_prompt(m["content"])]]

    def decode(self, token_ids: list[int]) -> str:
        return "".join(chr(t) for t in token_ids)

    async def generate(
        self, request_id: str, prompt_ids: list[int] | list[list[int]], params: SamplingParams
    ) -> AsyncIterator[TokenEvent]:
        """Plays the script for every choice in turn (prompt by prompt, n each)."""
        self.calls.append((request_id, prompt_ids, params))
        if self.refuse is not None:
            raise self.refuse
        batch = prompt_batch(prompt_ids)
        finished = False
        try:
            for index in range(len(batch) * params.n):
                prompt = batch[index // params.n]
                finished = False
                async for event in self._choice(index, prompt, params):
                    finished = event.finish_reason is not None
                    yield event
                    if event.finish_reason == "error":
                        return
        finally:
            if not finished:  # closed early: the real engine aborts and frees the KV here
                self.aborted.append(request_id)
                self.abort_seen.set()

    async def _choice(self, index: int, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[TokenEvent]:
        for i, piece in enumerate(self.script):
            await asyncio.sleep(self.delay_s)
            if i == self.error_at:
                yield TokenEvent(finish_reason="error", error=self.error, index=index)
                return
            n = i + 1
            reason = (
                "stop"
                if n == len(self.script)
                else "length"
                if n == params.max_tokens
                else None
            )
            self.events_sent += 1
            prompt_logprobs = None
            if i == 0 and params.prompt_logprobs is not None:
                prompt_logprobs = [TokenLogprob(prompt_ids[0], chr(prompt_ids[0]), None)] + [
                    TokenLogprob(t, chr(t), -0.5, ((t, chr(t), -0.5),)) for t in prompt_ids[1:]
                ]
            yield TokenEvent(
                token_ids=[100 + i],
                text=piece,
                logprobs=None if params.logprobs is None else [fake_logprob(i, piece, params.logprobs)],
                finish_reason=reason,
                prompt_tokens=len(prompt_ids),
                completion_tokens=n,
                index=index,
                prompt_logprobs=prompt_logprobs,
            )
            if reason is not None:
                return

    def health(self) -> tuple[bool, str]:
        return self.healthy

    def stats(self) -> dict[str, float]:
        return dict(self.stats_values)


def fake_logprob(i: int, piece: str, top: int) -> TokenLogprob:
    """Token i of the script has logprob -(i + 1) / 4; its alternatives are "alt0", "alt1", ..."""
    alternatives = [(100 + i, piece, -(i + 1) / 4)] + [(j, f"alt{j}", -1.0 - j) for j in range(top - 1)]
    return TokenLogprob(100 + i, piece, -(i + 1) / 4, tuple(alternatives[:top]))
