"""Specs that reference measured profiles: tables replace the roofline where they cover the
operating point, a profile can define a kind alone, and the report says which is which."""

import json

import pytest

from cost_models.device_catalog import get_device_kind
from cost_models.latency import layer_decode_s
from cost_models.model_catalog import get_model_arch
from planner.build_problem import build_problem
from planner.cli import main
from planner.spec import SpecError, load_spec

TABLES = """\
model: SmolLM2-135M
dtype: fp32
decode:
  batches: [1, 4, 16]
  contexts: [128, 1024, 4096]
  layer_s:
    - [0.0014, 0.0017, 0.0027]
    - [0.0019, 0.0030, 0.0091]
    - [0.0038, 0.0099, 0.0284]
prefill:
  batches: [1]
  tokens: [32, 512, 2048]
  layer_s: [[0.0047, 0.061, 0.32]]
head: {rows: [1, 4, 16], s: [0.0045, 0.012, 0.056]}
"""
NEW_KIND = (
    "format: pipeshift-profile/1\nkind: npu-x\n"
    + TABLES
    + ("device: {memory_gib: 4, link_bandwidth_gb_s: 2.4, network_bandwidth_gb_s: 1.25}\n")
)
SPEC = """\
model: SmolLM2-135M
dtype: fp32
devices:
  - {kind: KIND, count: 2, node: local}
  - {kind: cpu, count: 1, node: local}
profiles: [p.yaml]
workload: {prompt_tokens: 512, output_tokens: 64, batch: 4}
"""


def test_a_catalog_kinds_profile_replaces_its_roofline_inside_the_grid(write_spec):
    write_spec("format: pipeshift-profile/1\nkind: cpu\n" + TABLES, "p.yaml")
    problem = build_problem(load_spec(write_spec(SPEC.replace("KIND", "cpu"))))
    (cpu,) = problem.kinds
    # decode context = prompt + output / 2 = 544: between the 128 and 1024 columns at batch 4
    u = (544 - 128) / (1024 - 128)
    assert cpu.layer_decode_s == pytest.approx((1 - u) * 0.0019 + u * 0.0030)
    assert cpu.layer_prefill_s == pytest.approx(0.061)
    assert cpu.cost_source.source == "profile" and cpu.cost_source.how["decode"].startswith(
        "measured"
    )
    roofline = layer_decode_s(get_model_arch("SmolLM2-135M"), get_device_kind("cpu"), 4, 544, 4)
    assert cpu.layer_decode_s != pytest.approx(roofline)


def test_a_profiles_measured_bus_slows_the_workers_of_a_host_that_gives_no_bandwidth(write_spec):
    """Two CPU workers on a 2-core host: the cores are not shared (f_c = 1), so the only
    slowdown is the bus. The profile's measured 1.25 (2 workers at once, decode layers at batch
    1 and context 512, memory share mu) is what the planner prices there; elsewhere a measured
    time is slowed on its memory part only: 1 + 0.25 * (its memory share) / mu, so a
    compute-bound prefill hardly at all. A node's own `memory_gb_s` wins over it."""
    from cost_models.latency import CPU_EFFICIENCY, layer_decode_memory_s

    host = "host: {cpu: AMD EPYC, shared_workers: 2, shared_slowdown: 1.25}\n"
    spec = (
        "model: SmolLM2-135M\ndtype: fp32\ndevices: [{kind: cpu, count: 2, node: local}]\n"
        "profiles: [p.yaml]\nnodes: [{name: local, nic_gbps: 10, cpu_cores: 2NODE}]\n"
        "workload: {prompt_tokens: PROMPT, output_tokens: 64, batch: BATCH}\n"
    )

    def kinds(spec_text: str, with_host: bool, prompt: int = 512, batch: int = 4):
        write_spec("format: pipeshift-profile/1\nkind: cpu\n" + (host if with_host else "") + TABLES, "p.yaml")
        text = spec_text.replace("PROMPT", str(prompt)).replace("BATCH", str(batch))
        (kind,) = build_problem(load_spec(write_spec(text))).kinds
        return kind

    plain = spec.replace("NODE", "")
    alone, shared = kinds(plain, False), kinds(plain, True)
    arch, cpu = get_model_arch("SmolLM2-135M"), get_device_kind("cpu")

    def memory_share(batch: int, context: int, measured_s: float) -> float:
        return layer_decode_memory_s(arch, cpu, batch, context, 4, CPU_EFFICIENCY) / measured_s

    mu = memory_share(1, 512, 0.0014 + (512 - 128) / (1024 - 128) * (0.0017 - 0.0014))
    at_batch_4 = memory_share(4, 544, alone.layer_decode_s)
    assert 0 < at_batch_4 < mu < 1
    assert shared.layer_decode_s == pytest.approx((1 + 0.25 * at_batch_4 / mu) * alone.layer_decode_s)
    assert shared.layer_decode_s < 1.25 * alone.layer_decode_s
    assert alone.layer_prefill_s < shared.layer_prefill_s < 1.01 * alone.layer_prefill_s
    # where the slowdown was measured (batch 1, context 480 + 64 / 2 = 512): 1.25 again
    one, one_shared = kinds(plain, False, 480, 1), kinds(plain, True, 480, 1)
    assert one_shared.layer_decode_s == pytest.approx(1.25 * one.layer_decode_s)
    wide_bus = spec.replace("NODE", ", memory_gb_s: 1000").replace("PROMPT", "512").replace("BATCH", "4")
    (given,) = build_problem(load_spec(write_spec(wide_bus))).kinds
    assert given.layer_decode_s == pytest.approx(alone.layer_decode_s)


