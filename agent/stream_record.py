"""One streamed completion as a client saw it: its text and when each chunk arrived, and the
figures read from those times (gaps, stall inside a window, TPOT). Used by `pipeshift demo`
and the benchmarks."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field


@dataclass
class Stream:
    """One streamed completion: its text, and when each chunk with text arrived."""

    prompt_tokens: int
    text: str = ""
    times: list[float] = field(default_factory=list)
    started_s: float = 0.0
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None

    @property
    def ttft_s(self) -> float | None:
        return self.times[0] - self.started_s if self.times else None

    @property
    def mean_tpot_s(self) -> float | None:
        """Returns the mean gap between chunks over the whole stream (None below two chunks)."""
        if len(self.times) < 2:
            return None
        return (self.times[-1] - self.times[0]) / (len(self.times) - 1)

    def gaps(self) -> list[tuple[float, float]]:
        """Returns (time, gap since the previous chunk) for every chunk after the first."""
        return [(b, b - a) for a, b in zip(self.times, self.times[1:], strict=False)]

    def stall_s(self, window: tuple[float, float]) -> float | None:
        """Returns the largest gap inside `window` minus the median gap before it (None when
        the stream has no gap before or inside the window)."""
        gaps = self.gaps()
        before = [g for t, g in gaps if t < window[0]]
        inside = [g for t, g in gaps if window[0] <= t <= window[1]]
        if not before or not inside:
            return None
        return max(inside) - statistics.median(before)

    def tpot_s(self, window: tuple[float, float]) -> float | None:
        """Returns the mean gap between chunks inside `window`."""
        inside = [g for t, g in self.gaps() if window[0] <= t <= window[1]]
        return statistics.fmean(inside) if inside else None
