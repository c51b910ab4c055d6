"""The controller's goodput prediction: more capacity never looks worse, overload collapses."""

from __future__ import annotations

from pathlib import Path

from planner.adapt import UTILISATION, goodput_rps
from planner.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SPEC = load_spec(ROOT / "data/specs/azure-conv-a100-l40s-llama31-8b.yaml")


def test_goodput_rises_with_capacity_and_is_continuous() -> None:
    rate = 10.0
    caps = [c / 10 for c in range(10, 400)]
    values = [goodput_rps(rate, c, SPEC) for c in caps]
    assert all(b >= a - 1e-9 for a, b in zip(values, values[1:], strict=False))
    # continuous where overload begins (rate = capacity) and where the margin ends
    assert abs(goodput_rps(rate, rate - 1e-6, SPEC) - goodput_rps(rate, rate + 1e-6, SPEC)) < 1e-3
    edge = rate / UTILISATION
    assert abs(goodput_rps(rate, edge - 1e-6, SPEC) - goodput_rps(rate, edge + 1e-6, SPEC)) < 1e-3
    assert goodput_rps(rate, rate / UTILISATION, SPEC) == rate


def test_overload_loses_nearly_every_request_not_just_the_excess() -> None:
    # 20 % past capacity: a FIFO queue misses the TTFT SLO within seconds
    assert goodput_rps(12.0, 10.0, SPEC) < 0.1 * 10.0
    # shedding below the load never pays at a device cost far below a device's capacity
    assert goodput_rps(10.0, 14.0, SPEC) - goodput_rps(10.0, 9.0, SPEC) > 5.0


def test_a_backlog_is_a_debt_that_more_capacity_pays_off_sooner() -> None:
    rate, ttft_s = 10.0, SPEC.slo.ttft_ms / 1000
    for backlog in (0, 50, 500, 5000):
        caps = [c / 10 for c in range(10, 400)]
        values = [goodput_rps(rate, c, SPEC, backlog) for c in caps]
        assert all(b >= a - 1e-9 for a, b in zip(values, values[1:], strict=False))
        assert all(goodput_rps(rate, c, SPEC, backlog) <= goodput_rps(rate, c, SPEC) for c in caps)
        for edge in (rate, rate / UTILISATION):
            near = [goodput_rps(rate, edge + d, SPEC, backlog) for d in (-1e-7, 0.0, 1e-7)]
            assert max(near) - min(near) < 1e-3, (backlog, edge, near)
    # what the SLO lets wait costs nothing; beyond it, the time to drain it is lost
    assert goodput_rps(rate, 20.0, SPEC, int(ttft_s * 20)) == goodput_rps(rate, 20.0, SPEC)
    late = 3000 - ttft_s * 20.0
    assert abs(goodput_rps(rate, 20.0, SPEC, 3000) - rate * 600.0 / (600.0 + late / 10.0)) < 1e-9
    # however long the drain, a capacity above the rate keeps a share: overload has a way out
    assert 0 < goodput_rps(rate, 10.5, SPEC, 100_000) < goodput_rps(rate, 11.0, SPEC, 100_000)
    # in an overload that has left a queue, twice the capacity is worth far more than the
    # device it costs (folding the queue into the rate made both look lost alike)
    assert goodput_rps(rate, 14.0, SPEC, 400) - goodput_rps(rate, 7.0, SPEC, 400) > 3.0


SPEC_13B = ROOT / "data/specs/azure-conv-a100-l40s-llama2-13b.yaml"


def _at_batch(batch: int):
    from planner.spec import parse_spec

    text = SPEC_13B.read_text().replace("batch: 16", f"batch: {batch}")
    return parse_spec(text, str(SPEC_13B), str(SPEC_13B.parent))


