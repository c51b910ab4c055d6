"""Faults during a live reconfiguration (2 -> 3 stages onto a spare worker), real model, real
processes: the destination worker killed during prefetch, during KV pre-copy and right after
the switch, and the apply cancelled in each phase. Every request must complete with the text
it has without any change, and the deployment must serve in one consistent epoch afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from agent.engine import EngineConfig, PipelineEngine
from agent.gateway.app import create_app
from agent.gateway.server import ServerThread
from bench.streaming_load import prompt_token_ids, stream_completions
from planner.admin_client import AdminClient

pytestmark = pytest.mark.slow

PROMPT_LENGTHS = [64, 200, 400, 600]
MAX_TOKENS = 48
MAX_OVERHEAD = 0.25  # shorter applies (the default is 5 %); what is checked is correctness
OLD, NEW = "0:15,15:30", "0:10,10:20,20:30"
SPARE = 2  # the worker that only the new configuration uses


@pytest.fixture(scope="module")
def prompts(gguf_path):
    from agent.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(gguf_path)
    return [prompt_token_ids(tokenizer, n, seed=i) for i, n in enumerate(PROMPT_LENGTHS)]


def _serve() -> tuple[PipelineEngine, ServerThread]:
    engine = PipelineEngine(EngineConfig(n_devices=3, stages=[(0, 15), (15, 30)], ping_interval_s=0.2,
                                         hang_timeout_s=5.0)).start()
    return engine, ServerThread(create_app(engine, aliases=["smollm2-135m"])).start()


@pytest.fixture(scope="module")
def steady():
    """One deployment for the cases that leave it as it was (applies aborted before the switch):
    it serves OLD at epoch 1 throughout. Cases that kill a worker or switch get their own."""
    engine, server = _serve()
    yield engine, server
    server.stop()
    engine.stop()


@pytest.fixture(scope="module")
def unchanged_texts(prompts, steady):
    _, server = steady
    streams = asyncio.run(stream_completions(server.base_url, prompts, MAX_TOKENS))
    assert not any(s.error for s in streams)
    return [s.text for s in streams]


def _run_with_fault(prompts, act, served=None) -> tuple[list, dict, PipelineEngine, AdminClient, ServerThread]:
    """Streams the prompts; once all stream, applies NEW with `act(engine, record, phase, event)`
    called at each phase boundary; returns the streams, the finished record and the server
    (`served`, or a new one)."""
    engine, server = served or _serve()
    admin = AdminClient(server.base_url)
    started = threading.Event()
    result: dict = {}

    def observer(record, phase: str, event: str) -> None:
        act(engine, admin, record, phase, event)

    engine.reconfig.observers.append(observer)

    def reconfigure() -> None:
        started.wait(300)
        apply_id = admin.apply({"stages": NEW}, max_overhead=MAX_OVERHEAD)["id"]
        while (record := admin.get_apply(apply_id))["state"] != "done":
            time.sleep(0.05)
        result["record"] = record

    thread = threading.Thread(target=reconfigure)
    thread.start()
    try:
        streams = asyncio.run(stream_completions(
            server.base_url, prompts, MAX_TOKENS,
            on_progress=lambda s: started.set() if all(len(x.times) >= 2 for x in s) else None,
        ))
        thread.join()
    finally:
        engine.reconfig.observers.remove(observer)
    return streams, result["record"], engine, admin, server


def _check_consistent(engine: PipelineEngine, admin: AdminClient, epoch: int, stages: str) -> None:
    """The deployment serves `stages` at `epoch`, and no worker runs a loop of another wiring."""
    deployment = admin.deployment()
    assert deployment["epoch"] == epoch and deployment["healthy"]
    (pipeline,) = deployment["configuration"]["pipelines"]
    assert ",".join(f"{s['start']}:{s['end']}" for s in pipeline["stages"]) == stages
    wiring = f"e{engine.serving_pipelines()[0].epoch}/p{engine.serving_pipelines()[0].pipeline_id}"
    serving = {s["device"] for s in pipeline["stages"]}
    deadline = time.monotonic() + 10
    for w, info in engine.worker_info.items():
        if not info.alive:
            continue
        expected = [wiring] if f"worker-{w}" in serving else []
        while (wirings := engine.workers[w].call("ping")["wirings"]) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        assert wirings == expected, f"worker {w} runs {wirings}"


def _serves_a_new_request(server: ServerThread) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=120)
    done = client.completions.create(model="smollm2-135m", prompt="The capital of France is", max_tokens=4,
                                     temperature=0)
    assert done.choices[0].text


def _switched(record: dict) -> int:
    return next(p for p in record["phases"] if p["name"] == "switch").get("requests", 0)


def _assert_texts(streams, expected) -> None:
    for stream, text, n in zip(streams, expected, PROMPT_LENGTHS, strict=True):
        assert stream.error is None, stream.error
        assert stream.text == text, f"prompt of {n} tokens"


@pytest.mark.parametrize("phase, event, outcome", [
    ("prefetch", "begin", "aborted"),  # before the switch: nothing changed
    ("precopy", "begin", "aborted"),
    ("switch", "end", "rolled_back"),  # after it: requests go back to the old copies
])
def test_destination_killed_leaves_the_old_epoch_serving(prompts, unchanged_texts, phase, event, outcome):
    def act(engine, admin, record, at, when):
        if (at, when) == (phase, event):
            engine.launcher.kill(SPARE)
            engine.launcher.processes[SPARE].join(5)

    streams, record, engine, admin, server = _run_with_fault(prompts, act)
    try:
        assert record["outcome"] == outcome, record
        assert f"worker {SPARE}" in record["error"]
        if outcome == "rolled_back":  # the requests had moved, and came back
            assert _switched(record) == len(PROMPT_LENGTHS)
        _assert_texts(streams, unchanged_texts)
        _check_consistent(engine, admin, epoch=1, stages=OLD)
        _serves_a_new_request(server)
    finally:
        server.stop()
        engine.stop()


@pytest.mark.parametrize("phase, outcome", [
    ("prepare", "aborted"), ("prefetch", "aborted"), ("precopy", "aborted"),
    ("switch", "applied"), ("cleanup", "applied"),
])
def test_cancel_in_each_phase(prompts, unchanged_texts, phase, outcome, request):
    def act(engine, admin, record, at, event):
        if at == phase and event == "begin":
            admin.cancel(record.apply_id)

    shared = request.getfixturevalue("steady") if outcome == "aborted" else None
    streams, record, engine, admin, server = _run_with_fault(prompts, act, shared)
    try:
        assert record["outcome"] == outcome, record
        assert record["cancel_requested"]
        _assert_texts(streams, unchanged_texts)
        if outcome == "aborted":
            _check_consistent(engine, admin, epoch=1, stages=OLD)
        else:
            assert _switched(record) == len(PROMPT_LENGTHS)  # too late to cancel: they moved
            _check_consistent(engine, admin, epoch=2, stages=NEW)
        _serves_a_new_request(server)
    finally:
        if shared is None:
            server.stop()
            engine.stop()


def test_ctrl_c_of_pipeshift_apply_cancels_before_the_switch(prompts, unchanged_texts, steady):
    """The real CLI, interrupted with SIGINT during prefetch, asks the server to cancel."""
    cli: dict = {}

    def act(engine, admin, record, at, event):
        if at == "prefetch" and event == "begin":
            cli["proc"].send_signal(signal.SIGINT)

    engine, server = steady
    admin = AdminClient(server.base_url)

    def observer(record, at, event) -> None:
        act(engine, admin, record, at, event)

    engine.reconfig.observers.append(observer)
    started = threading.Event()

    def reconfigure() -> None:
        started.wait(300)
        cli["proc"] = subprocess.Popen(
            [sys.executable, "-m", "planner.cli", "apply", "--stages", NEW, "--server", server.base_url,
             "--auto-approve", "--max-overhead", str(MAX_OVERHEAD)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        cli["out"], _ = cli["proc"].communicate(timeout=300)

    thread = threading.Thread(target=reconfigure)
    thread.start()
    try:
        streams = asyncio.run(stream_completions(
            server.base_url, prompts, MAX_TOKENS,
            on_progress=lambda s: started.set() if all(len(x.times) >= 2 for x in s) else None,
        ))
        thread.join()
        assert cli["proc"].returncode == 1, cli["out"]
        assert "cancel" in cli["out"].lower() and "epoch 1 still serves" in cli["out"], cli["out"]
        _assert_texts(streams, unchanged_texts)
        _check_consistent(engine, admin, epoch=1, stages=OLD)
    finally:
        engine.reconfig.observers.remove(observer)
