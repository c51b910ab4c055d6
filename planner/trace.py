"""Request traces: when each request arrives and how long its prompt and output are.

    trace = load_trace("AzureLLMInferenceTrace_conv.csv", rate_scale=2.0, duration_s=600)

A trace is a CSV, or JSON Lines of one object per request, with Azure's LLM inference trace
columns (TIMESTAMP, ContextTokens, GeneratedTokens) or arrival_s, prompt_tokens,
output_tokens (TRACE_FORMATS). The simulator,
the benchmarks' load generators and a spec's `workload.trace` read it here.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from planner.spec import SpecError


@dataclass
class Trace:
    arrival_s: list[float]
    prompt: list[int]
    output: list[int]

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def duration_s(self) -> float:
        return self.arrival_s[-1] - self.arrival_s[0] if self.arrival_s else 0.0

    def subset(self, indices: Sequence[int], shift_s: float = 0.0) -> Trace:
        """Returns the requests at `indices`, in that order, arriving `shift_s` earlier."""
        return Trace(
            [self.arrival_s[i] - shift_s for i in indices],
            [self.prompt[i] for i in indices],
            [self.output[i] for i in indices],
        )


# The columns a trace may use: Azure's LLM inference traces (an ISO timestamp per request), or
# the spec traces' own (seconds from any origin), as data/specs/traces/chat-sample.csv. Names
# match whatever their case.
TRACE_FORMATS = (
    ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    ("arrival_s", "prompt_tokens", "output_tokens"),
)
# The delimiters a CSV export may use (a spreadsheet in a comma-decimal locale writes ";").
DELIMITERS = ",;\t|"

Row = dict[str, Any]


def load_trace(path: str | Path, rate_scale: float = 1.0, duration_s: float | None = None) -> Trace:
    """Returns the requests of a trace (CSV, or JSONL with one object per request), arrivals
    from 0 s, inter-arrival times divided by `rate_scale`, cut after `duration_s`. The columns
    are Azure's (TIMESTAMP, ContextTokens, GeneratedTokens) or arrival_s, prompt_tokens,
    output_tokens (TRACE_FORMATS). Raises SpecError saying what is wrong: a missing file or
    column, a row that does not parse."""
    p = Path(path)
    if not (math.isfinite(rate_scale) and rate_scale > 0):
        raise SpecError([f"the rate scale must be a positive number, got {rate_scale}"])
    columns, rows = read_rows(p)
    if not columns:
        raise SpecError([f"{p}: trace has no requests"])
    named = next((n for f in TRACE_FORMATS if (n := find_columns(columns, f)) is not None), None)
    if named is None:
        wanted = " or ".join(", ".join(f) for f in TRACE_FORMATS)
        raise SpecError([f"{p}: needs the columns {wanted}; it has {', '.join(columns)}"])
    if not rows:
        raise SpecError([f"{p}: trace has no requests"])
    time_col, prompt_col, output_col = named
    t: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    for line, r in rows:
        try:
            t.append(_arrival_s(r.get(time_col), time_col))
            prompts.append(max(1, token_count(r.get(prompt_col), prompt_col)))
            outputs.append(max(1, token_count(r.get(output_col), output_col)))
        except ValueError as exc:
            raise SpecError([f"{p}:{line}: {exc}; fix or remove the row"]) from None
    order = sorted(range(len(t)), key=t.__getitem__)
    t0 = t[order[0]]
    out = Trace([], [], [])
    for i in order:
        a = (t[i] - t0) / rate_scale
        if duration_s is not None and a > duration_s:
            break
        out.arrival_s.append(a)
        out.prompt.append(prompts[i])
        out.output.append(outputs[i])
    return out


def find_columns(columns: Sequence[str], wanted: Sequence[str]) -> list[str] | None:
    """Returns the names in `columns` of each of `wanted`, matched whatever their case; None
    when one is missing."""
    by_lower = {c.lower(): c for c in columns}
    found = [by_lower.get(w.lower()) for w in wanted]
    return None if None in found else found  # type: ignore[return-value]


def read_rows(path: Path) -> tuple[list[str], list[tuple[int, Row]]]:
    """Returns a trace file's column names and its rows, each with its line number: a CSV
    (.csv or any other name) or JSON Lines (.jsonl, one object per line; the columns are the
    keys the objects use). Raises SpecError for a file it cannot read or a line that is not
    an object.

    A byte-order mark before the header (a spreadsheet's export) and spaces around the names
    ("TIMESTAMP, ContextTokens") are not part of the names; the delimiter is the one of
    DELIMITERS the header line uses most."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise SpecError([f"{path}: trace file not found; check the path"]) from None
    except UnicodeDecodeError:
        raise SpecError([f"{path}: not a text (UTF-8) file; give the trace as CSV or JSONL"]) from None
    except OSError as exc:
        raise SpecError([f"{path}: cannot read the trace: {exc.strerror or exc}"]) from None
    if path.suffix.lower() == ".jsonl":
        rows = _jsonl_rows(path, text)
        return list(dict.fromkeys(k for _, r in rows for k in r)), rows
    header = text.split("\n", 1)[0]
    delimiter = max(DELIMITERS, key=header.count) if any(d in header for d in DELIMITERS) else ","
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
        reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
        return list(reader.fieldnames), [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise SpecError([f"{path}: cannot read the trace: {exc}"]) from None


def _jsonl_rows(path: Path, text: str) -> list[tuple[int, Row]]:
    """Returns (line number, object) for each non-blank line; raises SpecError naming the line
    that is not a JSON object."""
    rows = []
    for line, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise SpecError([
                f"{path}:{line}: not a JSON object such as "
                '{"prompt_tokens": 120, "output_tokens": 40}; fix or remove the line'
            ])
        rows.append((line, row))
    return rows


def _arrival_s(value: Any, column: str) -> float:
    """Returns a trace row's arrival in seconds: an ISO date and time (TIMESTAMP, to the
    microsecond; UTC unless it names its offset, as Azure's 2024 traces do) or a number of
    seconds (arrival_s)."""
    text = _text(value, column)
    if column.lower() == "timestamp":
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(
                f"{column} {text!r} is not a date and time such as 2023-11-16 18:15:46.680"
            ) from None
        # A time without an offset is read as UTC, not as this machine's local time, whose
        # daylight-saving jumps would move arrivals and which would differ from an offset row's.
        return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"{column} {text!r} is not a number of seconds") from None
    if not math.isfinite(seconds):
        raise ValueError(f"{column} {text!r} is not a number of seconds")
    return seconds


def token_count(value: Any, column: str) -> int:
    """Returns a row's count of tokens: a whole number, written as one ("120", 120 or 120.0);
    raises ValueError saying what is wrong with it."""
    text = _text(value, column)
    try:
        n = float(text)
    except ValueError:
        n = math.nan
    if not (math.isfinite(n) and n == int(n)):
        raise ValueError(f"{column} {text!r} is not a whole number of tokens")
    if n < 0:
        raise ValueError(f"{column} {text!r} is not a number of tokens: it is negative")
    return int(n)


def _text(value: Any, column: str) -> str:
    """A cell as text: a CSV's string, or a JSON number; raises ValueError when it is empty."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{column} is missing")
    return value.strip() if isinstance(value, str) else str(value)