def test_a_replica_runs_the_batch_its_kv_holds_and_is_judged_there() -> None:
    from planner.adapt import WorkloadWindow, operating_batches, outlook, window_spec
    from planner.build_problem import build_problem
    from planner.serving_costs import PipelineCosts

    window = WorkloadWindow.of([1000] * 50, [200] * 50, 10.0)
    spec = window_spec(_at_batch(64), window, None)
    replica = [("gpu-b/L40S.0", 0, 40)]
    pair = [("gpu-b/L40S.0", 0, 20), ("gpu-b/L40S.1", 20, 40)]
    one, two = PipelineCosts.of(spec, replica, 64), PipelineCosts.of(spec, pair, 64)
    # 13B on one L40S: KV for about 20 requests of 1,200 tokens, far below 64 slots; split
    # over two, each stage holds half the layers and more than twice the requests
    assert 10 <= one.admitted(1000, 200) < 32
    assert one.admitted(1000, 200) == one.kv_capacity_tokens // 1200
    assert two.admitted(1000, 200) > 2 * one.admitted(1000, 200)
    # short requests fill every slot
    assert one.admitted(10, 10) == one.slots == 64
    # capacity counts the requests that run, not the slots: the KV-bound replica serves
    # less than a replica of the same device whose 64 short requests all fit
    assert 0 < one.capacity_rps(1000, 200)
    # a pipeline whose KV holds no request serves nothing
    assert one.admitted(10**6, 1) == 0 and one.capacity_rps(10**6, 1) == 0.0
    # the planner, reserving KV for all 64 slots, rules the replica out; the outlook judges
    # it at the ~20 it holds, where it meets the SLOs and counts
    problem = build_problem(spec)
    from planner.evaluate import build_pipeline, pipeline_violations

    assert any("GiB" in v for v in pipeline_violations(problem, build_pipeline(problem, replica)))
    assert outlook(spec, problem, [replica], window).goodput_rps > 0
    # at 64 the replica's KV binds, so the planner also plans at 32 and 16, where it fits
    assert operating_batches(problem) == [64, 32, 16]
    assert operating_batches(build_problem(window_spec(_at_batch(16), window, None))) == [16]


def test_candidates_at_a_kv_bound_batch_serve_where_the_batch_alone_plans_nothing() -> None:
    from planner.adapt import WorkloadWindow, best_of, candidates, outlook, window_spec
    from planner.build_problem import build_problem
    from planner.solve import plan

    window = WorkloadWindow.of([1100] * 100, [210] * 100, 10.0)
    spec = window_spec(_at_batch(64), window, None)
    problem = build_problem(spec)
    at_64 = plan(problem, time_limit_s=10.0)
    alone = [[(s.device, s.start, s.end) for s in p.stages] for p in at_64.pipelines]
    found = candidates(spec, None, 10.0)
    assert [1] * 8 in [sorted(len(p) for p in c) for c in found]  # eight replicas, planned at 16
    best = best_of(spec, window, found)
    predicted = outlook(spec, problem, best, window).goodput_rps
    assert predicted > 0.8 * window.rate_per_s
    # reserving KV for 64 sequences per slot, the planner alone finds nothing that meets the
    # SLOs at this workload (or, were it to, far less)
    assert not alone or predicted > 1.3 * outlook(spec, problem, alone, window).goodput_rps


def test_in_an_overload_the_controller_keeps_its_devices() -> None:
    from planner.adapt import WorkloadWindow, propose
    from planner.controller import ControllerPolicy, ControllerState

    spec = _at_batch(64)
    names = [n for n, _, _ in spec.device_names()]
    a100, l40s = names[:2], names[2:]
    current = [[(d, 0, 40)] for d in a100]
    current += [[(l40s[i], 0, 20), (l40s[i + 1], 20, 40)] for i in (0, 2, 4)]
    idle = ControllerState(None, False)
    # past what the pool serves (about 19 req/s): every configuration's predicted goodput is
    # near 0, and the device cost alone picked the smallest (8 -> 4 devices at 20 req/s)
    for rate in (20, 30):
        window = WorkloadWindow.of([800] * rate * 60, [180] * rate * 60, 60.0)
        proposal = propose(spec, window, current, [], 1000.0, idle, ControllerPolicy())
        assert proposal.current_outlook.capacity_rps < rate
        assert proposal.target_outlook.devices >= len(names)
    # below it, a configuration that carries the load with fewer devices is taken, on a full
    # window's evidence (300 s), not on a minute's
    minute = WorkloadWindow.of([800] * 720, [180] * 720, 60.0)
    proposal = propose(spec, minute, current, [], 1000.0, idle, ControllerPolicy())
    assert proposal.target_outlook.devices >= len(names)
    arrivals = [i / 12.0 for i in range(3600)]  # 12 req/s, evenly
    window = WorkloadWindow.of([800] * 3600, [180] * 3600, 300.0, arrivals)
    assert abs(window.peak_rate_per_s - 12.0) < 0.1
    proposal = propose(spec, window, current, [], 1000.0, idle, ControllerPolicy())
    assert proposal.decision.act and proposal.target_outlook.devices < len(names)
    assert 12.0 <= 0.75 * proposal.target_outlook.capacity_rps
    # the same mean rate with a burst of 30 req/s in one minute keeps what carries the burst
    bursty = [i / 7.5 for i in range(1800)] + [240 + i / 30.0 for i in range(1800)]
    window = WorkloadWindow.of([800] * 3600, [180] * 3600, 300.0, bursty)
    assert window.peak_rate_per_s >= 29.0 and abs(window.rate_per_s - 12.0) < 1e-9
    proposal = propose(spec, window, current, [], 1000.0, idle, ControllerPolicy())
    assert proposal.target_outlook.devices >= len(names)


