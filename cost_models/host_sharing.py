"""CPU workers that share one host: how many are busy at once, and how much slower each runs.

Contract (the planner's topology code and the benchmarks import these names):
    Host(cores, threads_per_worker=1, memory_bandwidth_bytes_per_s=None)
    runnable_workers(host)                          -> int    workers the cores run at once
    engine_inflight(n_stages, n_pipelines, host)    -> int    micro-batches a pipeline keeps
    busy_workers(stages_per_pipeline, host)         -> int    workers working at one time
    contention(busy, host, worker_bandwidth)        -> HostShare(compute, memory)
    runnable_workers, engine_inflight, busy_workers mirror the engine's rule below
    shared_efficiency(eff, share)                   -> Efficiency (the roofline on a shared host)
    shared_time_s(seconds, share, memory_s=None)    -> float  (a measured time on a shared host)
    bandwidth_from_slowdown(workers, slowdown, worker_bandwidth, memory_share=1) -> float  host bandwidth

A worker only works while a micro-batch is on its stage. The engine (agent/engine.py,
`micro_batches`) keeps, per pipeline of S stages on a CPU host with R = cores // threads
runnable workers and P pipelines,

    M = min(S, max(1, R // P))                      micro-batches in flight

so the stages of one pipeline are busy in turn, M of them at once, and the host has

    B = sum over pipelines of min(S_p, M_p)         busy workers.

With more busy threads than cores the scheduler time-slices them, and the running workers
share the memory bus:

    compute factor  f_c = max(1, B * threads / cores)
    memory factor   f_m = f_c * max(1, min(B, R) * worker_bandwidth / host_bandwidth)

A layer's compute time is multiplied by f_c, its memory time (weights, KV) by f_m, its fixed
dispatch cost by f_c. host_bandwidth defaults to R * worker_bandwidth (the bus is not the
limit, only the cores are).

A measured time t (a profile's table, a pipeline's step) is split by the roofline at the same
operating point: its memory part m = min(t, bytes moved / (bandwidth * eff.memory), KV
likewise; latency.memory_s) streams over the bus, the rest (compute, dispatch, waits on the
engine) needs a core:

    t_shared = m * f_m + (t - m) * f_c

so a compute-bound time (a prefill, a large decode batch) is slowed by about f_c and a
memory-bound one (a batch-1 decode) by about f_m. A step's return to the engine and a hop move
no weights (m = 0: f_c). Where no roofline splits it (a kind defined only by measurement) the
whole time is multiplied by f_m, the larger factor.

When `pipeshift calibrate` measured that W workers stepping at once (W <= cores, so f_c = 1)
each run s times slower than one alone, on a step whose memory share is mu (its memory part
over its measured time, cost_models/profiled_latency.slowdown_memory_share), the bus slowed
that memory part by s_m with mu * s_m + (1 - mu) = s:

    s_m            = 1 + (s - 1) / mu
    host_bandwidth = W * worker_bandwidth / s_m        (so f_m = f_c * s_m at B = W)

and the measured step is predicted s times slower again where it was measured.

Only busy workers count: on the 2-core AMD EPYC, 4 single-stage pipelines with 2 requests
streaming, the 2 idle workers used 0.02 of a core each (a stage waiting on gloo blocks) and
the serving process (gateway, scheduler) 0.03.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from cost_models.latency import Efficiency


@dataclass(frozen=True)
class Host:
    """A machine whose CPU workers share its cores and memory bus."""

    cores: int
    threads_per_worker: int = 1
    memory_bandwidth_bytes_per_s: float | None = None  # None: R x one worker's bandwidth

    def __post_init__(self) -> None:
        if self.cores < 1 or self.threads_per_worker < 1:
            raise ValueError(f"a host needs at least one core and one thread per worker, got {self}")
        if self.memory_bandwidth_bytes_per_s is not None and self.memory_bandwidth_bytes_per_s <= 0:
            raise ValueError(f"host memory bandwidth must be positive, got {self}")


@dataclass(frozen=True)
class HostShare:
    """How much slower a worker's compute and memory traffic run on the shared host (>= 1)."""

    compute: float = 1.0
    memory: float = 1.0
    busy_workers: float = 1.0


