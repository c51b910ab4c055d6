"""`pipeshift simulate` with inputs a user gets wrong: each is refused with a message saying
what is wrong, never a traceback or a hang."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from planner.cli import main
from planner.simulator import load_trace
from planner.spec import SpecError

ROOT = Path(__file__).resolve().parents[2]
SPEC = ROOT / "data/specs/local-cpu-smollm2.yaml"
AZURE = ROOT / "data/traces/AzureLLMInferenceTrace_conv.csv"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def simulate(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["simulate", "-f", str(SPEC), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_auto_on_a_kind_only_a_profile_defines_plans_its_changes_with_that_kind(capsys) -> None:
    # The controller's diff planner looked the kind up in the catalog alone (KeyError).
    spec = ROOT / "data/specs/measured-kind-smollm2.yaml"
    args = ["simulate", "-f", str(spec), "--trace", str(AZURE), "--duration", "120"]
    code = main([*args, "--policy", "auto", "--control-interval", "30", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["policy"] == "auto"


def test_the_trace_format_the_example_specs_ship_is_read_too(capsys) -> None:
    sample = ROOT / "data/specs/traces/chat-sample.csv"
    trace = load_trace(sample)
    assert len(trace) == 300 and trace.arrival_s[0] == 0.0
    assert trace.arrival_s == sorted(trace.arrival_s)
    code, out, err = simulate(capsys, "--trace", str(sample), "--json")
    assert code == 0, err
    assert json.loads(out)["requests"] == 300


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (HEADER + "2023-11-16 18:15:46.68,374,4\n2023-11-16 18:15:47.68,374\n", ":3: GeneratedTokens is missing"),
        (HEADER + "yesterday,374,4\n", ":2: TIMESTAMP 'yesterday' is not a date and time"),
        (HEADER + "2023-11-16 18:15:46.68,-5,4\n", ":2: ContextTokens -5 is negative"),
        (HEADER + "2023-11-16 18:15:46.68,37.5,4\n", "ContextTokens '37.5' is not a whole number"),
        ("arrival_s,prompt_tokens,output_tokens\nsoon,10,10\n", "arrival_s 'soon' is not a number of seconds"),
        ("when,prompt\n1,2\n", "needs the columns TIMESTAMP, ContextTokens, GeneratedTokens or arrival_s"),
        (HEADER, "trace has no requests"),
        ("", "trace has no requests"),
    ],
)
def test_a_malformed_trace_names_the_row_and_what_is_wrong(capsys, tmp_path, text, expected) -> None:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    with pytest.raises(SpecError) as raised:
        load_trace(path)
    assert expected in str(raised.value)
    code, _, err = simulate(capsys, "--trace", str(path))
    assert code == 1 and expected in err and "Traceback" not in err


def test_a_missing_or_binary_trace_file_is_refused_with_a_message(capsys, tmp_path) -> None:
    code, _, err = simulate(capsys, "--trace", str(tmp_path / "nothere.csv"))
    assert code == 1 and "trace file not found" in err
    binary = tmp_path / "trace.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = simulate(capsys, "--trace", str(binary))
    assert code == 1 and "not a text CSV file" in err
    code, _, err = simulate(capsys, "--trace", str(tmp_path))
    assert code == 1 and "cannot read the trace" in err


@pytest.mark.parametrize(
    "option", [["--rate-scale", "0"], ["--rate-scale", "-1"], ["--duration", "-5"],
               ["--duration", "nan"], ["--control-interval", "0"], ["--rate-scale", "fast"]]
)
def test_numbers_that_would_divide_by_zero_or_never_end_are_usage_errors(capsys, option) -> None:
    # --rate-scale 0 divided by zero; --control-interval 0 looped for ever
    with pytest.raises(SystemExit) as exited:
        simulate(capsys, "--trace", str(AZURE), "--policy", "auto", *option)
    assert exited.value.code == 2
    assert option[0] in capsys.readouterr().err


def test_plot_without_matplotlib_says_what_to_install_before_simulating(capsys, monkeypatch, tmp_path) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a)
    )
    code, _, err = simulate(capsys, "--trace", str(AZURE), "--duration", "10", "--plot", str(tmp_path / "p"))
    assert code == 1 and "pip install 'pipeshift[plot]'" in err
    assert not (tmp_path / "p").exists()
