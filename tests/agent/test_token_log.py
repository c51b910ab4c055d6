"""The token log and the serving figures read from it around an apply."""

from __future__ import annotations

import pytest

from agent.token_log import TokenLog, serving_report, window_figures


def _stream(log: TokenLog, arrival: float, times: list[float], ended: float | None = None):
    entry = log.open(arrival)
    for t in times:
        log.tokens(entry, 1, t)
    if ended is not None:
        log.close(entry, ended)
    return entry


def test_windows_split_ttft_and_gaps_at_the_apply():
    log = TokenLog()
    # Tokens every 0.1 s from 100.5 to 105.5; the apply runs [102, 103] and holds one gap of 0.5 s.
    times = [100.5 + 0.1 * i for i in range(16)] + [102.5 + 0.1 * i for i in range(31)]
    _stream(log, 100.0, times, ended=times[-1])
    _stream(log, 103.5, [103.9, 104.0], ended=104.0)  # arrives after the apply
    _stream(log, 10.0, [10.1], ended=10.1)  # long before: not reported
    report = serving_report(log, 102.0, 103.0, window_s=2.0, now_s=200.0)
    before, during, after = (report["windows"][w] for w in ("before", "during", "after"))
    assert before["tpot_ms_p50"] == pytest.approx(100, abs=1) and before["ttft_ms_p50"] == pytest.approx(500, abs=1)
    assert during["max_gap_ms"] == pytest.approx(500, abs=1)
    assert after["ttft_ms_p50"] == pytest.approx(400, abs=1) and after["first_tokens"] == 1
    assert after["tpot_ms_p50"] == pytest.approx(100, abs=1)
    assert [s["arrival"] for s in report["streams"]] == [100.0, 103.5]
    assert report["streams"][0]["tokens"][:2] == [100.5, 100.6]


def test_a_running_apply_has_no_after_window_and_live_requests_count():
    log = TokenLog()
    _stream(log, 50.0, [50.2, 50.3, 50.4])  # still streaming
    report = serving_report(log, 50.25, None, window_s=1.0, now_s=50.5)
    assert report["windows"]["after"] is None
    assert report["windows"]["during"]["tokens"] == 2 and len(report["streams"]) == 1


def test_ended_requests_are_forgotten_after_keep_s():
    log = TokenLog(keep_s=10.0)
    _stream(log, 0.0, [0.5], ended=1.0)
    _stream(log, 20.0, [20.5], ended=21.0)  # closing this one drops the first
    assert [e.arrival_s for e in log.overlapping(0.0, 100.0)] == [20.0]
    assert window_figures([], 0.0, 1.0)["tpot_ms_p50"] is None
