"""The simulator: a trace over a planned deployment, static and with the controller."""

from __future__ import annotations

import json
from pathlib import Path

from planner.cli import main
from planner.simulator import simulate
from planner.spec import load_spec
from planner.trace import load_trace

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "data/specs/azure-conv-a100-l40s-llama31-8b.yaml"
TRACE = ROOT / "data/traces/AzureLLMInferenceTrace_conv.csv"


def test_static_serves_every_request_within_the_slos_at_light_load() -> None:
    trace = load_trace(TRACE, rate_scale=1.0, duration_s=120)
    result = simulate(load_spec(SPEC), trace, "static")
    assert result.requests == len(trace) > 100
    assert result.slo_attainment > 0.95
    assert result.ttft_ms["p50"] <= result.ttft_ms["p90"] <= result.ttft_ms["p99"]
    assert 0 < result.tpot_ms["p50"] < 100
    assert result.device_hours > 0 and not result.reconfigurations


def test_overload_misses_slos_and_auto_gives_devices_back_at_light_load() -> None:
    spec = load_spec(SPEC)
    heavy = simulate(spec, load_trace(TRACE, rate_scale=6.0, duration_s=120), "static")
    assert heavy.slo_attainment < 0.9  # six GPUs cannot carry 6x the load
    light = load_trace(TRACE, rate_scale=0.5, duration_s=400)
    auto = simulate(spec, light, "auto", control_interval_s=60)
    static = simulate(spec, light, "static")
    assert auto.reconfigurations and auto.device_hours < static.device_hours
    assert auto.slo_attainment > 0.9
    assert all("reason" in d for d in auto.decisions)


