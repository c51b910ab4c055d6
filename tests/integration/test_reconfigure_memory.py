"""Live reconfiguration on workers whose memory budget is full: a worker that gains layers
shrinks its KV pool to make room, one that loses layers grows it, while requests stream; a
target that cannot fit is refused before anything moves, with the numbers."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agent.engine import EngineConfig, PipelineEngine
from agent.gateway.app import create_app
from agent.gateway.server import ServerThread
from bench.streaming_load import prompt_token_ids, stream_completions
from planner.admin_client import AdminClient, AdminError

pytestmark = pytest.mark.slow

BUDGET_MIB = 400  # weights of 15 layers plus head is ~316 MiB: the pool fills the rest
PROMPT_LENGTHS = [64, 300, 500]
MAX_TOKENS = 60


def _serve() -> tuple[PipelineEngine, ServerThread]:
    engine = PipelineEngine(EngineConfig(n_devices=3, stages=[(0, 15), (15, 30)], memory_budget_bytes=BUDGET_MIB << 20,
                                         kv_cache_bytes=4096 << 20)).start()
    return engine, ServerThread(create_app(engine, aliases=["smollm2-135m"])).start()


@pytest.fixture(scope="module")
def prompts(gguf_path):
    from agent.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(gguf_path)
    return [prompt_token_ids(tokenizer, n, seed=40 + i) for i, n in enumerate(PROMPT_LENGTHS)]


def test_pools_shrink_and_grow_in_place_within_the_budget(prompts):
    engine, server = _serve()
    admin = AdminClient(server.base_url)
    try:
        control = asyncio.run(stream_completions(server.base_url, prompts, MAX_TOKENS))
        before = {d["name"]: d["kv_blocks"] for d in admin.deployment()["devices"]}
        started = threading.Event()
        result: dict = {}

        def reconfigure() -> None:
            started.wait(300)
            dry = admin.plan({"stages": "0:20,20:30"})
            result["text"] = dry["text"]
            result["record"] = admin.wait(admin.apply({"stages": "0:20,20:30"})["id"])

        thread = threading.Thread(target=reconfigure)
        thread.start()
        live = asyncio.run(stream_completions(
            server.base_url, prompts, MAX_TOKENS,
            on_progress=lambda s: started.set() if all(len(x.times) >= 2 for x in s) else None,
        ))
        thread.join()
        record = result["record"]
        assert record["outcome"] == "applied", record["error"]
        assert not any(s.error for s in control + live), [s.error for s in control + live]
        assert all(s.completion_tokens == MAX_TOKENS for s in live)
        assert [s.text for s in live] == [s.text for s in control]
        assert next(p for p in record["phases"] if p["name"] == "switch")["requests"] == len(PROMPT_LENGTHS)
        assert "kv pool" in result["text"]
        after = {d["name"]: (d["kv_blocks"], d["held_layers"]) for d in admin.deployment()["devices"]}
        gained, lost = after["worker-0"], after["worker-1"]
        assert gained[1] == list(range(20)) and gained[0] < before["worker-0"]  # 15 -> 20 layers: fewer blocks
        assert lost[1] == list(range(20, 30)) and lost[0] > before["worker-1"]  # 15 -> 10 layers: more blocks
        part = engine.part_bytes
        for w, (weights, layers) in {0: (20 * part["layer"] + part["embed"], 20),
                                      1: (10 * part["layer"] + part["head"], 10)}.items():
            pool = after[f"worker-{w}"][0] * engine.config.block_size * engine.kv_bytes_per_token_per_layer * layers
            assert weights + pool <= BUDGET_MIB << 20, f"worker {w} holds more than its budget"
        # What operators watch: /health names the epoch, /metrics the apply.
        import json
        import urllib.request

        with urllib.request.urlopen(f"{server.base_url}/health", timeout=10) as answer:
            assert json.loads(answer.read()) == {"status": "ok", "epoch": 2}
        with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as answer:
            metrics = answer.read().decode()
        assert "pipeshift_epoch 2.0" in metrics
        assert 'pipeshift_applies_total{outcome="applied"} 1.0' in metrics
        assert 'pipeshift_apply_phase_seconds_count{phase="prefetch"} 1.0' in metrics
        moved = next(line for line in metrics.splitlines() if line.startswith("pipeshift_apply_bytes_moved_total"))
        assert float(moved.split()[-1]) == record["measured"]["bytes_moved"] > 0
    finally:
        server.stop()
        engine.stop()


def test_a_target_that_cannot_fit_is_refused_with_the_numbers():
    engine, server = _serve()
    admin = AdminClient(server.base_url)
    try:
        dry = admin.plan({"stages": "0:30"})  # all 30 layers, embedding and head on one worker
        assert not dry["feasible"]
        assert "MiB" in dry["text"] and "--memory-budget" in dry["text"]
        with pytest.raises(AdminError) as refused:
            admin.apply({"stages": "0:30"})
        assert refused.value.status == 409
        assert "--memory-budget" in str(refused.value)
        assert admin.deployment()["epoch"] == 1  # nothing moved
        assert [d["held_layers"] for d in admin.deployment()["devices"]] == [list(range(15)), list(range(15, 30)), []]
    finally:
        server.stop()
        engine.stop()
