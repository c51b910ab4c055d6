"""The local spec's plan at the load the spec describes: the batches the engine forms at the
spec's rate, and the planner's own operating point at full micro-batches."""

import math

import pytest

from planner.build_problem import build_problem
from planner.load_prediction import predict_at_load
from planner.solve import plan
from planner.spec import load_spec

from .conftest import ROOT


def test_local_spec_at_its_rate_and_at_full_batches():
    spec = load_spec(ROOT / "data/specs/local-cpu-smollm2.yaml")
    problem = build_problem(spec)
    result = plan(problem)
    load = predict_at_load(spec, problem, result)
    # 0.5 req/s of 64 tokens: served in full, requests mostly alone on their pipeline (the
    # engine sends each to the least loaded one, so N running keep min(4, N) workers busy,
    # N ~ Poisson), and tokens faster than the planner's full batches
    rate = load.at_rate
    assert not rate.saturated and rate.throughput_tok_s == pytest.approx(32.0)
    assert all(b < 2 for b in rate.batch_per_pipeline)
    n = sum(rate.running_per_pipeline)
    p_k = [math.exp(-n) * n**k / math.factorial(k) for k in range(4)]
    spread = sum(k * p for k, p in enumerate(p_k)) + 4 * (1 - sum(p_k))
    assert rate.busy_workers == pytest.approx(spread, rel=1e-6)
    assert 1 < rate.busy_workers < 4 and rate.tpot_s < result.tpot_s
    # four replicas, one micro-batch of `batch` each: the planner's operating point, where its
    # throughput holds (prefill and the mean context make the difference)
    full = load.at_full_batches
    assert load.full_batch_clients == 4 * problem.batch
    assert full.busy_workers == 4 and full.contention == 2.0
    assert full.throughput_tok_s == pytest.approx(result.throughput_tok_s, rel=0.05)
    assert full.tpot_s == pytest.approx(result.tpot_s, rel=0.15)
