"""Spec values that validated but could not be planned or served: an infinite rate, a prompt
longer than the model's context, percentiles out of order, a file that is not text."""

from __future__ import annotations

from pathlib import Path

import pytest

from planner.cli import main
from planner.spec import SpecError, load_spec, parse_spec

BASE = """\
model: SmolLM2-135M
devices: [{kind: H100-SXM, count: 2}]
workload:
  request_rate_per_s: RATE
  prompt_tokens: PROMPT
  output_tokens: 500
slo: {ttft_ms: 10000, tpot_ms: 100}
"""


def spec(rate: str = "1", prompt: str = "100") -> str:
    return BASE.replace("RATE", rate).replace("PROMPT", prompt)


@pytest.mark.parametrize("rate", [".inf", ".nan"])
def test_an_infinite_or_nan_rate_is_refused(rate: str) -> None:
    # .inf planned "more than this configuration serves (it saturates at inf tok/s)"
    with pytest.raises(SpecError) as raised:
        parse_spec(spec(rate=rate), "s.yaml")
    assert "s.yaml:4: workload.request_rate_per_s:" in str(raised.value)


def test_lengths_beyond_the_models_context_are_refused_at_the_workload() -> None:
    # it planned TTFT 9 ms for requests the server refuses (SmolLM2's context is 8192)
    with pytest.raises(SpecError) as raised:
        parse_spec(spec(prompt="9000"), "s.yaml")
    assert str(raised.value) == (
        "s.yaml:3: workload: prompt_tokens 9000 + output_tokens 500 is more than SmolLM2-135M's "
        "context of 8192 tokens, so the server would refuse such requests; give lengths that fit it"
    )
    assert parse_spec(spec(prompt="{mean: 7000, p99: 20000}"), "s.yaml").model == "SmolLM2-135M"


def test_several_models_are_each_checked_against_their_own_context() -> None:
    text = """\
devices: [{kind: H100-SXM, count: 2}]
models:
  - model: Llama-3.1-8B
    workload: {prompt_tokens: 9000, output_tokens: 500}
  - model: SmolLM2-135M
    workload: {prompt_tokens: 9000, output_tokens: 500}
"""
    with pytest.raises(SpecError) as raised:
        parse_spec(text, "s.yaml")
    assert raised.value.lines == [
        "s.yaml:6: models.1.workload: prompt_tokens 9000 + output_tokens 500 is more than "
        "SmolLM2-135M's context of 8192 tokens, so the server would refuse such requests; give "
        "lengths that fit it"
    ]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("{mean: 100, p50: 200, p99: 150}", "p50 200 is above p99 150"),
        ("{mean: 100, p99: 300, max: 200}", "p99 300 is above max 200"),
        ("{mean: 300, max: 200}", "mean 300 is above max 200"),
    ],
)
def test_percentiles_out_of_order_are_refused(prompt: str, expected: str) -> None:
    with pytest.raises(SpecError) as raised:
        parse_spec(spec(prompt=prompt), "s.yaml")
    assert "s.yaml:5: workload.prompt_tokens" in str(raised.value) and expected in str(raised.value)


def test_a_binary_spec_file_is_an_error_message(capsys, tmp_path: Path) -> None:
    # it was a UnicodeDecodeError traceback
    path = tmp_path / "spec.yaml"
    path.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SpecError, match="not a text"):
        load_spec(path)
    assert main(["plan", "-f", str(path)]) == 1
    assert "not a text (UTF-8) file" in capsys.readouterr().err


@pytest.mark.parametrize("field", ["ttft_percentile", "tpot_percentile"])
def test_a_percentile_given_as_a_fraction_is_refused(field: str) -> None:
    # 0.99 was taken as the 0.99th percentile: the plan was made at the median's lengths and
    # judged against an SLO almost every request meets
    text = spec().replace("tpot_ms: 100}", f"tpot_ms: 100, {field}: 0.99}}")
    with pytest.raises(SpecError) as raised:
        parse_spec(text, "s.yaml")
    assert f"s.yaml:7: slo.{field}: 0.99 is out of 100" in str(raised.value)
    assert "99 for p99" in str(raised.value)
    assert parse_spec(text.replace("0.99", "99.9"), "s.yaml").slo.model_dump()[field] == 99.9


