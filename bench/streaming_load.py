"""Streaming load through the official `openai` client: prompts of chosen token lengths, every
chunk's arrival time kept. Used by bench/reconfig.py and by the live-reconfiguration tests.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence

from agent.stream_record import Stream

WORDS = (
    "the pipeline moves layers between devices while requests keep streaming and every token "
    "arrives once river mountain quiet engine garden signal copper window harbor lantern "
    "seventeen orbit meadow circuit falcon ember ledger violet thunder compass marble silver "
    "planet ocean forest bridge tower whisper candle mirror shadow winter summer autumn spring"
).split()


def prompt_token_ids(tokenizer, n_tokens: int, seed: int) -> list[int]:
    """Returns exactly `n_tokens` token ids of seeded pseudo-text (deterministic)."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n_tokens:
        sentence = " ".join(rng.choice(WORDS) for _ in range(12)).capitalize() + ". "
        ids.extend(tokenizer.encode(sentence))
    return ids[:n_tokens]


async def stream_completions(
    base_url: str,
    prompts: Sequence[list[int]],
    max_tokens: int,
    model: str = "smollm2-135m",
    on_progress: Callable[[list[Stream]], None] | None = None,
    ignore_eos: bool = True,
) -> list[Stream]:
    """Streams one greedy completion per prompt (token ids) at once; returns them in order."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=1800)
    streams = [Stream(len(p)) for p in prompts]

    async def one(prompt: list[int], stream: Stream) -> None:
        stream.started_s = time.monotonic()
        try:
            response = await client.completions.create(
                model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": ignore_eos},
            )
            async for chunk in response:
                if chunk.usage is not None:
                    stream.completion_tokens = chunk.usage.completion_tokens
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.text:
                    stream.text += choice.text
                    stream.times.append(time.monotonic())
                    if on_progress is not None:
                        on_progress(streams)
                stream.finish_reason = choice.finish_reason or stream.finish_reason
        except Exception as exc:  # the caller asserts on it
            stream.error = f"{type(exc).__name__}: {exc}"

    try:
        await asyncio.gather(*(one(p, s) for p, s in zip(prompts, streams, strict=True)))
    finally:
        await client.close()
    return streams
