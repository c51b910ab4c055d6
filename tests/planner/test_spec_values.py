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
