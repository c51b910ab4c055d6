"""Prometheus metrics of the serving path, on one registry per gateway app.

Latencies are measured at the gateway from the arrival times of engine events, which is what
a client sees; queue length, running requests and per-stage busy time are read from
`Engine.stats()` at scrape time, so they are never stale and cost nothing between scrapes.
Tokens per second is `rate(pipeshift_generated_tokens_total[1m])`; a stage's busy fraction is
`rate(pipeshift_stage_busy_seconds_total[1m])`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from agent.token_log import TokenLog

logger = logging.getLogger(__name__)

# Keys of Engine.stats() read here. The first name of each tuple is the one agent/engine.py
# reports; the others are accepted so that a differently written engine still shows up.
QUEUE_LENGTH_KEYS = ("queue_length", "num_waiting")
RUNNING_REQUESTS_KEYS = ("running", "running_requests", "num_running")
STAGE_BUSY_PREFIX = "stage_busy_s."  # cumulative busy seconds of stage i: "stage_busy_s.<i>"

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1, 2.5, 5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class EngineStatsCollector(Collector):
    """Turns one `Engine.stats()` call per scrape into gauges and counters."""

    def __init__(self, stats: Callable[[], Mapping[str, float]]):
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            stats = dict(self._stats())
        except Exception:  # a scrape must not fail because the engine is mid-restart
            logger.exception("engine.stats() failed during a metrics scrape")
            return
        for name, keys, doc in (
            ("pipeshift_queue_length", QUEUE_LENGTH_KEYS, "Requests waiting in the engine."),
            ("pipeshift_running_requests", RUNNING_REQUESTS_KEYS, "Requests being decoded."),
        ):
            value = next((stats[k] for k in keys if k in stats), None)
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=float(value))
        busy = CounterMetricFamily(
            "pipeshift_stage_busy_seconds",
            "Seconds each pipeline stage spent computing since the engine started.",
            labels=["stage"],
        )
        others = GaugeMetricFamily(
            "pipeshift_engine_stat", "Any other number Engine.stats() reports.", labels=["key"]
        )
        known = {*QUEUE_LENGTH_KEYS, *RUNNING_REQUESTS_KEYS}
        for key, value in sorted(stats.items()):
            if key.startswith(STAGE_BUSY_PREFIX):
                busy.add_metric([key.removeprefix(STAGE_BUSY_PREFIX)], float(value))
            elif key not in known:
                others.add_metric([key], float(value))
        if busy.samples:
            yield busy
        if others.samples:
            yield others


class ApplyCollector(Collector):
    """Reconfigurations at scrape time: the epoch, applies by outcome, phase durations, bytes
    moved and the stall of each apply's switch (`applies` is agent.reconfigurations.Reconfigurations)."""

    def __init__(self, applies: Any):
        self._applies = applies

    def collect(self) -> Iterator[Metric]:
        records = [r for r in self._applies.history() if r.state == "done"]
        yield GaugeMetricFamily("pipeshift_epoch", "The epoch (configuration) serving now.",
                                value=float(self._applies.engine.epoch))
        outcomes = CounterMetricFamily("pipeshift_applies", "Finished applies by outcome.", labels=["outcome"])
        for outcome in ("applied", "aborted", "rolled_back", "failed"):
            outcomes.add_metric([outcome], float(sum(r.outcome == outcome for r in records)))
        yield outcomes
        phases = SummaryMetricFamily("pipeshift_apply_phase_seconds", "Duration of each apply phase.",
                                     labels=["phase"])
        for name in ("prepare", "prefetch", "precopy", "switch", "cleanup"):
            took = [p.measured_s for r in records if (p := r.phases[name]).ended_at is not None]
            phases.add_metric([name], count_value=len(took), sum_value=float(sum(took)))
        yield phases
        yield CounterMetricFamily("pipeshift_apply_bytes_moved", "Weight and KV bytes moved by applies.",
                                  value=float(sum(r.bytes_moved for r in records)))
        stalls = [r.stall_ms / 1000 for r in records if r.stall_ms is not None]
        yield SummaryMetricFamily("pipeshift_apply_stall_seconds",
                                  "Longest time a request was held at an apply's switch.",
                                  count_value=len(stalls), sum_value=float(sum(stalls)))
        if stalls:
            yield GaugeMetricFamily("pipeshift_apply_last_stall_seconds",
                                    "The last apply's longest hold at its switch.", value=stalls[-1])


