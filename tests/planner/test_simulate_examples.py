"""`pipeshift simulate` on every example spec, static and with the controller, over a short
slice of the Azure trace."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from planner.cli import main
from planner.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
TRACE = ROOT / "data/traces/AzureLLMInferenceTrace_conv.csv"
# planning 64 devices takes seconds; that one runs with the slow tests, and only static (the
# controller re-plans 64 devices at each decision: bench/adapt.py --speed times it)
EXAMPLES = [
    pytest.param(p, policy, id=f"{p.stem}-{policy}",
                 marks=[pytest.mark.slow] if "cluster-64" in p.stem else [])
    for p in sorted((ROOT / "data/specs").glob("*.yaml"))
    for policy in ("static", "auto")
    if not ("cluster-64" in p.stem and policy == "auto")
]


@pytest.mark.parametrize(("spec", "policy"), EXAMPLES)
def test_simulate_every_example_spec(spec: Path, policy: str, capsys) -> None:
    args = ["simulate", "-f", str(spec), "--trace", str(TRACE), "--json", "--policy", policy]
    # auto: long enough for two of the controller's decisions, each on what arrived so far
    args += ["--duration", "10"] if policy == "static" else ["--duration", "30", "--control-interval", "10"]
    several = load_spec(spec).models
    if several:
        assert main(args) == 1  # which model the trace drives must be said
        assert "--model" in capsys.readouterr().err
        args += ["--model", several[0].name or several[0].model]
    code = main(args)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    out = json.loads(captured.out)
    assert out["requests"] > 0 and out["device_hours"] > 0
    assert 0.0 <= out["slo_attainment"] <= 1.0
    assert out["goodput_rps"] <= out["requests"] / out["duration_s"] + 1e-9
    for key in ("ttft_ms", "tpot_ms"):
        q = out[key]
        assert 0 <= q["p50"] <= q["p90"] <= q["p99"]
    if policy == "auto":
        assert out["decisions"] and all(d["reason"] for d in out["decisions"])
