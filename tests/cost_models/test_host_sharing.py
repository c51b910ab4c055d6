"""CPU workers sharing one host: the engine's in-flight rule, busy workers, contention on
compute and the memory bus, and the roofline and measured tables under it."""

from types import SimpleNamespace

import pytest

from cost_models import latency
from cost_models.device_catalog import get_device_kind
from cost_models.host_sharing import (
    Host,
    busy_workers,
    contention,
    engine_inflight,
    runnable_workers,
    shared_efficiency,
    shared_time_s,
)
from cost_models.model_catalog import get_model_arch
from cost_models.profile import Table
from cost_models.profiled_latency import operating_costs

TWO_CORES = Host(cores=2)
CPU = get_device_kind("cpu")
ARCH = get_model_arch("SmolLM2-135M")


@pytest.mark.parametrize(
    ("stages", "pipelines", "cores", "threads"),
    [(s, p, c, t) for s in (1, 2, 3, 4) for p in (1, 2, 4) for c in (1, 2, 8) for t in (1, 2)],
)
def test_engine_inflight_is_the_engines_rule(monkeypatch, stages, pipelines, cores, threads):
    """The cost model's M is what agent/engine.py keeps in flight on CPU workers."""
    from agent import engine

    monkeypatch.setattr(engine.os, "cpu_count", lambda: cores)
    fake = SimpleNamespace(
        config=SimpleNamespace(micro_batches=None, device="cpu", threads_per_worker=threads),
        pipelines={},
        serving_pipelines=lambda: list(range(pipelines)),
    )
    expected = engine.PipelineEngine.micro_batches(fake, stages)
    assert engine_inflight(stages, pipelines, Host(cores, threads)) == expected


def test_busy_workers_counts_one_stage_per_micro_batch_in_flight():
    assert runnable_workers(TWO_CORES) == 2
    assert busy_workers([1, 1, 1, 1], TWO_CORES) == 4  # four replicas: each one busy
    assert busy_workers([4], TWO_CORES) == 2  # one pipeline of four: two micro-batches
    assert busy_workers([2, 2], TWO_CORES) == 2  # two pipelines of two: one each
    assert busy_workers([1, 1], TWO_CORES) == 2
    assert busy_workers([3], Host(cores=8, threads_per_worker=2)) == 3


def test_contention_time_slices_cores_and_shares_the_bus():
    bw = CPU.memory_bandwidth_bytes_per_s
    alone = contention(1, TWO_CORES, bw)
    assert (alone.compute, alone.memory) == (1.0, 1.0)
    full = contention(2, TWO_CORES, bw)
    assert (full.compute, full.memory) == (1.0, 1.0)  # the bus is not the limit by default
    over = contention(4, TWO_CORES, bw)
    assert (over.compute, over.memory) == (2.0, 2.0)
    # a bus that carries 1.5 workers' traffic: two running workers stream 2/1.5 slower
    narrow = Host(cores=2, memory_bandwidth_bytes_per_s=1.5 * bw)
    assert contention(2, narrow, bw).compute == 1.0
    assert contention(2, narrow, bw).memory == pytest.approx(2 / 1.5)
    assert contention(4, narrow, bw).memory == pytest.approx(2 * 2 / 1.5)
    # two threads per worker: two workers already fill four cores
    assert contention(3, Host(cores=4, threads_per_worker=2), bw).compute == pytest.approx(1.5)
    with pytest.raises(ValueError, match="at least one core"):
        Host(cores=0)


def test_shared_roofline_scales_compute_and_memory_time():
    eff = latency.default_efficiency(CPU)
    bw = CPU.memory_bandwidth_bytes_per_s
    share = contention(4, TWO_CORES, bw)
    for batch, context in ((1, 128), (8, 1024)):
        alone = latency.layer_decode_s(ARCH, CPU, batch, context, 4, eff)
        shared = latency.layer_decode_s(ARCH, CPU, batch, context, 4, shared_efficiency(eff, share))
        assert shared == pytest.approx(2 * alone)
    # the bus alone: compute time unchanged, memory time slower, so less than a uniform x f_m
    narrow = contention(2, Host(cores=2, memory_bandwidth_bytes_per_s=bw), bw)
    alone = latency.layer_decode_s(ARCH, CPU, 8, 1024, 4, eff)
    shared = latency.layer_decode_s(ARCH, CPU, 8, 1024, 4, shared_efficiency(eff, narrow))
    assert alone < shared < narrow.memory * alone


def test_operating_costs_scale_measured_tables_and_the_roofline():
    from cost_models.profile import Profile

    decode = Table((1.0, 8.0), (128.0, 1024.0), ((1e-3, 2e-3), (3e-3, 4e-3)))
    head = Table((1.0, 8.0), (1.0,), ((5e-3,), (9e-3,)))
    prefill = Table((1.0,), (64.0, 512.0), ((4e-3, 2e-2),))
    profile = Profile("p.yaml", "cpu", ARCH.name, "fp32", decode=decode, prefill=prefill, head=head)
    eff = latency.default_efficiency(CPU)
    args = (ARCH, CPU, "fp32", 4, eff, 4, 512, 128)
    share = contention(4, TWO_CORES, CPU.memory_bandwidth_bytes_per_s)
    alone = operating_costs(*args, profile=profile)
    shared = operating_costs(*args, profile=profile, share=share)
    for name in ("layer_decode_s", "layer_prefill_s", "head_decode_s", "embed_decode_s"):
        assert getattr(shared, name) == pytest.approx(2 * getattr(alone, name)), name
    assert shared_time_s(1.0, share) == 2.0
