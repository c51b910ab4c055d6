"""What moving a pipeline's weights costs in the objective, node by node, with a topology.

Without a topology the migration term has one price mu (tokens/s per byte,
build_problem.with_current) and a new pipeline is charged mu * model_weight_bytes. With one,
a byte costs what the link that brings it to the receiving node costs. Each node n fetches
n_bytes (one layer) from its fastest source - the node of a device that holds the weights
now, over the link between the two, its own link when it holds them itself, or its disk
(cost_models.migration.fetch_s) - and its kinds fetch at
(planner/topology.node_fetch_bandwidths_bytes_per_s)

    bandwidth(n) = n_bytes / max over kinds k on n of fetch_s(n_bytes, k, links(h -> n), h holders)
    mu_p         = reference_tok_s / (bandwidth(node(p)) * R)     for every pool p on node n

(R the re-plan interval), so every pool of a node has its node's price, and the scalar mu
(what the KV term and a topology-blind reader use) is the slowest node's: max_p mu_p. A new
pipeline whose stage i (pool p_i, j_i layers) loads

    b_i = j_i * layer_weight_bytes + embed (first stage) + head (last stage; a copy when tied)

is charged

    C(pipeline) = sum_i mu_{p_i} * b_i

which is additive over stages, so column generation's pricing adds each stage's share to
its label (planner/column_generation.py). Without pool prices C = mu * model_weight_bytes,
as before.
"""

from __future__ import annotations

from collections.abc import Sequence

from planner.problem import PlanningProblem


def has_pool_prices(problem: PlanningProblem) -> bool:
    """Returns whether the migration term prices pools one by one (a topology was given)."""
    return problem.migration is not None and bool(problem.migration.pool_tok_s_per_byte)


def pool_price_tok_s_per_byte(problem: PlanningProblem, pool: int) -> float:
    """Returns mu_p: the objective's tokens/s per byte a stage on pool p loads (0 without a
    current configuration, the scalar mu without pool prices)."""
    mig = problem.migration
    if mig is None:
        return 0.0
    return mig.pool_tok_s_per_byte[pool] if mig.pool_tok_s_per_byte else mig.tok_s_per_byte


def stages_charge_tok_s(problem: PlanningProblem, stages: Sequence[tuple[int, int]]) -> float:
    """Returns C = sum_i mu_{p_i} * b_i of a new pipeline given as (pool, layers) per stage."""
    n = len(stages)
    return sum(
        pool_price_tok_s_per_byte(problem, p)
        * problem.stage_weight_bytes(j, first=i == 0, last=i == n - 1)
        for i, (p, j) in enumerate(stages)
    )


def split_margin_tok_s(problem: PlanningProblem) -> float:
    """Returns a margin M with C(c1) + C(c2) - C(c) <= M for any pipelines c, c1, c2: then
    v1 + v2 >= v + M means splitting c into c1 and c2 never loses (master.undominated).
    M = 2 * mu_max * (most bytes a pipeline loads) - mu_min * model_weight_bytes; without pool
    prices mu * model_weight_bytes, as before."""
    mig = problem.migration
    if mig is None:
        return 0.0
    if not mig.pool_tok_s_per_byte:
        return mig.tok_s_per_byte * problem.model_weight_bytes
    most = problem.model_weight_bytes + (
        problem.head_weight_bytes if problem.tied_embeddings else 0
    )
    return (
        2 * max(mig.pool_tok_s_per_byte) * most
        - min(mig.pool_tok_s_per_byte) * problem.model_weight_bytes
    )


def pricing_terms(problem: PlanningProblem) -> tuple[float, list[float]]:
    """Returns (constant, per-pool extra) of a lower bound on C that is additive over stages:

        C(pipeline) >= mu_min * model_weight_bytes + sum_i (mu_{p_i} - mu_min) * layer_weight_bytes

    (every stage loads at least one layer, a pipeline at least the model). Pricing adds the
    extra to a stage's price: its value is then an upper bound on the reduced cost, so the
    bound column generation certifies stays valid. Without pool prices: (mu * model bytes,
    zeros), the exact charge."""
    mig = problem.migration
    K = len(problem.kinds)
    if mig is None:
        return 0.0, [0.0] * K
    if not mig.pool_tok_s_per_byte:
        return mig.tok_s_per_byte * problem.model_weight_bytes, [0.0] * K
    low = min(mig.pool_tok_s_per_byte)
    extra = [(mu - low) * problem.layer_weight_bytes for mu in mig.pool_tok_s_per_byte]
    return low * problem.model_weight_bytes, extra
