"""CPU workers sharing one host: the engine's in-flight rule, busy workers, contention on
compute and the memory bus, and the roofline and measured tables under it."""

from types import SimpleNamespace

import pytest

from cost_models import latency
from cost_models.device_catalog import get_device_kind
from cost_models.host_sharing import (
    Host,
    HostShare,
    bandwidth_from_slowdown,
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


def test_a_measured_time_is_split_by_its_memory_part():
    """m * f_m + (t - m) * f_c: memory traffic is slowed by the bus, the rest by time slicing;
    a time with no split (a kind defined only by measurement) by f_m, the larger factor."""
    share = HostShare(compute=2.0, memory=2.5)
    assert shared_time_s(1.0, share, 1.0) == pytest.approx(2.5)  # all memory
    assert shared_time_s(1.0, share, 0.0) == pytest.approx(2.0)  # none: a wait on the engine
    assert shared_time_s(1.0, share, 0.4) == pytest.approx(0.4 * 2.5 + 0.6 * 2.0)
    assert shared_time_s(1.0, share, 3.0) == pytest.approx(2.5)  # capped at the measured time
    assert shared_time_s(1.0, share) == pytest.approx(2.5)


def test_a_slowdown_timed_on_a_partly_memory_bound_step_is_the_buses_on_its_memory_part():
    """W workers ran s times slower on a step whose memory share is mu: the bus that follows
    slows that memory part by 1 + (s - 1) / mu, so the step is predicted s times slower again."""
    bw = CPU.memory_bandwidth_bytes_per_s
    assert bandwidth_from_slowdown(2, 1.25, bw) == pytest.approx(2 * bw / 1.25)  # mu = 1
    bus = bandwidth_from_slowdown(2, 1.25, bw, memory_share=0.5)
    assert bus == pytest.approx(2 * bw / 1.5)
    share = contention(2, Host(cores=2, memory_bandwidth_bytes_per_s=bus), bw)
    assert share.compute == 1.0 and share.memory == pytest.approx(1.5)
    assert shared_time_s(1.0, share, 0.5) == pytest.approx(1.25)
    with pytest.raises(ValueError, match="memory share"):
        bandwidth_from_slowdown(2, 1.25, bw, memory_share=0.0)


def test_measured_tables_on_a_shared_host_are_slowed_by_what_they_spend_their_time_on():
    """Four workers on two cores over a bus that carries one worker's traffic (f_c = 2,
    f_m = 4): a batch-1 decode (mostly weights streamed) is slowed by nearly f_m, a prefill
    (compute-bound) by nearly f_c, a decode of 64 sequences in between; the step's return to
    the engine moves no weights (f_c). Before the split every table was slowed by f_m."""
    from cost_models.profile import Profile

    eff = latency.Efficiency(compute=0.74, memory=1.2, overhead_s=3.3e-4, kv_memory=0.46, overlap=False)
    # the tables are the roofline itself, so the memory part of each is known exactly
    decode = Table(
        (1.0, 64.0),
        (128.0, 1024.0),
        tuple(
            tuple(latency.layer_decode_s(ARCH, CPU, b, c, 4, eff) for c in (128, 1024))
            for b in (1, 64)
        ),
    )
    prefill = Table((1.0,), (128.0, 512.0), ((latency.layer_prefill_s(ARCH, CPU, 128, 4, eff),
                                              latency.layer_prefill_s(ARCH, CPU, 512, 4, eff)),))
    head = Table((1.0, 64.0), (1.0,), ((latency.head_s(ARCH, CPU, 1, 4, eff),),
                                       (latency.head_s(ARCH, CPU, 64, 4, eff),)))
    profile = Profile("p.yaml", "cpu", ARCH.name, "fp32", efficiency=eff, decode=decode,
                      prefill=prefill, head=head, step={"return_s": 0.01})
    bw = CPU.memory_bandwidth_bytes_per_s
    share = contention(4, Host(cores=2, memory_bandwidth_bytes_per_s=bw), bw)
    assert (share.compute, share.memory) == (2.0, 4.0)

    def slowdown(batch: int, name: str, prompt: int = 128) -> float:
        args = (ARCH, CPU, "fp32", 4, eff, batch, 128, prompt)
        alone = operating_costs(*args, profile=profile)
        return getattr(operating_costs(*args, profile=profile, share=share), name) / getattr(alone, name)

    one = slowdown(1, "layer_decode_s")
    many = slowdown(64, "layer_decode_s")
    pre = slowdown(1, "layer_prefill_s", prompt=512)
    assert 3.3 < one < 4.0  # ~70 % weights streamed
    assert 2.0 < pre < 2.1  # ~2 % of a 512-token prefill is memory traffic
    assert pre < many < one
    # the split is the roofline's own: a table that is the roofline slows as the roofline does
    shared_roof = latency.layer_decode_s(ARCH, CPU, 64, 128, 4, shared_efficiency(eff, share))
    assert many == pytest.approx(shared_roof / latency.layer_decode_s(ARCH, CPU, 64, 128, 4, eff))
    # the head at batch 1 plus the return: head x f_m (all weights), return x f_c
    args = (ARCH, CPU, "fp32", 4, eff, 1, 128, 128)
    head_alone = operating_costs(*args, profile=profile).head_decode_s - 0.01
    head_shared = operating_costs(*args, profile=profile, share=share).head_decode_s
    head_memory = min(head_alone, latency.head_memory_s(ARCH, CPU, 1, 4, eff))
    expected = 4.0 * head_memory + 2.0 * (head_alone - head_memory) + 2.0 * 0.01
    assert head_shared == pytest.approx(expected)


def test_the_step_a_profiles_slowdown_was_timed_on_is_predicted_that_much_slower():
    """A real pipeline's stream at batch 1 (layers, head, return to the engine) ran s = 1.2x
    slower with two at once on two cores (f_c = 1): with the bus that follows from its memory
    share mu, the planner's costs of that step are s x those alone; without `step` the slowdown
    was timed on decode layers at the context agent/profiling.py uses."""
    from agent import profiling
    from cost_models.profile import Profile
    from cost_models.profiled_latency import SLOWDOWN_CONTEXT, slowdown_memory_share

    assert SLOWDOWN_CONTEXT == profiling.SHARED_CONTEXT
    eff = latency.Efficiency(compute=0.74, memory=1.2, overhead_s=3.3e-4, kv_memory=0.46, overlap=False)
    decode = Table((1.0, 8.0), (128.0, 1024.0), ((1.5e-3, 1.9e-3), (2.3e-3, 4.6e-3)))
    head = Table((1.0, 8.0), (1.0,), ((6.5e-3,), (11.7e-3,)))
    context = 152
    layers_s = ARCH.n_layers * decode.at(1, context)[0]
    step = {"return_s": 0.012, "tpot_1_stage_s": layers_s + 6.5e-3 + 0.012, "context": context}
    profile = Profile("p.yaml", "cpu", ARCH.name, "fp32", efficiency=eff, decode=decode, head=head, step=step)
    mu = slowdown_memory_share(profile, CPU)
    layer_m = latency.layer_decode_memory_s(ARCH, CPU, 1, context, 4, eff)
    head_m = min(6.5e-3, latency.head_memory_s(ARCH, CPU, 1, 4, eff))
    assert mu == pytest.approx((ARCH.n_layers * layer_m + head_m) / step["tpot_1_stage_s"])
    assert 0.3 < mu < 0.9
    bw = CPU.memory_bandwidth_bytes_per_s
    host = Host(cores=2, memory_bandwidth_bytes_per_s=bandwidth_from_slowdown(2, 1.2, bw, mu))
    share = contention(2, host, bw)
    args = (ARCH, CPU, "fp32", 4, eff, 1, context, 128)

    def tpot(costs) -> float:
        return ARCH.n_layers * costs.layer_decode_s + costs.head_decode_s

    alone = tpot(operating_costs(*args, profile=profile))
    assert alone == pytest.approx(step["tpot_1_stage_s"])
    assert tpot(operating_costs(*args, profile=profile, share=share)) == pytest.approx(1.2 * alone)
    # no pipeline timed: decode layers at batch 1 and SLOWDOWN_CONTEXT
    layers_only = Profile("p.yaml", "cpu", ARCH.name, "fp32", efficiency=eff, decode=decode, head=head)
    at = decode.at(1, SLOWDOWN_CONTEXT)[0]
    expected = latency.layer_decode_memory_s(ARCH, CPU, 1, SLOWDOWN_CONTEXT, 4, eff) / at
    assert slowdown_memory_share(layers_only, CPU) == pytest.approx(expected)
    # a model the catalog does not know: no split, the whole step on the bus (as before)
    assert slowdown_memory_share(Profile("p.yaml", "cpu", "mystery-1b", "fp32", decode=decode), CPU) == 1.0
