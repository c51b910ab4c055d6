"""The real engine: spare devices, and a client leaving mid-stream frees its KV blocks."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.engine import EngineConfig, PipelineEngine
from agent.engine_api import SamplingParams

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def engine():
    engine = PipelineEngine(EngineConfig(n_devices=3, stages=[(0, 16), (16, 30)])).start()
    yield engine
    engine.stop()


def test_devices_beyond_the_stages_start_idle_as_spares(engine):
    assert [(s.start, s.end) for s in engine.stages] == [(0, 16), (16, 30)]
    assert engine.launcher.exit_codes() == {0: None, 1: None, 2: None}  # the spare runs too
    assert engine.health()[0]


def test_client_leaving_mid_stream_frees_its_kv_blocks(engine):
    prompt = engine.encode_prompt("Once upon a time, in a small village,")

    async def leave_after(n_events: int) -> int:
        stream = engine.generate("leaver", prompt, SamplingParams(max_tokens=500, temperature=0))
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == n_events:
                break
        await stream.aclose()
        return seen

    assert asyncio.run(leave_after(3)) == 3
    deadline = time.monotonic() + 10
    while engine.stats()["kv_blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.stats()["kv_blocks_used"] == 0
    assert engine.stats()["running"] == 0
    # ...and on the workers themselves: every stage's free list is whole again.
    for stage in engine.stages:
        while time.monotonic() < deadline:
            free = engine.workers[stage.worker_id].call("ping")["free_blocks"]
            if free == engine.worker_info[stage.worker_id].num_blocks:
                break
            time.sleep(0.05)
        assert free == engine.worker_info[stage.worker_id].num_blocks

    async def full() -> str:
        parts = []
        async for ev in engine.generate("after", prompt, SamplingParams(max_tokens=8, temperature=0)):
            parts.append(ev.text)
        return "".join(parts)

    assert len(asyncio.run(full())) > 0  # the pipeline keeps serving
