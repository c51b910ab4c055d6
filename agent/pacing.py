"""Background work that yields to serving: at most a fraction of the time, and cancellable.

A live reconfiguration copies weights and KV while the old configuration keeps serving on
the same cores. `Pacer(max_overhead=0.05)` lets each piece of that work run, then sleeps so
that the work takes at most 5 % of the wall time: a piece that used t seconds of CPU is
followed by t * (1 - f) / f seconds of rest. On a CPU worker this bounds how much the copy
slows serving. Work is the thread's CPU time, not wall time: on a busy host a piece waits for
a core, and counting that wait would make the copy rest for the serving it yielded to.

The share may change while the work runs (`max_overhead` given as a function): a deployment
with nothing to serve lets the copy run at full speed, and a rest in progress ends early.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

REST_SLICE_S = 0.05  # how soon a rest notices that the share changed


class Cancelled(RuntimeError):
    """The apply this work belongs to was cancelled or aborted."""


class Pacer:
    def __init__(self, max_overhead: float | Callable[[], float] = 1.0, cancel: threading.Event | None = None):
        self._share = max_overhead if callable(max_overhead) else (lambda: max_overhead)
        _ = self.max_overhead  # raises on a share outside (0, 1]
        self.cancel = cancel or threading.Event()
        self.work_s = 0.0  # time spent working (not resting)
        self._owed = 0.0

    @property
    def max_overhead(self) -> float:
        share = float(self._share())
        if not 0 < share <= 1:
            raise ValueError(f"max_overhead must be in (0, 1], got {share}")
        return share

    def check(self) -> None:
        if self.cancel.is_set():
            raise Cancelled("cancelled")

    @contextmanager
    def piece(self, rest: bool = True) -> Iterator[None]:
        """Runs one piece of work, then rests in proportion to it (or, with `rest=False`,
        leaves the rest owed for `rest()`, so that what follows the work - sending it - is
        not delayed)."""
        self.check()
        start = time.thread_time()
        yield
        took = time.thread_time() - start
        self.work_s += took
        share = self.max_overhead
        self._owed += took * (1 - share) / share
        if rest:
            self.rest()

    def rest(self) -> None:
        """Sleeps the rest the work so far has earned (less, if the share rises to all of the
        time meanwhile); raises Cancelled if cancelled meanwhile."""
        owed, self._owed = self._owed, 0.0
        until = time.monotonic() + owed
        while (left := until - time.monotonic()) > 0 and self.max_overhead < 1:
            if self.cancel.wait(min(left, REST_SLICE_S)):
                raise Cancelled("cancelled")
        self.check()
