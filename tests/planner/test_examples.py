"""Every example spec plans, the JSON has its contract, and the same spec gives the same plan."""

import json

import pytest

from planner.build_problem import build_pool_problem, build_problem
from planner.cli import main
from planner.spec import load_spec

from .conftest import SPECS


def test_there_are_enough_examples():
    names = {p.name for p in SPECS}
    assert len(names) >= 5
    assert "local-cpu-smollm2.yaml" in names and "cluster-64-llama2-70b.yaml" in names


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_example_spec_plans(path, capsys):
    assert main(["plan", "-f", str(path), "--json", "--time-limit", "20"]) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "status",
        "objective",
        "bound",
        "gap",
        "solve_s",
        "backend",
        "predicted",
        "pipelines",
    ):
        assert key in out
    assert out["status"] == "OPTIMAL" and out["gap"] <= 1e-6
    assert set(out["predicted"]) >= {"ttft_ms", "tpot_ms", "throughput_tok_s"}
    spec = load_spec(path)
    if spec.models is not None:  # several models: each pipeline holds its own model's layers
        pool = build_pool_problem(spec)
        layers = {label: p.n_layers for label, p in zip(pool.labels, pool.problems, strict=True)}
        slos = [(p.tpot_slo_s, p.ttft_slo_s) for p in pool.problems]
        assert {m["name"] for m in out["models"]} == set(layers)
    else:
        problem = build_problem(spec)
        layers = {"": problem.n_layers}
        slos = [(problem.tpot_slo_s, problem.ttft_slo_s)]
    used = set()
    for p in out["pipelines"]:
        stages = p["stages"]
        assert stages[0]["start"] == 0 and stages[-1]["end"] == layers[p.get("model", "")]
        assert all(a["end"] == b["start"] for a, b in zip(stages, stages[1:], strict=False))
        for s in stages:
            assert s["device"] not in used
            used.add(s["device"])
            assert s["memory_bytes"] <= s["memory_capacity_bytes"]
    if len(slos) == 1:
        tpot_slo_s, ttft_slo_s = slos[0]
        if tpot_slo_s:
            assert out["predicted"]["tpot_ms"] <= tpot_slo_s * 1000 + 1e-6
        if ttft_slo_s:
            assert out["predicted"]["ttft_ms"] <= ttft_slo_s * 1000 + 1e-6
    for m, (tpot_slo_s, ttft_slo_s) in zip(out.get("models", []), slos, strict=False):
        if tpot_slo_s:
            assert m["predicted"]["tpot_ms"] <= tpot_slo_s * 1000 + 1e-6
        if ttft_slo_s:
            assert m["predicted"]["ttft_ms"] <= ttft_slo_s * 1000 + 1e-6


def test_human_output_shows_stages(capsys):
    path = next(p for p in SPECS if p.name == "a100-l40s-llama31-8b.yaml")
    assert main(["plan", "-f", str(path), "--backend", "highs"]) == 0
    out = capsys.readouterr().out
    assert "OPTIMAL" in out and "gpu-a/A100-80GB.0" in out and "[0, 32)" in out
    assert "predicted: TTFT" in out


def test_replan_spec_prints_terraform_summary(capsys):
    path = next(p for p in SPECS if p.name == "replan-llama31-8b.yaml")
    assert main(["plan", "-f", str(path)]) == 0
    out = capsys.readouterr().out
    assert "+ gpu-c/L40S.0: load layers [0, 32)" in out
    assert "- gpu-b/L40S.3: free layers [0, 32) (device gone)" in out
    assert "Plan: 1 to add, 0 to change, 1 to destroy." in out


@pytest.mark.parametrize("backend", ["cpsat", "highs", "cbc"])
def test_same_spec_twice_same_plan(backend, capsys):
    path = next(p for p in SPECS if p.name == "cluster-64-llama2-70b.yaml")
    plans = []
    for _ in range(2):
        assert main(["plan", "-f", str(path), "--json", "--backend", backend]) == 0
        out = json.loads(capsys.readouterr().out)
        plans.append((out["objective"], out["pipelines"]))
    assert plans[0] == plans[1]