TRACE_SPEC = """\
model: SmolLM2-135M
devices: [{kind: H100-SXM, count: 2}]
workload: {trace: TRACE}
slo: {ttft_ms: 10000, tpot_ms: 100}
"""


@pytest.mark.parametrize(
    ("name", "rows", "expected"),
    [
        ("t.jsonl", '{"prompt_tokens": 10, "output_tokens": 5}\n{"prompt_tokens": 10,\n',
         "t.jsonl:2: not a JSON object"),
        ("t.jsonl", '{"prompt_tokens": 10, "output_tokens": 5}\n[10, 5]\n', "t.jsonl:2: not a JSON object"),
        ("t.jsonl", '{"prompt_tokens": null, "output_tokens": 5}\n', "t.jsonl:1: prompt_tokens is missing"),
        ("t.csv", "prompt_tokens,output_tokens\n10,5\n10\n", "t.csv:3: output_tokens is missing"),
        ("t.csv", "prompt_tokens,output_tokens\n0,5\n-10,5\n", "t.csv:3: prompt_tokens '-10' is not"),
        ("t.csv", "prompt_tokens,output_tokens\nnan,5\n", "t.csv:2: prompt_tokens 'nan' is not"),
        ("t.jsonl", b"\xff\xfe\x00garbage", "t.jsonl: not a text"),
    ],
)
def test_a_workload_trace_row_that_does_not_parse_is_an_error_message(
    capsys, tmp_path: Path, name: str, rows: str | bytes, expected: str
) -> None:
    # each was a traceback (JSONDecodeError, TypeError, UnicodeDecodeError or pydantic's
    # ValidationError) out of `pipeshift plan`
    trace = tmp_path / name
    trace.write_bytes(rows if isinstance(rows, bytes) else rows.encode())
    path = tmp_path / "spec.yaml"
    path.write_text(TRACE_SPEC.replace("TRACE", name))
    assert main(["plan", "-f", str(path)]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_a_workload_trace_in_jsonl_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    (tmp_path / "t.jsonl").write_bytes(
        '\ufeff{"prompt_tokens": 300, "output_tokens": 20}\n\n{"prompt_tokens": 0, "output_tokens": 40}\n'.encode()
    )
    (tmp_path / "spec.yaml").write_text(TRACE_SPEC.replace("TRACE", "t.jsonl"))
    prompt, output = load_spec(tmp_path / "spec.yaml").lengths()
    assert (prompt.mean, output.mean) == (150.5, 30.0)  # an empty prompt counts as one token


def test_a_missing_spec_named_as_a_shipped_example_says_how_to_copy_it(capsys, tmp_path: Path) -> None:
    # The README's `pipeshift apply -f data/specs/local-cpu-smollm2.yaml` outside the checkout
    # (a wheel install) said only "No such file or directory".
    missing = tmp_path / "data" / "specs" / "local-cpu-smollm2.yaml"
    assert main(["plan", "-f", str(missing)]) == 1
    err = capsys.readouterr().err
    assert f"{missing}: cannot read the spec: No such file or directory" in err
    assert "`pipeshift examples local-cpu-smollm2 --to .` copies it" in err
    with pytest.raises(SpecError) as raised:
        load_spec(tmp_path / "my-cluster.yaml")
    assert "pipeshift examples" not in str(raised.value)


@pytest.mark.parametrize("field", ["ttft_percentile", "tpot_percentile"])
def test_the_planner_api_states_that_a_percentile_is_out_of_100(field: str) -> None:
    # a body with 0.99 passed its schema and was answered 409 "does not hold together"
    from pydantic import ValidationError

    from planner.api.spec_body import SloBody

    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        SloBody.model_validate({field: 0.99})
    assert SloBody.model_json_schema()["properties"][field]["minimum"] == 1


def test_a_workload_trace_in_azure_columns_with_semicolons_is_read(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("TIMESTAMP;ContextTokens;GeneratedTokens\nx;300;20\nx;100;40\n")
    (tmp_path / "spec.yaml").write_text(TRACE_SPEC.replace("TRACE", "t.csv"))
    prompt, output = load_spec(tmp_path / "spec.yaml").lengths()
    assert (prompt.mean, output.mean) == (200.0, 30.0)  # only the lengths are read