def test_spare_cpu_workers_cost_nothing_and_busy_ones_share_the_cores() -> None:
    """On a host of 2 cores listing 4 CPU workers, one replica runs alone at full speed (the
    spares idle), two replicas fill the cores, and four only split them: the outlook prices
    each configuration with its own busy workers, not every worker the host lists."""
    from planner.adapt import WorkloadWindow, outlook, window_spec
    from planner.build_problem import build_problem
    from planner.spec import parse_spec

    def spec_of(count: int):
        return parse_spec(
            f"model: SmolLM2-135M\ndtype: fp32\ndevices: [{{kind: cpu, count: {count}, node: local}}]\n"
            "nodes: [{name: local, nic_gbps: 10, cpu_cores: 2}]\n"
            "workload: {prompt_tokens: 64, output_tokens: 32, batch: 4}\n"
            "slo: {ttft_ms: 5000, tpot_ms: 1000}\n",
            "t",
            ".",
        )

    window = WorkloadWindow.of([64] * 20, [32] * 20, 0.5)
    four = window_spec(spec_of(4), window, None)
    names = [n for n, _, _ in four.device_names()]
    problem = build_problem(four)

    def capacity(spec, pipelines) -> float:
        return outlook(spec, problem, pipelines, window).capacity_rps

    one = capacity(four, [[(names[0], 0, 30)]])
    alone = window_spec(spec_of(1), window, None)
    assert one == capacity(alone, [[(alone.device_names()[0][0], 0, 30)]])
    two = capacity(four, [[(names[0], 0, 30)], [(names[1], 0, 30)]])
    assert abs(two - 2 * one) < 1e-6 * one
    all_four = capacity(four, [[(n, 0, 30)] for n in names])
    assert two * 0.8 < all_four <= two * 1.05


def test_a_rise_counts_on_the_last_quarter_of_the_window_a_fall_only_on_all_of_it() -> None:
    from planner.adapt import WorkloadWindow

    quiet = [i * 2.5 for i in range(6)]  # 0.4 req/s over the first 15 s
    burst = [15 + i / 3 for i in range(1, 16)]  # 3 req/s over the last 5 s
    rising = WorkloadWindow.of([32] * 21, [32] * 21, 20.0, quiet + burst, end_s=20.0)
    assert abs(rising.rate_per_s - 21 / 20) < 1e-9
    assert rising.recent_rate_per_s == 3.0 and rising.expected_rate_per_s == 3.0
    assert rising.demand_rate_per_s == 3.0
    falling = WorkloadWindow.of([32] * 21, [32] * 21, 20.0, [t / 3 for t in range(15)] +
                                [5 + i * 2.5 for i in range(6)], end_s=20.0)
    assert falling.recent_rate_per_s < falling.rate_per_s == falling.expected_rate_per_s
    # without the window's end there is no recent rate: the mean
    assert WorkloadWindow.of([32] * 21, [32] * 21, 20.0, quiet + burst).expected_rate_per_s == 21 / 20
