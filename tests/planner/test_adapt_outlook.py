"""The controller's goodput prediction: more capacity never looks worse, overload collapses."""

from __future__ import annotations

from pathlib import Path

from planner.adapt import UTILISATION, goodput_rps
from planner.spec import load_spec

ROOT = Path(__file__).resolve().parents[2]
SPEC = load_spec(ROOT / "data/specs/azure-conv-a100-l40s-llama31-8b.yaml")


def test_goodput_rises_with_capacity_and_is_continuous() -> None:
    rate = 10.0
    caps = [c / 10 for c in range(10, 400)]
    values = [goodput_rps(rate, c, SPEC) for c in caps]
    assert all(b >= a - 1e-9 for a, b in zip(values, values[1:], strict=False))
    # continuous where overload begins (rate = capacity) and where the margin ends
    assert abs(goodput_rps(rate, rate - 1e-6, SPEC) - goodput_rps(rate, rate + 1e-6, SPEC)) < 1e-3
    edge = rate / UTILISATION
    assert abs(goodput_rps(rate, edge - 1e-6, SPEC) - goodput_rps(rate, edge + 1e-6, SPEC)) < 1e-3
    assert goodput_rps(rate, rate / UTILISATION, SPEC) == rate


def test_overload_loses_nearly_every_request_not_just_the_excess() -> None:
    # 20 % past capacity: a FIFO queue misses the TTFT SLO within seconds
    assert goodput_rps(12.0, 10.0, SPEC) < 0.1 * 10.0
    # shedding below the load never pays at a device cost far below a device's capacity
    assert goodput_rps(10.0, 14.0, SPEC) - goodput_rps(10.0, 9.0, SPEC) > 5.0