def runnable_workers(host: Host) -> int:
    """Returns R = max(1, cores // threads_per_worker): the workers the cores run at once."""
    return max(1, host.cores // host.threads_per_worker)


def engine_inflight(n_stages: int, n_pipelines: int, host: Host) -> int:
    """Returns M = min(S, max(1, R // P)): the micro-batches the engine keeps in flight on one
    pipeline of S stages when P pipelines share the host (agent/engine.py, micro_batches)."""
    return min(n_stages, max(1, runnable_workers(host) // max(1, n_pipelines)))


def busy_workers(stages_per_pipeline: Sequence[int], host: Host) -> int:
    """Returns B = sum_p min(S_p, M_p): the host's workers that work at one time when every
    pipeline is loaded (each in-flight micro-batch keeps one stage busy)."""
    n = len(stages_per_pipeline)
    return sum(min(s, engine_inflight(s, n, host)) for s in stages_per_pipeline)


def contention(busy: float, host: Host, worker_bandwidth_bytes_per_s: float) -> HostShare:
    """Returns (f_c, f_m) for `busy` workers on the host (formula in the module docstring);
    a fractional count is a time average (a worker busy half the time counts 0.5)."""
    if busy < 0:
        raise ValueError(f"busy workers must be >= 0, got {busy}")
    r = runnable_workers(host)
    compute = max(1.0, busy * host.threads_per_worker / host.cores)
    bus = (
        r * worker_bandwidth_bytes_per_s
        if host.memory_bandwidth_bytes_per_s is None
        else host.memory_bandwidth_bytes_per_s
    )
    memory = compute * max(1.0, min(busy, r) * worker_bandwidth_bytes_per_s / bus)
    return HostShare(compute=compute, memory=memory, busy_workers=busy)


def shared_efficiency(eff: Efficiency, share: HostShare) -> Efficiency:
    """Returns the efficiency that puts the roofline on a shared host: compute / f_c,
    memory and KV bandwidth / f_m, dispatch overhead * f_c."""
    return replace(
        eff,
        compute=eff.compute / share.compute,
        memory=eff.memory / share.memory,
        kv_memory=None if eff.kv_memory is None else eff.kv_memory / share.memory,
        overhead_s=eff.overhead_s * share.compute,
    )


def shared_time_s(seconds: float, share: HostShare, memory_s: float | None = None) -> float:
    """Returns a time measured on a worker alone, on the shared host: with m = min(seconds,
    memory_s) its memory part, m * f_m + (seconds - m) * f_c; without a split (memory_s None),
    seconds * f_m."""
    if memory_s is None:
        return seconds * share.memory
    memory = min(seconds, max(0.0, memory_s))
    return memory * share.memory + (seconds - memory) * share.compute


def bandwidth_from_slowdown(
    workers: int, slowdown: float, worker_bandwidth_bytes_per_s: float, memory_share: float = 1.0
) -> float:
    """Returns the host's memory bandwidth implied by a measurement: `workers` workers stepping
    at once each ran `slowdown` times slower than one alone, on a step whose memory part was
    `memory_share` of its time: W * worker_bandwidth / (1 + (s - 1) / mu) (module docstring)."""
    if workers < 1 or slowdown <= 0:
        raise ValueError(f"need workers >= 1 and a positive slowdown, got {workers}, {slowdown}")
    if not 0 < memory_share <= 1:
        raise ValueError(f"the memory share of a step is in (0, 1], got {memory_share}")
    bus_slowdown = 1.0 + (max(1.0, slowdown) - 1.0) / memory_share
    return workers * worker_bandwidth_bytes_per_s / bus_slowdown
