"""/metrics after traffic: latency histograms, token and request counters, engine gauges."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from agent.metrics import GatewayMetrics
from tests.gateway.fake_engine import FakeEngine


def sample(text: str, name: str) -> float:
    """Returns the value of one exposition line `name value`."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


def test_metrics_after_requests(client: TestClient) -> None:
    client.post("/v1/completions", json={"prompt": "Hi"})
    client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    assert sample(text, "pipeshift_time_to_first_token_seconds_count") == 2
    # 4 tokens then 2 tokens: 3 + 1 gaps between consecutive tokens
    assert sample(text, "pipeshift_inter_token_latency_seconds_count") == 4
    assert sample(text, "pipeshift_e2e_request_latency_seconds_count") == 2
    assert 'pipeshift_time_to_first_token_seconds_bucket{le="+Inf"} 2.0' in text
    assert sample(text, "pipeshift_generated_tokens_total") == 6
    assert sample(text, "pipeshift_prompt_tokens_total") == 4
    assert sample(text, 'pipeshift_requests_total{finish_reason="stop"}') == 1
    assert sample(text, 'pipeshift_requests_total{finish_reason="length"}') == 1
    assert sample(text, "pipeshift_gateway_inflight_requests") == 0
    # read from engine.stats() at scrape time
    assert sample(text, "pipeshift_queue_length") == 3
    assert sample(text, "pipeshift_running_requests") == 2
    assert sample(text, 'pipeshift_stage_busy_seconds_total{stage="0"}') == 1.5
    assert sample(text, 'pipeshift_stage_busy_seconds_total{stage="1"}') == 2.25
    assert sample(text, 'pipeshift_engine_stat{key="kv_blocks_free"}') == 40


def test_engine_stats_are_read_at_scrape_time(client: TestClient, engine: FakeEngine) -> None:
    engine.stats_values["queue_length"] = 9
    assert sample(client.get("/metrics").text, "pipeshift_queue_length") == 9


def test_a_failing_stats_call_does_not_break_the_scrape(
    client: TestClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> dict[str, float]:
        raise RuntimeError("engine restarting")

    monkeypatch.setattr(engine, "stats", broken)
    r = client.get("/metrics")
    assert r.status_code == 200 and "pipeshift_time_to_first_token_seconds" in r.text


def test_request_timer_measures_from_event_arrival_times() -> None:
    metrics = GatewayMetrics()
    timer = metrics.start_request(arrival_s=10.0)
    timer.tokens(1, now_s=10.5)  # TTFT 0.5 s
    timer.tokens(2, now_s=10.7)  # two tokens in one event: two gaps of 0.1 s
    timer.tokens(0, now_s=10.8)  # an event without tokens measures nothing
    timer.finish("stop", now_s=11.0)
    timer.finish("stop", now_s=12.0)  # once only
    r = metrics.registry
    assert r.get_sample_value("pipeshift_time_to_first_token_seconds_sum") == pytest.approx(0.5)
    assert r.get_sample_value("pipeshift_inter_token_latency_seconds_count") == 2
    assert r.get_sample_value("pipeshift_inter_token_latency_seconds_sum") == pytest.approx(0.2)
    assert r.get_sample_value("pipeshift_e2e_request_latency_seconds_sum") == pytest.approx(1.0)
    assert r.get_sample_value("pipeshift_requests_total", {"finish_reason": "stop"}) == 1
    assert r.get_sample_value("pipeshift_generated_tokens_total") == 3
