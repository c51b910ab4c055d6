"""A stage is hung when one step runs past the timeout without computing; a loaded host that
only slows its steps is not a hang."""

from __future__ import annotations

import threading
import time

import pytest

from agent.engine import HUNG_HARD_LIMIT, is_hung
from agent.stage_loop import StageHost


def test_the_rule():
    assert not is_hung(5.0, 0.0, hang_timeout_s=10.0)  # within the timeout
    assert is_hung(12.0, 0.01, hang_timeout_s=10.0)  # blocked: no CPU used
    assert not is_hung(12.0, 1.2, hang_timeout_s=10.0)  # slow: a tenth of a core, computing
    assert is_hung(HUNG_HARD_LIMIT * 10.0 + 1, 50.0, hang_timeout_s=10.0)  # too long anyway
    assert is_hung(12.0, None, hang_timeout_s=10.0)  # no CPU clock: the wall clock decides


@pytest.mark.skipif(not hasattr(time, "pthread_getcpuclockid"), reason="no per-thread CPU clock")
@pytest.mark.parametrize("computing", [True, False])
def test_a_step_reports_the_cpu_its_thread_used(computing):
    host = StageHost.__new__(StageHost)  # only the bookkeeping of `computing` is used here
    host.compute_lock, host.busy_s, host.busy_since, host._busy_clock = threading.Lock(), 0.0, None, None
    release = threading.Event()

    def step() -> None:
        with host.computing():
            if computing:
                deadline = time.monotonic() + 0.3
                while time.monotonic() < deadline:
                    sum(range(1000))
            release.wait(5)

    assert host.busy_cpu_s() is None
    thread = threading.Thread(target=step)
    thread.start()
    time.sleep(0.35)
    used_s = host.busy_cpu_s()
    release.set()
    thread.join()
    assert used_s is not None
    assert (used_s > 0.05) if computing else (used_s < 0.05)
    assert host.busy_cpu_s() is None and host.busy_s >= 0.3
