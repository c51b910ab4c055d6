"""The workload monitor's sliding window: rates, length percentiles, load samples and SLO
attainment per pipeline, fed through the engine's request hook."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from agent.metrics import GatewayMetrics
from agent.workload_monitor import LoadSample, SloTargets, WorkloadMonitor, quantiles


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Seq:
    """The fields of agent.sequence.Sequence the hook reads."""

    prompt_ids: list[int]
    arrival_s: float
    output_ids: list[int] = field(default_factory=list)
    first_token_s: float | None = None
    pipeline_id: int | None = None
    aborted: bool = False


@dataclass
class Sched:
    waiting: list = field(default_factory=list)
    running: list = field(default_factory=list)
    used_blocks: int = 0
    capacity_blocks: int = 100


@dataclass
class Eng:
    scheduler: Sched = field(default_factory=Sched)
    request_hook: object = None


@pytest.fixture
def fed() -> tuple[WorkloadMonitor, Clock, Eng]:
    clock = Clock()
    monitor = WorkloadMonitor(window_s=10.0, slo=SloTargets(ttft_s=1.0, tpot_s=0.1), clock=clock)
    engine = Eng()
    assert monitor.attach(engine) and engine.request_hook == monitor.on_request
    return monitor, clock, engine


def serve(clock: Clock, engine: Eng, prompt: int, ttft_s: float, tpot_s: float, n_out: int, pipeline: int) -> None:
    seq = Seq(list(range(prompt)), arrival_s=clock.now, pipeline_id=pipeline)
    engine.request_hook("admitted", seq)
    seq.first_token_s = clock.now + ttft_s
    seq.output_ids = list(range(n_out))
    clock.now += ttft_s + tpot_s * (n_out - 1)
    engine.request_hook("finished", seq)


def test_window_figures_per_pipeline(fed) -> None:
    monitor, clock, engine = fed
    clock.now += 10  # a full window after start
    engine.scheduler.used_blocks, engine.scheduler.waiting = 50, [1, 2]
    serve(clock, engine, prompt=100, ttft_s=0.5, tpot_s=0.05, n_out=11, pipeline=0)  # meets both
    serve(clock, engine, prompt=300, ttft_s=2.0, tpot_s=0.05, n_out=11, pipeline=1)  # TTFT misses
    serve(clock, engine, prompt=200, ttft_s=0.5, tpot_s=0.5, n_out=3, pipeline=1)  # TPOT misses
    w = monitor.snapshot()
    assert w["arrivals"] == 3 and w["arrival_rate_per_s"] == pytest.approx(0.3)
    assert w["prompt_tokens"]["p50"] == 200 and w["prompt_tokens"]["p99"] == 300
    assert w["output_tokens"]["mean"] == pytest.approx(25 / 3)
    assert w["slo_attainment"] == pytest.approx(1 / 3)
    assert w["ttft_attainment"] == pytest.approx(2 / 3) and w["tpot_attainment"] == pytest.approx(2 / 3)
    assert w["queue_length"]["max"] == 2 and w["kv_use"]["last"] == pytest.approx(0.5)
    assert w["pipelines"]["0"]["slo_attainment"] == 1.0
    one = w["pipelines"]["1"]
    assert one["finished"] == 2 and one["slo_attainment"] == 0.0
    assert one["tpot_s"]["p99"] == pytest.approx(0.5) and one["ttft_s"]["p50"] == pytest.approx(0.5)


def test_old_requests_leave_the_window_and_failures_miss_the_slo(fed) -> None:
    monitor, clock, engine = fed
    serve(clock, engine, prompt=10, ttft_s=0.1, tpot_s=0.01, n_out=5, pipeline=0)
    clock.now += 20
    assert monitor.snapshot()["arrivals"] == 0 and monitor.snapshot()["slo_attainment"] is None
    seq = Seq([1, 2, 3], arrival_s=clock.now, pipeline_id=0, aborted=True)
    engine.request_hook("admitted", seq)
    engine.request_hook("finished", seq)  # aborted before its first token
    w = monitor.snapshot()
    assert w["failed"] == 1 and w["slo_attainment"] == 0.0 and w["output_tokens"]["mean"] is None


def test_the_planner_window_follows_the_mix(fed) -> None:
    monitor, clock, engine = fed
    clock.now += 10
    for _ in range(4):
        serve(clock, engine, prompt=400, ttft_s=0.2, tpot_s=0.05, n_out=9, pipeline=0)
    window = monitor.window()
    assert window.prompt.mean == 400 and window.output.mean == 9
    assert window.rate_per_s == pytest.approx(0.4)
    assert monitor.requests_in_window() == 4


def test_a_broken_request_never_raises_into_the_scheduler(fed) -> None:
    monitor, _, engine = fed
    engine.request_hook("finished", object())  # no fields at all: logged, not raised
    assert monitor.snapshot()["finished"] == 0


def test_metrics_expose_the_window(fed) -> None:
    monitor, clock, engine = fed
    clock.now += 10
    serve(clock, engine, prompt=100, ttft_s=0.5, tpot_s=0.05, n_out=11, pipeline=3)
    monitor.sample(LoadSample(clock.now, 4, 1, 25, 100))
    metrics = GatewayMetrics()
    metrics.watch_workload(monitor)
    text = metrics.render()[0].decode()
    assert "pipeshift_workload_arrival_rate 0.1" in text
    assert 'pipeshift_workload_prompt_tokens{quantile="0.9"} 100.0' in text
    assert 'pipeshift_workload_queue_length{stat="last"} 4.0' in text
    assert 'pipeshift_workload_kv_use_ratio{stat="last"} 0.25' in text
    assert 'pipeshift_workload_slo_attainment{pipeline="3",slo="all"} 1.0' in text
    assert 'pipeshift_workload_ttft_seconds{pipeline="3",quantile="0.5"} 0.5' in text


def test_quantiles_are_nearest_rank() -> None:
    q = quantiles(list(range(1, 101)))
    assert (q["p50"], q["p90"], q["p99"], q["mean"]) == (50, 90, 99, 50.5)
    assert quantiles([])["p50"] is None
    with pytest.raises(ValueError, match="positive"):
        WorkloadMonitor(window_s=0)