class WorkloadCollector(Collector):
    """The workload monitor's sliding window at scrape time (agent/workload_monitor.py):
    arrival rate, prompt and output length percentiles, queue length, KV use, and SLO
    attainment with TTFT/TPOT percentiles per pipeline."""

    def __init__(self, monitor: Any):
        self._monitor = monitor

    def collect(self) -> Iterator[Metric]:
        w = self._monitor.snapshot()
        yield GaugeMetricFamily("pipeshift_workload_window_seconds", "Length of the workload window.",
                                value=float(w["seconds"]))
        yield GaugeMetricFamily("pipeshift_workload_arrival_rate", "Requests admitted per second over the window.",
                                value=float(w["arrival_rate_per_s"]))
        for name, key, doc in (
            ("pipeshift_workload_prompt_tokens", "prompt_tokens", "Prompt length over the window."),
            ("pipeshift_workload_output_tokens", "output_tokens", "Output length of requests finished in the window."),
        ):
            yield _quantile_gauge(name, doc, w[key])
        for name, key, doc in (
            ("pipeshift_workload_queue_length", "queue_length", "Requests waiting, sampled at every admission and finish."),
            ("pipeshift_workload_kv_use_ratio", "kv_use", "Share of KV blocks reserved, sampled likewise."),
        ):
            g = GaugeMetricFamily(name, doc + " (stat: mean, max, last over the window)", labels=["stat"])
            for stat, value in w[key].items():
                if value is not None:
                    g.add_metric([stat], float(value))
            yield g
        attainment = GaugeMetricFamily(
            "pipeshift_workload_slo_attainment",
            "Share of requests finished in the window that met the SLO (slo: ttft, tpot, all); "
            'pipeline="all" for the deployment.', labels=["pipeline", "slo"])
        ttft = GaugeMetricFamily("pipeshift_workload_ttft_seconds", "TTFT per pipeline over the window.",
                                 labels=["pipeline", "quantile"])
        tpot = GaugeMetricFamily("pipeshift_workload_tpot_seconds", "TPOT per pipeline over the window.",
                                 labels=["pipeline", "quantile"])
        for pipeline, figures in [("all", w), *w["pipelines"].items()]:
            for slo, key in (("ttft", "ttft_attainment"), ("tpot", "tpot_attainment"), ("all", "slo_attainment")):
                if figures[key] is not None:
                    attainment.add_metric([pipeline, slo], float(figures[key]))
            for family, key in ((ttft, "ttft_s"), (tpot, "tpot_s")):
                for q, value in figures.get(key, {}).items():
                    if value is not None and q != "mean":
                        family.add_metric([pipeline, _quantile_label(q)], float(value))
        yield attainment
        yield ttft
        yield tpot


class ControllerCollector(Collector):
    """The live controller at scrape time (agent/controller_runner.py): its mode, its decisions
    since the server started by verdict, and when it last decided."""

    def __init__(self, runner: Any):
        self._runner = runner

    def collect(self) -> Iterator[Metric]:
        runner = self._runner
        mode = GaugeMetricFamily("pipeshift_controller_mode", "The live controller's mode (1 for the one set).",
                                 labels=["mode"])
        for name in ("auto", "propose", "off"):
            mode.add_metric([name], float(runner.settings.mode == name))
        yield mode
        decisions = CounterMetricFamily(
            "pipeshift_controller_decisions",
            "The controller's decisions by verdict: keep, propose (a saved plan), apply (auto started it), "
            "refused (auto, the apply path refused it).", labels=["verdict"])
        for verdict, count in runner.verdicts.items():
            decisions.add_metric([verdict], float(count))
        yield decisions
        last = runner.decisions[-1] if runner.decisions else None
        if last is not None:
            yield GaugeMetricFamily("pipeshift_controller_last_decision_timestamp_seconds",
                                    "When the controller last decided (unix seconds).", value=float(last.time))


def _quantile_label(key: str) -> str:
    """Returns Prometheus' quantile label for "p90": "0.9"."""
    return str(int(key.removeprefix("p")) / 100)


def _quantile_gauge(name: str, doc: str, figures: Mapping[str, float | None]) -> GaugeMetricFamily:
    g = GaugeMetricFamily(name, doc + " (quantile label; mean as quantile=\"mean\")", labels=["quantile"])
    for key, value in figures.items():
        if value is not None:
            g.add_metric(["mean" if key == "mean" else _quantile_label(key)], float(value))
    return g


