"""Request traces: when each request arrives and how long its prompt and output are.

    trace = load_trace("AzureLLMInferenceTrace_conv.csv", rate_scale=2.0, duration_s=600)

A trace CSV has Azure's LLM inference trace columns (TIMESTAMP, ContextTokens,
GeneratedTokens) or arrival_s, prompt_tokens, output_tokens (TRACE_FORMATS). The simulator,
the benchmarks' load generators and a spec's `workload.trace` read it here.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

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


# The columns a trace CSV may use: Azure's LLM inference traces (an ISO timestamp per request),
# or the spec traces' own (seconds from any origin), as data/specs/traces/chat-sample.csv.
TRACE_FORMATS = (
    ("TIMESTAMP", "ContextTokens", "GeneratedTokens"),
    ("arrival_s", "prompt_tokens", "output_tokens"),
)


def load_trace(path: str | Path, rate_scale: float = 1.0, duration_s: float | None = None) -> Trace:
    """Returns the requests of a trace CSV, arrivals from 0 s, inter-arrival times divided by
    `rate_scale`, cut after `duration_s`. The columns are Azure's (TIMESTAMP, ContextTokens,
    GeneratedTokens) or arrival_s, prompt_tokens, output_tokens (TRACE_FORMATS). Raises
    SpecError saying what is wrong: a missing file or column, a row that does not parse."""
    p = Path(path)
    if not (math.isfinite(rate_scale) and rate_scale > 0):
        raise SpecError([f"the rate scale must be a positive number, got {rate_scale}"])
    columns, rows = read_csv_rows(p)
    if not columns:
        raise SpecError([f"{p}: trace has no requests"])
    fmt = next((f for f in TRACE_FORMATS if set(f) <= set(columns)), None)
    if fmt is None:
        wanted = " or ".join(", ".join(f) for f in TRACE_FORMATS)
        raise SpecError([f"{p}: needs the columns {wanted}; it has {', '.join(columns)}"])
    if not rows:
        raise SpecError([f"{p}: trace has no requests"])
    time_col, prompt_col, output_col = fmt
    t: list[float] = []
    prompts: list[int] = []
    outputs: list[int] = []
    for line, r in enumerate(rows, start=2):
        try:
            t.append(_arrival_s(r.get(time_col), time_col))
            prompts.append(max(1, _token_count(r.get(prompt_col), prompt_col)))
            outputs.append(max(1, _token_count(r.get(output_col), output_col)))
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


def read_csv_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Returns a CSV's column names and rows; raises SpecError for a file it cannot read.

    A byte-order mark before the header (a spreadsheet's export) and spaces around the names
    ("TIMESTAMP, ContextTokens") are not part of the names."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            reader.fieldnames = [name.strip() for name in reader.fieldnames or []]
            return list(reader.fieldnames), list(reader)
    except FileNotFoundError:
        raise SpecError([f"{path}: trace file not found; check the path"]) from None
    except UnicodeDecodeError:
        raise SpecError([f"{path}: not a text CSV file; give a trace CSV"]) from None
    except (OSError, csv.Error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise SpecError([f"{path}: cannot read the trace: {reason}"]) from None


def _arrival_s(value: str | None, column: str) -> float:
    """Returns a trace row's arrival in seconds: an ISO date and time (TIMESTAMP, to the
    microsecond; UTC unless it names its offset, as Azure's 2024 traces do) or a number of
    seconds (arrival_s)."""
    if value is None or not value.strip():
        raise ValueError(f"{column} is missing")
    text = value.strip()
    if column == "TIMESTAMP":
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


def _token_count(value: str | None, column: str) -> int:
    if value is None or not value.strip():
        raise ValueError(f"{column} is missing")
    try:
        n = int(value.strip())
    except ValueError:
        raise ValueError(f"{column} {value.strip()!r} is not a whole number of tokens") from None
    if n < 0:
        raise ValueError(f"{column} {n} is negative")
    return n
