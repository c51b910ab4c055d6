"""A dead or hung stage is found within seconds: its requests get an error, the gateway stays up."""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request

import pytest

from agent.engine import EngineConfig, PipelineEngine
from agent.gateway.app import create_app
from agent.gateway.server import ServerThread

pytestmark = pytest.mark.slow


@pytest.fixture
def served():
    engine = PipelineEngine(EngineConfig(n_devices=3, hang_timeout_s=3.0, ping_interval_s=0.5)).start()
    server = ServerThread(create_app(engine, aliases=["smollm2-135m"])).start()
    yield engine, server
    server.stop()
    engine.stop()


def _stream_until_error(base_url: str, on_first_chunk) -> tuple[int, dict | None, float]:
    """Streams a long completion; returns (text chunks seen, the error object, seconds after the fault)."""
    body = json.dumps({"model": "smollm2-135m", "prompt": "Once upon a time, in a small village,",
                       "max_tokens": 2000, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(f"{base_url}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    chunks, error, fault_at = 0, None, None
    with urllib.request.urlopen(req, timeout=60) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            obj = json.loads(line[6:])
            if "error" in obj:
                error = obj["error"]
                break
            chunks += 1
            if chunks == 3:
                on_first_chunk()
                fault_at = time.monotonic()
    assert fault_at is not None, f"the stream ended after {chunks} chunks, before the fault"
    return chunks, error, time.monotonic() - fault_at


def _get(url: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_dead_stage_fails_requests_and_gateway_stays_up(served):
    engine, server = served
    chunks, error, detect_s = _stream_until_error(server.base_url, lambda: engine.launcher.kill(1))
    assert error is not None, "the stream ended without reporting the dead stage"
    assert "stage 1" in error["message"]
    assert detect_s < 5.0
    status, body = _get(f"{server.base_url}/health")
    assert status == 503 and "stage 1" in json.dumps(body)
    assert _get(f"{server.base_url}/v1/models")[0] == 200  # the gateway itself still answers
    req = urllib.request.Request(
        f"{server.base_url}/v1/completions",
        data=json.dumps({"model": "smollm2-135m", "prompt": "hi", "max_tokens": 4}).encode(),
        headers={"Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as exc_info:
        urllib.request.urlopen(req, timeout=10)
    assert exc_info.value.code == 503
    assert "pipeline is down" in json.loads(exc_info.value.read())["error"]["message"]


def test_hung_stage_is_detected(served):
    engine, server = served
    pid = engine.launcher.pid(2)
    try:
        chunks, error, detect_s = _stream_until_error(server.base_url, lambda: os.kill(pid, signal.SIGSTOP))
    finally:
        os.kill(pid, signal.SIGCONT)
    assert error is not None and "stage 2" in error["message"]
    assert detect_s < 3.0 + 5.0  # hang timeout plus a ping interval and slack
