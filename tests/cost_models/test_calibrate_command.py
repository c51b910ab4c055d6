import json
import os

import pytest

from planner.cli import main

pytest.importorskip("torch")


def test_calibrate_times_real_layers_fits_and_writes_json(tmp_path, capsys):
    out = tmp_path / "calibration.json"
    argv = [
        "calibrate", "--model", "smollm2-135m", "--random-weights", "--layers", "1",
        "--batches", "1,2", "--contexts", "16,64", "--prefill-tokens", "8",
        "--repeats", "1", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "MAPE" in printed and "per-layer overhead" in printed
    doc = json.loads(out.read_text())
    cpu = doc["kinds"]["cpu"]
    assert cpu["n_points"] == 5 and cpu["compute"] > 0 and cpu["memory"] > 0
    assert {p["phase"] for p in doc["points"]} == {"decode", "prefill"}
    assert all(p["measured_s"] > 0 for p in doc["points"])


def test_calibrate_out_yaml_writes_a_profile_a_spec_plans_from(tmp_path, capsys):
    from cost_models.profile import load_profile

    out = tmp_path / "cpu.yaml"
    argv = [
        "calibrate", "--random-weights", "--layers", "1", "--batches", "1,2",
        "--contexts", "16,64", "--prefill-tokens", "8", "--repeats", "1", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    profile = load_profile(out)
    assert profile.kind == "cpu" and profile.model == "SmolLM2-135M" and profile.dtype == "fp32"
    assert profile.decode.rows == (1, 2) and profile.decode.cols == (16, 64)
    assert profile.prefill.cols == (8,) and profile.head.rows == (1, 2)
    assert profile.efficiency is not None and profile.fit_stats["n_points"] == 5
    assert "avx" in " ".join(profile.host["vector_extensions"]) or profile.host["cpu"]
    if (os.cpu_count() or 1) > 1:  # workers stepping at once, one per core
        assert profile.host["shared_workers"] == os.cpu_count()
        assert 1.0 <= profile.host["shared_slowdown"] < 4.0
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        "model: SmolLM2-135M\ndtype: fp32\ndevices: [{kind: cpu, count: 2, node: local}]\n"
        "profiles: [cpu.yaml]\nworkload: {prompt_tokens: 8, output_tokens: 40, batch: 2}\n"
    )
    capsys.readouterr()
    assert main(["plan", "-f", str(spec)]) == 0
    printed = capsys.readouterr().out
    assert f"cpu: profile {out}" in printed and "decode measured (interpolated)" in printed


@pytest.mark.slow
def test_calibrate_times_a_real_pipeline_for_the_steps_overheads(tmp_path, capsys):
    """With the model's weights at hand, calibrate streams through a real 1- and 2-stage
    pipeline: the profile's `step` holds what a step costs beyond the layers and the head,
    and the planner prices a further stage at its hop; two one-stage pipelines streaming at
    once give the host's slowdown."""
    from cost_models.device_catalog import get_device_kind
    from cost_models.profile import device_kind_of, load_profile

    out = tmp_path / "cpu.yaml"
    argv = [
        "calibrate", "--layers", "2", "--batches", "1", "--contexts", "128,256",
        "--prefill-tokens", "", "--repeats", "2", "--shared-workers", "2", "--pipeline-tries", "1",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    profile = load_profile(out)
    step = profile.step
    one, two = step["tpot_1_stage_s"], step["tpot_2_stages_s"]
    # two one-stage pipelines streaming at once: each no faster than one alone
    assert profile.host["shared_workers"] == 2 and 1.0 <= profile.host["shared_slowdown"] < 4.0
    assert 0.005 < one < 1.0 and 0.005 < two < 1.0
    assert step["hop_s"] == pytest.approx(max(0.0, two - one), rel=1e-4, abs=1e-6)
    assert 0 <= step["return_s"] < one  # the layers and head are most of a step
    kind = device_kind_of(load_profile(out), get_device_kind("cpu"))
    assert kind.link_latency_s == pytest.approx(step["hop_s"])
    assert "real pipeline, one greedy stream" in capsys.readouterr().out
