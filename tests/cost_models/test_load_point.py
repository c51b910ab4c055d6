"""The load point: the batches the engine forms at a rate or a number of clients, and the
TPOT and throughput that follow, on a host of its own and on a shared one."""

import pytest

from cost_models.host_sharing import Host, HostShare, contention, engine_inflight, shared_time_s
from cost_models.load_point import PipelineTimes, load_point

BW = 1e10


def _pipeline(
    n_stages: int,
    inflight: int,
    per_seq_s: float = 0.0,
    prefill_s: float = 0.0,
    step_s=0.010,
    memory_share: float = 1.0,
):
    """Stages of step_s per step plus per_seq_s per sequence in the micro-batch, alone; on a
    shared host `memory_share` of the step's time is memory traffic (f_m), the rest f_c."""

    def decode(b: float, c: float, share: HostShare) -> float:
        t = step_s + per_seq_s * b
        return shared_time_s(t, share, memory_share * t)

    return PipelineTimes(
        decode_s=tuple(decode for _ in range(n_stages)),
        prefill_s=tuple((lambda n, share: prefill_s * share.compute) for _ in range(n_stages)),
        inflight=inflight,
    )


def test_full_micro_batches_give_the_pipelined_step():
    # 4 stages, 4 micro-batches of 2: every request gets a token each 4 x 10 ms
    point = load_point([_pipeline(4, 4)], 128, 64, concurrent=8)
    assert point.batch_per_pipeline == (2.0,)
    assert point.tpot_s == pytest.approx(0.040)
    # no prefill cost: 8 requests of 64 tokens, each (63 * 40 ms + 20 ms) long
    assert point.throughput_tok_s == pytest.approx(8 * 64 / (63 * 0.040 + 0.020), rel=1e-6)


def test_a_light_rate_forms_batches_of_one_and_serves_the_rate():
    point = load_point([_pipeline(1, 1, per_seq_s=0.005)] * 4, 128, 64, rate_per_s=0.5)
    assert not point.saturated
    assert point.throughput_tok_s == pytest.approx(32.0)
    # 0.125 req/s per pipeline, ~1 s each: a request mostly runs alone (1 + N others)
    assert all(1.0 < b < 1.2 for b in point.batch_per_pipeline)
    assert point.tpot_s == pytest.approx(0.010 + 0.005 * point.batch_per_pipeline[0], rel=1e-3)
    # a heavier rate forms larger batches, so each token is slower
    heavy = load_point([_pipeline(1, 1, per_seq_s=0.005)] * 4, 128, 64, rate_per_s=20)
    assert max(heavy.batch_per_pipeline) > 2 and heavy.tpot_s > point.tpot_s


def test_prefill_takes_its_share_of_the_pipeline():
    """A prompt rides in a micro-batch with the running decodes (the engine's scheduler), so it
    stalls them by its prefill less the step they share: 0.2 s - 10 ms, once a second."""
    without = load_point([_pipeline(1, 1)], 128, 64, rate_per_s=1.0)
    with_prefill = load_point([_pipeline(1, 1, prefill_s=0.2)], 128, 64, rate_per_s=1.0)
    assert with_prefill.tpot_s == pytest.approx(without.tpot_s / (1 - 0.19), rel=1e-3)
    assert with_prefill.ttft_s == pytest.approx(0.2 + without.tpot_s / 2, rel=1e-3)
    # a prompt no dearer than the step it rides in stalls nothing
    free = load_point([_pipeline(1, 1, prefill_s=0.010)], 128, 64, rate_per_s=1.0)
    assert free.tpot_s == pytest.approx(without.tpot_s, rel=1e-6)


def test_a_rate_beyond_capacity_is_saturated():
    point = load_point([_pipeline(1, 1, prefill_s=0.5)], 128, 64, rate_per_s=3.0)
    assert point.saturated


def test_four_replicas_on_two_cores_run_at_half_speed():
    host = Host(cores=2)
    pipes = [_pipeline(1, engine_inflight(1, 4, host))] * 4
    alone = load_point(pipes, 128, 64, concurrent=16)
    shared = load_point(pipes, 128, 64, concurrent=16, share_of=lambda b: contention(b, host, BW))
    assert shared.busy_workers == 4 and shared.contention == 2.0
    assert shared.tpot_s == pytest.approx(2 * alone.tpot_s)
    assert shared.throughput_tok_s == pytest.approx(alone.throughput_tok_s / 2, rel=1e-3)
    # the model split in four stages keeps two busy: no contention, the same capacity
    deep = [_pipeline(4, engine_inflight(4, 1, host), step_s=0.0025)]
    deep_point = load_point(deep, 128, 64, concurrent=8, share_of=lambda b: contention(b, host, BW))
    assert deep_point.contention == 1.0
    assert deep_point.throughput_tok_s == pytest.approx(shared.throughput_tok_s, rel=0.05)


def test_a_shared_bus_slows_memory_traffic_and_time_slicing_the_rest():
    """Four replicas on two cores over a bus that carries one worker's traffic: f_c = 2,
    f_m = 2 x 2 = 4. A memory-bound step is 4x slower, a compute-bound one 2x (before the
    split every measured time was f_m = 4x), and a half-and-half one 3x."""
    host = Host(cores=2, memory_bandwidth_bytes_per_s=BW)
    share_of = lambda b: contention(b, host, BW)  # noqa: E731
    inflight = engine_inflight(1, 4, host)
    tpot = {}
    for mu in (1.0, 0.5, 0.0):
        pipes = [_pipeline(1, inflight, memory_share=mu)] * 4
        point = load_point(pipes, 128, 64, concurrent=16, share_of=share_of)
        assert (point.compute_contention, point.contention) == (2.0, 4.0)
        tpot[mu] = point.tpot_s
    alone = load_point([_pipeline(1, inflight)] * 4, 128, 64, concurrent=16).tpot_s
    assert tpot[1.0] == pytest.approx(4 * alone)
    assert tpot[0.5] == pytest.approx(3 * alone)
    assert tpot[0.0] == pytest.approx(2 * alone)


def test_exactly_one_load_is_given():
    with pytest.raises(ValueError, match="exactly one"):
        load_point([_pipeline(1, 1)], 128, 64)
