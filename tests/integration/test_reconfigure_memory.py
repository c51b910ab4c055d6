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
from planner.cli import main

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


def test_requests_whose_kv_cannot_stay_through_the_change_recompute_it_and_stream_on(prompts):
    """0:15,15:30 -> 0:25,25:30 at a 400 MiB budget leaves worker-0 a pool of 57 blocks during
    the change, and the three streams reserve 78: plain, the apply is refused; with
    `recompute_overflow` (`pipeshift apply --recompute-overflow`) the requests cheapest to
    recompute drop their KV, wait at the head of the queue and prefill again, and every stream
    ends with the text it has without a change."""
    max_tokens = 120
    engine, server = _serve()
    admin = AdminClient(server.base_url)
    try:
        control = asyncio.run(stream_completions(server.base_url, prompts, max_tokens))
        started = threading.Event()
        result: dict = {}

        def stream() -> None:  # in the background: the CLI wants the main thread (its signals)
            result["live"] = asyncio.run(stream_completions(
                server.base_url, prompts, max_tokens,
                on_progress=lambda s: started.set() if all(len(x.times) >= 2 for x in s) else None,
            ))

        thread = threading.Thread(target=stream)
        thread.start()
        assert started.wait(300)
        result["plain"] = admin.plan({"stages": "0:25,25:30"})
        result["dry"] = admin.plan({"stages": "0:25,25:30"}, recompute_overflow=True)
        # as an operator does it: `pipeshift apply ... --recompute-overflow`
        result["rc"] = main(["apply", "--server", server.base_url, "--stages", "0:25,25:30",
                             "--recompute-overflow", "--auto-approve"])
        result["record"] = admin.wait(admin.applies()[-1]["id"])
        thread.join()
        live = result["live"]
        plain, dry, record = result["plain"], result["dry"], result["record"]
        assert result["rc"] == 0
        assert not plain["feasible"] and "recompute their KV (--recompute-overflow)" in plain["text"]
        assert dry["feasible"], dry["text"]
        assert len(dry["plan"]["recompute"]) == 2 and "-/+ recompute 2 requests' KV" in dry["text"]
        assert record["outcome"] == "applied", record["error"]
        assert next(p for p in record["phases"] if p["name"] == "prepare")["recomputed"] == 2
        assert not any(s.error for s in control + live), [s.error for s in control + live]
        assert all(s.completion_tokens == max_tokens for s in live)
        assert [s.text for s in live] == [s.text for s in control]
        after = {d["name"]: d["held_layers"] for d in admin.deployment()["devices"]}
        assert after["worker-0"] == list(range(25)) and after["worker-1"] == list(range(25, 30))
    finally:
        server.stop()
        engine.stop()
