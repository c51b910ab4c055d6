"""The check both exactness tests make: every backend reaches the exact DP's optimum."""

from __future__ import annotations

import pytest

from planner.dp import reference_throughput_tok_s
from planner.solve import BACKENDS, plan


def assert_backends_hit_reference(problem) -> None:
    """Every backend answers the reference optimum (or INFEASIBLE when it is 0), and the
    concrete pipelines, costed hop by hop, deliver what the objective says."""
    ref = reference_throughput_tok_s(problem)
    for backend in BACKENDS:
        r = plan(problem, backend, 10.0)
        if ref == 0:
            assert r.status == "INFEASIBLE", backend
            continue
        assert r.status == "OPTIMAL", backend
        assert r.objective == pytest.approx(ref, rel=1e-7), backend
        assert r.throughput_tok_s == pytest.approx(ref, rel=1e-7), backend