def test_simulate_command_json(capsys, tmp_path) -> None:
    code = main(
        [
            "simulate",
            "-f",
            str(SPEC),
            "--trace",
            str(TRACE),
            "--duration",
            "60",
            "--json",
            "--plot",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("goodput_rps", "slo_attainment", "device_hours", "reconfigurations"):
        assert key in out
    assert set(out["ttft_ms"]) == set(out["tpot_ms"]) == {"p50", "p90", "p99"}
    assert (tmp_path / "latency.png").exists()


def test_auto_gives_devices_back_when_load_falls_and_takes_them_when_it_rises() -> None:
    from planner.trace import Trace

    # 2 req/s for 10 minutes, then 11 req/s for 10 minutes; fixed lengths
    arrivals = [i / 2 for i in range(1200)] + [600 + i / 11 for i in range(6600)]
    trace = Trace(arrivals, [800] * len(arrivals), [150] * len(arrivals))
    result = simulate(load_spec(SPEC), trace, "auto", window_s=120)
    down = [r for r in result.reconfigurations if r.devices_after < r.devices_before]
    up = [r for r in result.reconfigurations if r.devices_after > r.devices_before]
    assert down and up and down[0].decided_s < 600 < up[0].decided_s
    # the step up (x5.5 in one instant) costs SLOs until the devices are back, then it serves
    late = [b["slo_attainment"] for b in result.timeline if b["t_s"] >= 900]
    assert late and min(late) > 0.95
    static = simulate(load_spec(SPEC), trace, "static")
    assert result.device_hours < static.device_hours
    # the plot labels each configuration from the moment it serves
    from planner.simulation_plot import configuration_segments
    from planner.simulator import shape

    segments = configuration_segments(result)
    assert segments[0] == (0.0, shape(result.initial))
    assert [m for m, _ in segments[1:]] == [r.switch_s / 60 for r in result.reconfigurations]
    assert segments[-1][1] == shape(result.final)


def test_a_configurations_shape_counts_pipelines_of_each_depth_deepest_first() -> None:
    from planner.simulator import shape

    config = [[("a", 0, 32)], [("b", 0, 16), ("c", 16, 32)], [("d", 0, 32)]]
    assert shape(config) == "1x2 + 2x1 stages"


def test_prefill_is_linear_between_prompt_buckets_and_running_sequences_wait_the_whole_traversal() -> None:
    """A 165-token prompt costs between the 160- and 192-token buckets, in proportion (not the
    192 above it); a two-stage pipeline's traversal is the sum of its stages, its busy time
    when idle the slowest stage."""
    import pytest

    from planner.serving_costs import PROMPT_BUCKET, PipelineCosts

    spec = load_spec(SPEC)
    names = [n for n, _, _ in spec.device_names()]
    costs = PipelineCosts.of(spec, [(names[0], 0, 16), (names[1], 16, 32)], 4)
    lo, hi = costs.prefill_s(5 * PROMPT_BUCKET), costs.prefill_s(6 * PROMPT_BUCKET)
    mid = costs.prefill_s(5 * PROMPT_BUCKET + 5)
    for i in (0, 1):
        assert lo[i] < mid[i] < hi[i]
        assert mid[i] == pytest.approx(lo[i] + 5 / PROMPT_BUCKET * (hi[i] - lo[i]))
    busy, traversal = hi
    assert busy < traversal  # two stages: the slowest alone is less than both in turn


def test_a_pipelines_own_idle_stages_do_not_slow_its_busy_ones(tmp_path) -> None:
    """Two CPU workers on a 2-core host whose profile measured 1.5x with both stepping: a
    2-stage pipeline with one sequence has one stage working at a time (no slowdown), with two
    both work (the bus slowdown, f_m = 1 + 0.5 / mu on the memory part of each time, mu the
    memory share of the decode layers it was measured on); a replica beside another is priced
    with the other busy."""
    import pytest

    from cost_models.device_catalog import get_device_kind
    from cost_models.profile import load_profile
    from cost_models.profiled_latency import slowdown_memory_share
    from planner.serving_costs import PipelineCosts
    from planner.spec import parse_spec

    (tmp_path / "p.yaml").write_text(
        "format: pipeshift-profile/1\nkind: cpu\nmodel: SmolLM2-135M\ndtype: fp32\n"
        "host: {shared_workers: 2, shared_slowdown: 1.5}\n"
        "decode: {batches: [1, 4], contexts: [128, 1024], layer_s: [[0.001, 0.002], [0.002, 0.004]]}\n"
        "prefill: {batches: [1], tokens: [32, 512], layer_s: [[0.004, 0.06]]}\n"
        "head: {rows: [1, 4], s: [0.004, 0.008]}\n"
    )
    spec = parse_spec(
        "model: SmolLM2-135M\ndtype: fp32\ndevices: [{kind: cpu, count: 2, node: local}]\n"
        "nodes: [{name: local, nic_gbps: 10, cpu_cores: 2}]\nprofiles: [p.yaml]\n"
        "workload: {prompt_tokens: 128, output_tokens: 32, batch: 4}\n",
        "t",
        str(tmp_path),
    )
    a, b = (n for n, _, _ in spec.device_names())
    two = PipelineCosts.of(spec, [(a, 0, 15), (b, 15, 30)], 4)
    one_seq, two_seqs = two.decode_step_s(1, 256), two.decode_step_s(2, 256)
    bus = 1 + 0.5 / slowdown_memory_share(load_profile(tmp_path / "p.yaml"), get_device_kind("cpu"))
    # the layers and head slow by at most the bus factor, by their memory part; the hop not
    assert 1.35 < two_seqs / one_seq < bus
    assert two.prefill_s(128, 0)[1] < two.prefill_s(128, 3)[1]
    replica = PipelineCosts.of(spec, [(a, 0, 30)], 4)
    assert replica.stages_busy(1)[0].share.memory == pytest.approx(bus)  # the other worker busy


def test_a_request_whose_kv_a_change_drops_prefills_again_and_keeps_its_first_token() -> None:
    """The diff planner may drop a request's KV (recompute_overflow): in the simulator it
    leaves its pipeline, and once admitted again prefills its prompt and the tokens it has
    made; its first token (TTFT) stays when it came, and it finishes later."""
    import math

    from planner.serving_costs import PipelineCosts
    from planner.simulator import SimPipeline, _advance, _Run
    from planner.trace import Trace

    spec = load_spec(SPEC)
    stages = [(spec.device_names()[0][0], 0, 32)]
    trace = Trace([0.0, 0.0], [800, 800], [200, 200])

    def serve(until_s: float) -> tuple[SimPipeline, _Run]:
        run = _Run(trace, [o - 1 for o in trace.output], [math.nan] * 2, [math.nan] * 2, [False] * 2)
        p = SimPipeline(stages, PipelineCosts.of(spec, stages, 16), 0.0)
        p.queue.extend([0, 1])
        _advance(p, run, until_s)
        return p, run

    _, plain = serve(math.inf)
    p, run = serve(2.0)
    first, left = run.first_s[1], run.remaining[1]
    assert 0 < first < 2.0 and p.active == 2
    p.evict(run, [1])
    made = 200 - 1 - run.remaining[1]
    assert made > 0 and run.remaining[1] < left  # it decoded some tokens before the drop
    assert run.redo == {1: 800 + made} and not run.prefilled[1]
    assert p.active == 1 and p.kv_reserved == 1000
    p.queue.append(1)
    _advance(p, run, math.inf)
    assert run.first_s[1] == first and run.redo == {}
    assert run.finish_s[1] > plain.finish_s[1]
    assert p.active == 0 and p.kv_reserved == 0


def phased_13b_b64(rate_scale: float, until_s: float):
    """Returns bench/adapt.py's 13b-b64 spec and the first `until_s` of its phased trace at
    `rate_scale` (lengths alternating every 600 s)."""
    from bench.adapt import TRACE, case_spec, phased
    from cost_models.model_catalog import get_model_arch
    from planner.simulator import within_context

    spec = case_spec("13b-b64")
    trace, _ = within_context(load_trace(TRACE, rate_scale=rate_scale), get_model_arch(spec.model).max_context)
    trace = phased(trace, 600)
    return spec, trace.subset([i for i, a in enumerate(trace.arrival_s) if a < until_s])


def test_a_change_memory_forbids_is_made_when_the_controller_may_recompute_the_overflow() -> None:
    """13B at batch 64, the first 480 s of the phased trace at x1.65 (bench/adapt.py): with
    the KV full, the change the controller wants does not fit, and it is refused (where it may
    never drop KV); with ControllerPolicy.recompute_overflow it is made, dropping the KV of
    some requests."""
    from planner.controller import ControllerPolicy

    spec, trace = phased_13b_b64(rate_scale=1.65, until_s=480)
    kept = simulate(spec, trace, "auto", controller=ControllerPolicy(recompute_when_losing=1.0))
    assert kept.reconfigurations == []
    assert any(d["reason"].startswith("memory forbids the change") for d in kept.decisions)
    made = simulate(spec, trace, "auto", controller=ControllerPolicy(recompute_overflow=True,
                                                                     recompute_when_losing=1.0))
    assert [r.recomputed > 0 for r in made.reconfigurations] == [True]
    acted = [d for d in made.decisions if d["act"]]
    assert acted[0]["recompute_requests"] == made.reconfigurations[0].recomputed
    assert not any(d["reason"].startswith("memory forbids") for d in made.decisions)
    assert made.slo_attainment > 0.5


def test_out_of_a_configuration_that_loses_requests_the_controller_drops_kv_to_change() -> None:
    """13B at batch 64, the first 300 s of the phased trace at x2.2 (bench/adapt.py), starting
    on eight replicas, where memory cannot hold the running requests' KV through the change to
    L40S pairs. At 60 s the replicas still meet the SLOs for 90 % of the demand and the change
    is refused; at 120 s they are predicted to lose more, and by default the change is made,
    dropping the KV that does not fit. A policy that never drops KV stays where it is."""
    from planner.controller import ControllerPolicy

    spec, trace = phased_13b_b64(rate_scale=2.2, until_s=300)
    stuck = simulate(spec, trace, "auto", controller=ControllerPolicy(recompute_when_losing=1.0))
    assert stuck.reconfigurations == []
    assert all(d["reason"].startswith("memory forbids the change") for d in stuck.decisions)
    made = simulate(spec, trace, "auto", controller=ControllerPolicy())
    first, second = made.decisions[:2]
    assert not first["act"] and first["reason"].startswith("memory forbids the change")
    assert first["value_current"] + 0.5 * 8 >= 0.9 * max(first["rate_rps"], first["recent_rate_rps"])
    assert second["act"] and second["t_s"] == 120.0
    assert second["value_current"] + 0.5 * 8 < 0.9 * max(second["rate_rps"], second["recent_rate_rps"])
    assert [r.recomputed > 0 for r in made.reconfigurations] == [True]
    assert second["recompute_requests"] == made.reconfigurations[0].recomputed