class GatewayMetrics:
    """All gateway metrics, on a registry of their own so several apps can share a process."""

    def __init__(self, stats: Callable[[], Mapping[str, float]] | None = None, applies: Any = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.ttft_s = Histogram(
            "pipeshift_time_to_first_token_seconds",
            "From request arrival at the gateway to the first generated token.",
            buckets=TTFT_BUCKETS_S,
            registry=r,
        )
        self.inter_token_latency_s = Histogram(
            "pipeshift_inter_token_latency_seconds",
            "Gap between consecutive generated tokens of a request, as seen at the gateway.",
            buckets=ITL_BUCKETS_S,
            registry=r,
        )
        self.e2e_latency_s = Histogram(
            "pipeshift_e2e_request_latency_seconds",
            "From request arrival to its last token (or its abort or error).",
            buckets=E2E_BUCKETS_S,
            registry=r,
        )
        self.generated_tokens = Counter(
            "pipeshift_generated_tokens", "Completion tokens streamed to clients.", registry=r
        )
        self.prompt_tokens = Counter(
            "pipeshift_prompt_tokens", "Prompt tokens of admitted requests.", registry=r
        )
        self.requests = Counter(
            "pipeshift_requests",
            "Finished requests by finish_reason (stop, length, error, abort = client left).",
            ["finish_reason"],
            registry=r,
        )
        self.error_responses = Counter(
            "pipeshift_error_responses",
            "Requests answered with an HTTP error (bad input, unknown model, engine failure).",
            ["status"],
            registry=r,
        )
        self.inflight = Gauge(
            "pipeshift_gateway_inflight_requests",
            "Requests the gateway is generating for right now.",
            registry=r,
        )
        self.token_log = TokenLog()  # token times, for the serving figures around an apply
        if stats is not None:
            r.register(EngineStatsCollector(stats))
        if applies is not None:
            r.register(ApplyCollector(applies))

    def watch_workload(self, monitor: Any) -> None:
        """Exposes the workload monitor's window (agent/workload_monitor.py) on this registry."""
        self.registry.register(WorkloadCollector(monitor))

    def watch_controller(self, runner: Any) -> None:
        """Exposes the live controller's decisions (agent/controller_runner.py) on this registry."""
        self.registry.register(ControllerCollector(runner))

    def start_request(self, arrival_s: float | None = None) -> RequestTimer:
        """Returns the timer of one admitted request; call its `finish` exactly once."""
        return RequestTimer(self, time.perf_counter() if arrival_s is None else arrival_s)

    def render(self) -> tuple[bytes, str]:
        """Returns the exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class RequestTimer:
    """Per-request timing: TTFT on the first token, inter-token gaps after it."""

    def __init__(self, metrics: GatewayMetrics, arrival_s: float):
        self._m = metrics
        self.arrival_s = arrival_s
        self._last_token_s: float | None = None
        self._finished = False
        self._to_unix_s = time.time() - time.perf_counter()  # perf_counter -> unix time
        self._log = metrics.token_log.open(arrival_s + self._to_unix_s)
        metrics.inflight.inc()

    def prompt(self, n_tokens: int) -> None:
        self._m.prompt_tokens.inc(n_tokens)

    def tokens(self, n_tokens: int, now_s: float | None = None) -> None:
        """Records an engine event that carried `n_tokens` new tokens."""
        if n_tokens <= 0:
            return
        now_s = time.perf_counter() if now_s is None else now_s
        if self._last_token_s is None:
            # Extra tokens of a multi-token first event have no gap of their own to measure.
            self._m.ttft_s.observe(now_s - self.arrival_s)
        else:
            # Several tokens in one event (e.g. held back by detokenisation) split the gap.
            gap_s = (now_s - self._last_token_s) / n_tokens
            for _ in range(n_tokens):
                self._m.inter_token_latency_s.observe(gap_s)
        self._last_token_s = now_s
        self._m.generated_tokens.inc(n_tokens)
        self._m.token_log.tokens(self._log, n_tokens, now_s + self._to_unix_s)

    def finish(self, finish_reason: str, now_s: float | None = None) -> None:
        """Records the end of the request; later calls are ignored."""
        if self._finished:
            return
        self._finished = True
        now_s = time.perf_counter() if now_s is None else now_s
        self._m.e2e_latency_s.observe(now_s - self.arrival_s)
        self._m.requests.labels(finish_reason=finish_reason).inc()
        self._m.inflight.dec()
        self._m.token_log.close(self._log, now_s + self._to_unix_s)

    def discard(self) -> None:
        """Forgets a request the engine refused: it ends without latency or finish metrics."""
        if not self._finished:
            self._finished = True
            self._m.inflight.dec()
            self._m.token_log.close(self._log, time.perf_counter() + self._to_unix_s)
