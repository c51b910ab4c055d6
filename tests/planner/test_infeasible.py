"""Infeasible specs exit 1 and name the binding constraint with its numbers."""

from planner.cli import main

BASE = """\
model: {model}
devices:
  - {{kind: {kind}, count: {count}, node: a}}
workload:
  request_rate_per_s: {rate}
  prompt_tokens: 512
  output_tokens: 128
  batch: 8
slo: {slo}
objective: {objective}
"""


def run(write_spec, capsys, **kw) -> str:
    args = (
        dict(model="Llama-2-70B", kind="L4", count=2, rate=1, slo="{}", objective="max_throughput")
        | kw
    )
    path = write_spec(BASE.format(**args))
    assert main(["plan", "-f", str(path)]) == 1
    return capsys.readouterr().err


def test_weights_do_not_fit(write_spec, capsys):
    err = run(write_spec, capsys)
    assert "Llama-2-70B needs 128 GiB of weights; the 2 L4 devices hold 43 GiB in all" in err
    path = write_spec(BASE.format(model="Llama-2-70B", kind="L4", count=1, rate=1, slo="{}",
                                  objective="max_throughput"))
    assert main(["plan", "-f", str(path)]) == 1
    one = capsys.readouterr()
    assert "Llama-2-70B (80 layers) on 1 device - " in one.out
    assert "the 1 L4 device holds 22 GiB in all" in one.err


def test_tpot_slo_too_tight(write_spec, capsys):
    err = run(
        write_spec, capsys, model="Llama-3.1-8B", kind="A100-80GB", count=2, slo="{tpot_ms: 5}"
    )
    assert "TPOT SLO 5.0 ms is below the fastest pipeline these devices allow:" in err
    assert "relax slo.tpot_ms" in err


def test_ttft_slo_too_tight(write_spec, capsys):
    err = run(
        write_spec, capsys, model="Llama-3.1-8B", kind="A100-80GB", count=2, slo="{ttft_ms: 1}"
    )
    assert "TTFT SLO 1.0 ms is below the fastest prefill these devices allow:" in err


def test_demand_above_capacity(write_spec, capsys):
    err = run(
        write_spec,
        capsys,
        model="Llama-3.1-8B",
        kind="L4",
        count=1,
        rate=1000,
        objective="min_devices",
    )
    assert "the demand of 128000 output tokens/s exceeds what all 1 devices (1 L4) give:" in err


def test_max_stages_binding(write_spec, capsys):
    text = (
        BASE.format(
            model="Llama-2-70B", kind="L4", count=12, rate=1, slo="{}", objective="max_throughput"
        )
        + "max_stages: 3\n"
    )
    assert main(["plan", "-f", str(write_spec(text))]) == 1
    err = capsys.readouterr().err
    assert "stages on the 12 L4 devices; max_stages is 3; raise max_stages" in err


def test_json_output_of_infeasible_spec(write_spec, capsys):
    import json

    text = BASE.format(
        model="Llama-2-70B", kind="L4", count=2, rate=1, slo="{}", objective="max_throughput"
    )
    assert main(["plan", "-f", str(write_spec(text)), "--json"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    assert out["status"] == "INFEASIBLE" and out["objective"] is None and out["pipelines"] == []
    assert "needs 128 GiB of weights" in out["message"]
