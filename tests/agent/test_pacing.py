"""agent.pacing: background work takes at most its share of the time, and stops on cancel."""

from __future__ import annotations

import threading
import time

import pytest

from agent.pacing import Cancelled, Pacer


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_pieces_rest_so_that_work_is_at_most_the_given_share_of_the_time():
    pacer = Pacer(max_overhead=0.25)
    began = time.perf_counter()
    for _ in range(4):
        with pacer.piece():
            _burn(0.02)
    wall = time.perf_counter() - began
    assert pacer.work_s == pytest.approx(0.08, rel=0.3)
    assert wall >= pacer.work_s / 0.25 * 0.95  # 80 ms of work spread over >= 320 ms


def test_waiting_is_not_work():
    """Time a piece spends blocked (another process's turn) is not charged as work."""
    pacer = Pacer(max_overhead=0.1)
    began = time.perf_counter()
    with pacer.piece():
        time.sleep(0.1)
    assert pacer.work_s < 0.02
    assert time.perf_counter() - began < 0.3


def test_cancel_interrupts_the_rest_and_refuses_the_next_piece():
    cancel = threading.Event()
    pacer = Pacer(max_overhead=0.01, cancel=cancel)
    threading.Timer(0.05, cancel.set).start()
    began = time.perf_counter()
    with pytest.raises(Cancelled):
        with pacer.piece():
            _burn(0.02)  # would rest ~2 s
    assert time.perf_counter() - began < 1.0
    with pytest.raises(Cancelled):
        with pacer.piece():
            pass


def test_max_overhead_must_be_a_share():
    for bad in (0, -0.1, 1.5):
        with pytest.raises(ValueError, match="max_overhead"):
            Pacer(bad)


def test_a_share_raised_to_all_of_the_time_ends_the_rest_in_progress():
    share = {"now": 0.01}
    pacer = Pacer(max_overhead=lambda: share["now"])
    with pacer.piece(rest=False):
        _burn(0.02)  # earns ~2 s of rest at 1 %
    threading.Timer(0.1, lambda: share.update(now=1.0)).start()
    began = time.perf_counter()
    pacer.rest()
    assert time.perf_counter() - began < 0.5


def test_a_share_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="max_overhead"):
        Pacer(max_overhead=0.0)
    with pytest.raises(ValueError, match="max_overhead"):
        Pacer(max_overhead=lambda: 1.5)
