"""The workload a deployment sees, over a sliding window: what the controller plans from.

    monitor = WorkloadMonitor(window_s=60, slo=SloTargets(ttft_s=5, tpot_s=1))
    monitor.attach(engine)           # engine.request_hook: admitted / finished requests
    monitor.snapshot()               # rates, length percentiles, queue, KV use, SLO attainment
    monitor.window()                 # planner.adapt.WorkloadWindow for the controller

Fed on the engine's scheduler thread (agent/engine.py `request_hook`), where the scheduler's
queue and KV reservations can be read without a lock of theirs; read from the gateway's event
loop and the controller's thread under this module's own lock. Per request it keeps arrival,
prompt and output lengths, TTFT, TPOT and the pipeline that served it; per event one sample of
queue length and KV use. Everything older than the window is dropped as new events come.

    arrival rate        = requests admitted in the window / window seconds
    TPOT of a request   = (finish - first token) / (output tokens - 1)
    SLO attainment      = share of requests finished in the window with TTFT <= ttft_s and
                          TPOT <= tpot_s (a request that failed or never produced a token misses)
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

log = logging.getLogger("pipeshift.workload")

DEFAULT_WINDOW_S = 60.0
QUANTILES = (50, 90, 99)


@dataclass(frozen=True)
class SloTargets:
    ttft_s: float | None = 5.0
    tpot_s: float | None = 1.0

    def met(self, ttft_s: float | None, tpot_s: float | None) -> tuple[bool, bool]:
        """Returns (TTFT met, TPOT met); a missing TTFT misses, a missing TPOT (one token) meets."""
        ttft_ok = ttft_s is not None and (self.ttft_s is None or ttft_s <= self.ttft_s)
        tpot_ok = tpot_s is None or self.tpot_s is None or tpot_s <= self.tpot_s
        return ttft_ok, tpot_ok


@dataclass(frozen=True)
class Arrival:
    t_s: float  # monotonic
    prompt_tokens: int


@dataclass(frozen=True)
class Finished:
    t_s: float  # monotonic, when it finished
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    ttft_s: float | None  # None: it produced no token
    tpot_s: float | None  # None: fewer than two tokens
    pipeline_id: int | None
    failed: bool  # aborted by its client, or an engine error


@dataclass(frozen=True)
class LoadSample:
    t_s: float
    queue_length: int
    running: int
    kv_blocks_used: int
    kv_blocks_capacity: int

    @property
    def kv_use(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_capacity if self.kv_blocks_capacity else 0.0


def quantiles(values: Sequence[float]) -> dict[str, float | None]:
    """Returns mean and nearest-rank p50/p90/p99 of `values` (None each when empty)."""
    if not values:
        return {"mean": None, **{f"p{q}": None for q in QUANTILES}}
    v = sorted(values)
    out: dict[str, float | None] = {"mean": sum(v) / len(v)}
    for q in QUANTILES:
        out[f"p{q}"] = float(v[min(len(v) - 1, math.ceil(q / 100 * len(v)) - 1)])
    return out


class WorkloadMonitor:
    def __init__(self, window_s: float = DEFAULT_WINDOW_S, slo: SloTargets | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if window_s <= 0:
            raise ValueError(f"the workload window must be positive, got {window_s} s")
        self.window_s = window_s
        self.slo = slo or SloTargets()
        self.clock = clock
        self.started_s = clock()
        self._arrivals: deque[Arrival] = deque()
        self._finished: deque[Finished] = deque()
        self._samples: deque[LoadSample] = deque()
        self._lock = threading.Lock()
        self._scheduler: Any = None

    # ---- feeding ----------------------------------------------------------------------------
    def attach(self, engine: Any) -> bool:
        """Feeds this monitor from `engine`'s request hook; returns False for an engine without one."""
        if not hasattr(engine, "request_hook"):
            return False
        self._scheduler = lambda: engine.scheduler
        engine.request_hook = self.on_request
        return True

    def on_request(self, what: str, seq: Any) -> None:
        """The engine's request hook (scheduler thread): never raises into the scheduler."""
        try:
            now = self.clock()
            if what == "admitted":
                self.admitted(len(seq.prompt_ids), now)
            elif what == "finished":
                first = seq.first_token_s
                n_out = len(seq.output_ids)
                ttft = None if first is None else first - seq.arrival_s
                tpot = (now - first) / (n_out - 1) if first is not None and n_out > 1 else None
                self.finished(Finished(now, seq.arrival_s, len(seq.prompt_ids), n_out, ttft, tpot,
                                       seq.pipeline_id, bool(seq.aborted) or first is None), now)
            sched = self._scheduler() if self._scheduler else None
            if sched is not None:
                self.sample(LoadSample(now, len(sched.waiting), len(sched.running), sched.used_blocks,
                                       sched.capacity_blocks))
        except Exception:  # the monitor must never take serving down
            log.exception("workload monitor: could not record a %s request", what)

    def admitted(self, prompt_tokens: int, now_s: float | None = None) -> None:
        now_s = self.clock() if now_s is None else now_s
        with self._lock:
            self._arrivals.append(Arrival(now_s, prompt_tokens))
            self._trim(now_s)

    def finished(self, record: Finished, now_s: float | None = None) -> None:
        with self._lock:
            self._finished.append(record)
            self._trim(self.clock() if now_s is None else now_s)

    def sample(self, sample: LoadSample) -> None:
        with self._lock:
            self._samples.append(sample)
            self._trim(sample.t_s)

    def _trim(self, now_s: float) -> None:
        horizon = now_s - self.window_s
        for q in (self._arrivals, self._finished, self._samples):
            while q and q[0].t_s < horizon:
                q.popleft()

    # ---- reading ----------------------------------------------------------------------------
    def seconds(self, now_s: float) -> float:
        """Returns the window's length so far: the window, or less just after start-up."""
        return max(min(self.window_s, now_s - self.started_s), 1e-3)

    def _copy(self, now_s: float) -> tuple[list[Arrival], list[Finished], list[LoadSample]]:
        with self._lock:
            self._trim(now_s)
            return list(self._arrivals), list(self._finished), list(self._samples)

    def snapshot(self, now_s: float | None = None) -> dict[str, Any]:
        """Returns the window's figures (what /metrics and the admin API show)."""
        now_s = self.clock() if now_s is None else now_s
        arrivals, finished, samples = self._copy(now_s)
        seconds = self.seconds(now_s)
        done = [f for f in finished if not f.failed]
        pipelines: dict[int, list[Finished]] = {}
        for f in finished:
            if f.pipeline_id is not None:
                pipelines.setdefault(f.pipeline_id, []).append(f)
        return {
            "window_s": self.window_s,
            "seconds": round(seconds, 3),
            "arrivals": len(arrivals),
            "arrival_rate_per_s": len(arrivals) / seconds,
            "finished": len(finished),
            "failed": sum(f.failed for f in finished),
            "prompt_tokens": quantiles([a.prompt_tokens for a in arrivals]),
            "output_tokens": quantiles([f.output_tokens for f in done]),
            "queue_length": _load(samples, lambda s: s.queue_length),
            "running_requests": _load(samples, lambda s: s.running),
            "kv_use": _load(samples, lambda s: s.kv_use),
            "slo": {"ttft_s": self.slo.ttft_s, "tpot_s": self.slo.tpot_s},
            **self._attainment(finished),
            "pipelines": {str(p): self._pipeline(fs) for p, fs in sorted(pipelines.items())},
        }

    def _pipeline(self, finished: list[Finished]) -> dict[str, Any]:
        done = [f for f in finished if not f.failed]
        return {
            "finished": len(finished),
            "ttft_s": quantiles([f.ttft_s for f in done if f.ttft_s is not None]),
            "tpot_s": quantiles([f.tpot_s for f in done if f.tpot_s is not None]),
            **self._attainment(finished),
        }

    def _attainment(self, finished: Iterable[Finished]) -> dict[str, Any]:
        """Returns the share of `finished` meeting TTFT, TPOT and both (None when there are none)."""
        met = [(False, False) if f.failed else self.slo.met(f.ttft_s, f.tpot_s) for f in finished]
        if not met:
            return {"slo_attainment": None, "ttft_attainment": None, "tpot_attainment": None}
        n = len(met)
        return {
            "slo_attainment": sum(a and b for a, b in met) / n,
            "ttft_attainment": sum(a for a, _ in met) / n,
            "tpot_attainment": sum(b for _, b in met) / n,
        }

    def window(self, now_s: float | None = None) -> Any:
        """Returns the window as the planner reads a workload (planner.adapt.WorkloadWindow):
        the arrival rate plus the backlog still queued, the prompts that arrived, and the
        outputs of the requests that finished (those still running have no length yet)."""
        from planner.adapt import WorkloadWindow

        now_s = self.clock() if now_s is None else now_s
        arrivals, finished, samples = self._copy(now_s)
        seconds = self.seconds(now_s)
        outputs = [f.output_tokens for f in finished if not f.failed]
        window = WorkloadWindow.of([a.prompt_tokens for a in arrivals], outputs, seconds,
                                   [a.t_s for a in arrivals], now_s)
        if not arrivals:
            window = replace(window, rate_per_s=0.0, peak_rate_per_s=0.0)
        return window

    def requests_in_window(self, now_s: float | None = None) -> int:
        now_s = self.clock() if now_s is None else now_s
        arrivals, _, _ = self._copy(now_s)
        return len(arrivals)


def _load(samples: list[LoadSample], value: Callable[[LoadSample], float]) -> dict[str, float | None]:
    """Returns mean, max and last of a sampled figure (None each without samples)."""
    if not samples:
        return {"mean": None, "max": None, "last": None}
    values = [value(s) for s in samples]
    return {"mean": sum(values) / len(values), "max": max(values), "last": values[-1]}
