"""`pipeshift simulate` with inputs a user gets wrong: each is refused with a message saying
what is wrong, never a traceback or a hang."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest

from planner.cli import main
from planner.spec import SpecError
from planner.trace import load_trace

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
        (HEADER + "2023-11-16 18:15:46.68,-5,4\n", ":2: ContextTokens '-5' is not a number of tokens: it is negative"),
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
    assert code == 1 and "not a text (UTF-8) file" in err
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


def test_a_spreadsheet_export_is_read_as_written(tmp_path) -> None:
    # A byte-order mark before the header, spaces after the commas and CRLF line ends made
    # the header's names "\ufeffTIMESTAMP" and " ContextTokens", and the trace was refused.
    path = tmp_path / "trace.csv"
    path.write_bytes(
        "\ufeffTIMESTAMP, ContextTokens, GeneratedTokens\r\n"
        "2023-11-16 18:15:46.6805900,374,44\r\n2023-11-16 18:15:50.9951690,396,109\r\n".encode()
    )
    trace = load_trace(path)
    assert trace.prompt == [374, 396] and trace.output == [44, 109]
    assert trace.arrival_s[1] == pytest.approx(4.314579)


def test_times_without_an_offset_are_utc_whatever_the_local_zone(tmp_path, monkeypatch) -> None:
    # Azure's 2024 traces write +00:00; a time without an offset was read in the machine's
    # local zone, so rows with and without one were hours apart outside UTC, and a naive
    # trace over a daylight-saving change gained or lost an hour.
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        path = tmp_path / "trace.csv"
        path.write_text(
            HEADER + "2024-03-10 06:59:59.5,10,1\n2024-03-10 07:00:00.5+00:00,10,1\n"
            "2024-03-10 07:00:01.5,10,1\n"
        )
        assert load_trace(path).arrival_s == pytest.approx([0.0, 1.0, 2.0])
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_a_spec_workload_trace_from_a_spreadsheet_is_read(tmp_path) -> None:
    from planner.spec import _trace_lengths

    path = tmp_path / "trace.csv"
    path.write_bytes("\ufeffTIMESTAMP, ContextTokens, GeneratedTokens\r\n2023-11-16 18:15:46.68,300,20\r\n".encode())
    prompt, output = _trace_lengths(path)
    assert (prompt.mean, output.mean) == (300.0, 20.0)


@pytest.mark.parametrize(
    ("name", "text"),
    [
        # a spreadsheet in a comma-decimal locale exports with semicolons
        ("semicolons.csv", "TIMESTAMP;ContextTokens;GeneratedTokens\n2023-11-16 18:15:46.68;374;44\n"
                           "2023-11-16 18:15:47.68;396;109\n"),
        ("tabs.tsv", "arrival_s\tprompt_tokens\toutput_tokens\n0.0\t374\t44\n1.0\t396\t109\n"),
        ("lower.csv", "timestamp,contexttokens,generatedtokens\n2023-11-16 18:15:46.68,374,44\n"
                      "2023-11-16 18:15:47.68,396,109\n"),
        # JSON Lines, as a spec's workload.trace already took it (simulate refused it)
        ("trace.jsonl", '{"arrival_s": 0, "prompt_tokens": 374, "output_tokens": 44}\n\n'
                        '{"arrival_s": 1.0, "prompt_tokens": 396, "output_tokens": 109.0}\n'),
    ],
)
def test_traces_in_other_delimiters_cases_and_json_lines_are_read(capsys, tmp_path, name, text) -> None:
    path = tmp_path / name
    path.write_text(text)
    trace = load_trace(path)
    assert (trace.arrival_s, trace.prompt, trace.output) == ([0.0, 1.0], [374, 396], [44, 109])
    code, out, err = simulate(capsys, "--trace", str(path), "--json")
    assert code == 0, err
    assert json.loads(out)["requests"] == 2


def test_a_json_lines_row_names_its_line(tmp_path) -> None:
    path = tmp_path / "trace.jsonl"
    path.write_text('{"arrival_s": 0, "prompt_tokens": 3, "output_tokens": 4}\n\n'
                    '{"arrival_s": 1, "prompt_tokens": 2.5, "output_tokens": 4}\n')
    with pytest.raises(SpecError, match=r"trace.jsonl:3: prompt_tokens '2.5' is not a whole number"):
        load_trace(path)
