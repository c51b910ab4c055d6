"""When each request's tokens left the gateway, kept for a while after the request ends, and
the serving figures read from those times around an apply: TTFT and TPOT before, during and
after it, and every stream's token times (what `pipeshift show --plot` draws)."""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

KEEP_S = 900.0  # how long an ended request's times are kept
MAX_KEPT = 20_000  # ended requests kept at most
WINDOW_S = 10.0  # length of the "before" and "after" windows of an apply
MAX_STREAMS = 64  # streams reported per apply, at most


@dataclass
class RequestTokens:
    number: int
    arrival_s: float  # unix time
    token_s: list[float] = field(default_factory=list)  # unix time of each token
    ended_s: float | None = None

    def ttft_s(self) -> float | None:
        return self.token_s[0] - self.arrival_s if self.token_s else None

    def gaps(self) -> list[tuple[float, float]]:
        """(time, gap since the previous token) of every token after the first."""
        return [(b, b - a) for a, b in zip(self.token_s, self.token_s[1:], strict=False)]


class TokenLog:
    def __init__(self, keep_s: float = KEEP_S, max_kept: int = MAX_KEPT):
        self.keep_s, self.max_kept = keep_s, max_kept
        self._lock = threading.Lock()
        self._live: dict[int, RequestTokens] = {}
        self._ended: deque[RequestTokens] = deque()
        self._count = 0

    def open(self, arrival_s: float) -> RequestTokens:
        with self._lock:
            self._count += 1
            entry = RequestTokens(self._count, arrival_s)
            self._live[entry.number] = entry
            return entry

    def tokens(self, entry: RequestTokens, n: int, now_s: float) -> None:
        """Records `n` tokens that left at `now_s` (several in one event share the time)."""
        entry.token_s.extend([now_s] * n)

    def close(self, entry: RequestTokens, now_s: float) -> None:
        with self._lock:
            if self._live.pop(entry.number, None) is None:
                return
            entry.ended_s = now_s
            self._ended.append(entry)
            while self._ended and (len(self._ended) > self.max_kept or self._ended[0].ended_s < now_s - self.keep_s):
                self._ended.popleft()

    def overlapping(self, start_s: float, end_s: float) -> list[RequestTokens]:
        """Returns the requests alive at some moment of [start_s, end_s], by arrival."""
        with self._lock:
            entries = [*self._ended, *self._live.values()]
        return sorted((e for e in entries if e.arrival_s <= end_s and (e.ended_s is None or e.ended_s >= start_s)),
                      key=lambda e: e.arrival_s)


def _ms(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


def window_figures(entries: list[RequestTokens], start_s: float, end_s: float) -> dict[str, Any]:
    """TTFT of the requests whose first token came inside the window; TPOT of the gaps that
    ended inside it (milliseconds, median, p99 and mean)."""
    ttfts = [e.ttft_s() for e in entries if e.token_s and start_s <= e.token_s[0] <= end_s]
    gaps = [g for e in entries for t, g in e.gaps() if start_s <= t <= end_s]
    return {
        "start": start_s, "end": end_s, "tokens": sum(1 for e in entries for t in e.token_s if start_s <= t <= end_s),
        "first_tokens": len(ttfts),
        "ttft_ms_p50": _ms(ttfts, 0.5), "ttft_ms_p99": _ms(ttfts, 0.99),
        "tpot_ms_p50": _ms(gaps, 0.5), "tpot_ms_p99": _ms(gaps, 0.99),
        "tpot_ms_mean": round(1000 * statistics.fmean(gaps), 3) if gaps else None,
        "max_gap_ms": _ms(gaps, 1.0),
    }


def serving_report(log: TokenLog, started_s: float, finished_s: float | None, window_s: float = WINDOW_S,
                   now_s: float | None = None) -> dict[str, Any]:
    """Returns TTFT/TPOT before, during and after an apply that ran [started_s, finished_s]
    (still running: up to now), and the token times of the streams that overlapped them."""
    now_s = time.time() if now_s is None else now_s
    end_s = finished_s if finished_s is not None else now_s
    windows = {
        "before": (started_s - window_s, started_s),
        "during": (started_s, end_s),
        "after": (end_s, min(end_s + window_s, now_s)) if finished_s is not None else None,
    }
    entries = log.overlapping(started_s - window_s, windows["after"][1] if windows["after"] else end_s)
    shown = entries[-MAX_STREAMS:]
    return {
        "window_s": window_s,
        "windows": {name: (window_figures(entries, *span) if span else None) for name, span in windows.items()},
        "streams": [{"request": e.number, "arrival": round(e.arrival_s, 4), "ended": e.ended_s,
                     "tokens": [round(t, 4) for t in e.token_s]} for e in shown],
        "streams_left_out": len(entries) - len(shown),
    }
