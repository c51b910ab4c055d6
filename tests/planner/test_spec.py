"""Malformed specs are refused with file:line, the field, and what to do."""

import pytest

from planner.cli import main
from planner.spec import SpecError, load_spec

GOOD = """\
model: Llama-3.1-8B
devices:
  - {kind: A100-80GB, count: 2, node: a}
workload:
  prompt_tokens: {mean: 512, p99: 2048}
  output_tokens: 128
"""


def errors_of(write_spec, text: str) -> list[str]:
    with pytest.raises(SpecError) as exc:
        load_spec(write_spec(text))
    return exc.value.lines


def test_good_spec_loads(write_spec):
    spec = load_spec(write_spec(GOOD))
    assert spec.model == "Llama-3.1-8B"
    assert [n for n, _, _ in spec.device_names()] == ["a/A100-80GB.0", "a/A100-80GB.1"]


def test_bad_count_names_line_and_field(write_spec):
    lines = errors_of(write_spec, GOOD.replace("count: 2", "count: -1"))
    assert len(lines) == 1
    assert ":3: devices.0.count:" in lines[0]
    assert "greater than or equal to 1" in lines[0] and "-1" in lines[0]


def test_unknown_device_kind_lists_choices(write_spec):
    lines = errors_of(write_spec, GOOD.replace("A100-80GB", "A100-81GB"))
    assert ":3: devices.0.kind: unknown device kind 'A100-81GB'" in lines[0]
    assert "L40S" in lines[0]  # the catalog's choices


def test_unknown_field_and_missing_section(write_spec):
    text = GOOD.replace("workload:", "wrokload:")
    lines = errors_of(write_spec, text)
    joined = "\n".join(lines)
    assert ":4: wrokload: Extra inputs are not permitted" in joined
    assert "remove it or fix its spelling" in joined
    assert ":1: workload: Field required; add it" in joined


def test_nested_field_line(write_spec):
    text = GOOD + "slo:\n  ttft_ms: fast\n"
    lines = errors_of(write_spec, text)
    assert any(":8: slo.ttft_ms:" in x and "give a number" in x for x in lines)


def test_yaml_syntax_error_has_line(write_spec):
    lines = errors_of(write_spec, GOOD + "slo: [unclosed\n")
    assert ":8:" in lines[0] or ":9:" in lines[0]
    assert "YAML syntax error" in lines[0]


def test_cli_exits_1_on_malformed_spec(write_spec, capsys):
    path = write_spec(GOOD.replace("count: 2", "count: zero"))
    assert main(["plan", "-f", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{path}:3: devices.0.count:" in err


def test_calibration_file_changes_layer_times(write_spec):
    import json

    from planner.build_problem import build_problem

    base = build_problem(load_spec(write_spec(GOOD)))
    calib = {"kinds": {"A100-80GB": {"compute": 0.3, "memory": 0.4, "overhead_s": 1e-4}}}
    (write_spec("", "calib.json")).write_text(json.dumps(calib))
    slow = build_problem(load_spec(write_spec(GOOD + "calibration: calib.json\n")))
    assert slow.kinds[0].layer_decode_s > 1.5 * base.kinds[0].layer_decode_s


def test_missing_calibration_file_is_a_spec_error(write_spec):
    from planner.build_problem import build_problem

    with pytest.raises(SpecError) as exc:
        build_problem(load_spec(write_spec(GOOD + "calibration: nowhere.json\n")))
    assert "calibration: cannot read" in exc.value.lines[0]
