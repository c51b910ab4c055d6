"""A spec whose batch is more than a replica's KV holds still plans, at the batch it holds."""

from __future__ import annotations

from pathlib import Path

from planner.build_problem import build_problem
from planner.operating_batch import operating_batches, plan_fitting_batch
from planner.solve import plan
from planner.spec import parse_spec

ROOT = Path(__file__).resolve().parents[2]
SPEC_13B = ROOT / "data/specs/azure-conv-a100-l40s-llama2-13b.yaml"


def _spec(batch: int):
    text = SPEC_13B.read_text().replace("batch: 16", f"batch: {batch}")
    return parse_spec(text, str(SPEC_13B), str(SPEC_13B.parent))


def test_a_batch_no_split_holds_plans_at_the_largest_that_fits() -> None:
    spec = _spec(64)
    assert plan(build_problem(spec), time_limit_s=10.0).objective is None  # nothing at 64
    problem, result = plan_fitting_batch(spec, time_limit_s=10.0)
    assert result.objective is not None and result.pipelines
    assert problem.batch == 32 and all(p.batch == 32 for p in result.pipelines)
    assert "planned at 32 sequences per micro-batch" in result.message
    assert "KV for 64" in result.message


def test_a_batch_that_fits_plans_as_before() -> None:
    spec = _spec(16)
    problem, result = plan_fitting_batch(spec, time_limit_s=10.0)
    direct = plan(build_problem(spec), time_limit_s=10.0)
    assert problem.batch == 16 and result.message == ""
    assert abs(result.objective - direct.objective) < 1e-6 * direct.objective
    assert operating_batches(problem) == [16]


def test_pipeshift_plan_prints_the_batch_it_planned_at(tmp_path, capsys) -> None:
    from planner.cli import main

    spec = tmp_path / "b64.yaml"
    text = SPEC_13B.read_text().replace("batch: 16", "batch: 64")
    spec.write_text(text.replace("../traces/", str(ROOT / "data/traces") + "/"))
    assert main(["plan", "-f", str(spec)]) == 0
    out = capsys.readouterr().out
    assert "planned at 32 sequences per micro-batch" in out


def test_pipeshift_plan_prints_the_figures_at_the_specs_rate(capsys) -> None:
    from planner.cli import main

    spec = ROOT / "data/specs/local-cpu-smollm2.yaml"
    assert main(["plan", "-f", str(spec)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("at the spec's rate (0.5 req/s): TPOT ")
    assert "per pipeline" in last
    assert main(["plan", "-f", str(spec), "--json"]) == 0
    import json

    at_rate = json.loads(capsys.readouterr().out)["details"]["at_spec_rate"]
    assert at_rate["request_rate_per_s"] == 0.5 and not at_rate["saturated"]
    # at 0.5 req/s the 4 workers run small batches: the TPOT is below the plan's full-batch one
    assert 0 < at_rate["tpot_ms"] and len(at_rate["batch_per_pipeline"]) == 4
    assert all(b < 4 for b in at_rate["batch_per_pipeline"])