def test_a_profiles_pipeline_step_costs_each_step_once_and_each_further_stage_a_hop(write_spec):
    """`step` measured on a real pipeline: return_s joins the head (once per step, the result
    goes back to the engine), hop_s becomes the kind's link latency (a stage more)."""
    spec = (
        "model: SmolLM2-135M\ndtype: fp32\ndevices: [{kind: cpu, count: 2, node: local}]\n"
        "profiles: [p.yaml]\nworkload: {prompt_tokens: 512, output_tokens: 64, batch: 4}\n"
    )
    write_spec("format: pipeshift-profile/1\nkind: cpu\n" + TABLES, "p.yaml")
    before = build_problem(load_spec(write_spec(spec)))
    step = "step: {return_s: 0.002, hop_s: 0.0035, context: 176}\n"
    write_spec("format: pipeshift-profile/1\nkind: cpu\n" + TABLES + step, "p.yaml")
    after = build_problem(load_spec(write_spec(spec)))
    (k0,), (k1,) = before.kinds, after.kinds
    assert k1.head_decode_s == pytest.approx(k0.head_decode_s + 0.002)
    assert k1.head_prefill_s == pytest.approx(k0.head_prefill_s + 0.002)
    assert k1.layer_decode_s == pytest.approx(k0.layer_decode_s)
    assert after.hop_decode_s == pytest.approx(before.hop_decode_s - get_device_kind("cpu").link_latency_s + 0.0035)
    assert "measured on a real pipeline (return 2.0 ms, hop 3.5 ms)" in k1.cost_source.describe()
    write_spec("format: pipeshift-profile/1\nkind: cpu\n" + TABLES + "step: {hop_s: -1}\n", "p.yaml")
    with pytest.raises(SpecError, match="step.hop_s|non-negative"):
        load_spec(write_spec(spec))


def test_a_kind_defined_only_by_tables_plans_and_the_report_says_so(write_spec, capsys):
    path = write_spec(NEW_KIND, "p.yaml")
    spec = write_spec(SPEC.replace("KIND", "npu-x"))
    assert main(["plan", "-f", str(spec), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "OPTIMAL"
    sources = out["details"]["cost_sources"]
    assert sources["npu-x"]["source"] == "profile" and sources["npu-x"]["file"] == str(path)
    assert sources["cpu"]["source"] == "roofline"
    assert main(["plan", "-f", str(spec)]) == 0
    text = capsys.readouterr().out
    assert f"npu-x: profile {path} - decode measured" in text
    assert "cpu: roofline (no measured tables)" in text
    problem = build_problem(load_spec(spec))
    npu = next(k for k in problem.kinds if k.name == "npu-x")
    assert npu.memory_bytes == pytest.approx(4 * 2**30 * 0.9) and npu.embed_decode_s == 0.0


def test_a_broken_profile_is_a_spec_error_with_both_files_lines(write_spec):
    write_spec(NEW_KIND.replace("[0.0047, 0.061, 0.32]", "[0.0047, fast, 0.32]"), "p.yaml")
    with pytest.raises(SpecError) as exc:
        load_spec(write_spec(SPEC.replace("KIND", "npu-x")))
    assert ":6: profiles.0: cannot use profile 'p.yaml'" in exc.value.lines[0]
    assert (
        "p.yaml:15: prefill.layer_s.0.1: give a positive number (got 'fast')" in exc.value.lines[1]
    )
    with pytest.raises(SpecError) as exc:
        load_spec(write_spec(SPEC.replace("KIND", "npu-x").replace("p.yaml", "none.yaml")))
    assert "cannot read the profile" in "\n".join(exc.value.lines)


def test_tables_of_another_model_cannot_define_a_kind(write_spec):
    write_spec(NEW_KIND, "p.yaml")
    text = (
        SPEC.replace("KIND", "npu-x")
        .replace("SmolLM2-135M", "Llama-3.1-8B")
        .replace("fp32", "bf16")
    )
    with pytest.raises(SpecError, match="not Llama-3.1-8B bf16; measure this model"):
        build_problem(load_spec(write_spec(text)))
