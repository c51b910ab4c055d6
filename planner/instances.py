"""Random small planning problems (pure numbers) for the solver checks and the benchmark."""

from __future__ import annotations

import random
from dataclasses import replace

from planner.problem import Device, KindCosts, PlanningProblem, PoolProblem

GIB = 2**30


def random_small_problem(seed: int, max_devices: int = 8, max_layers: int = 32) -> PlanningProblem:
    """Returns a random problem with <= max_devices devices of 1-3 kinds and <= max_layers layers."""
    rng = random.Random(seed)
    n_layers = rng.randint(4, max_layers)
    n_kinds = rng.randint(1, 3)
    n_devices = rng.randint(n_kinds, max_devices)
    counts = [1] * n_kinds
    for _ in range(n_devices - n_kinds):
        counts[rng.randrange(n_kinds)] += 1
    layer_bytes = 1.0 * GIB
    kinds = []
    for k in range(n_kinds):
        decode_s = rng.uniform(0.5e-3, 5e-3)
        # memory for between 2 and ~1.3 L layers, so some instances need several stages
        layers_fit = rng.randint(2, max(2, int(n_layers * 1.3)))
        kinds.append(
            KindCosts(
                name=f"kind{k}",
                layer_decode_s=decode_s,
                layer_prefill_s=decode_s * rng.uniform(5, 20),
                embed_decode_s=rng.uniform(0, 1e-3),
                embed_prefill_s=rng.uniform(0, 5e-3),
                head_decode_s=rng.uniform(0, 3e-3),
                head_prefill_s=rng.uniform(0, 3e-3),
                memory_bytes=(layers_fit + 0.5) * layer_bytes * 1.1 + 0.3 * GIB,
            )
        )
    devices = tuple(
        Device(name=f"d{k}.{i}", kind=k, node=f"n{i % 2}")
        for k in range(n_kinds)
        for i in range(counts[k])
    )
    tpot = None
    if rng.random() < 0.5:
        tpot = rng.uniform(2, 8) * n_layers * min(k.layer_decode_s for k in kinds)
    return PlanningProblem(
        model_name=f"random-{seed}",
        n_layers=n_layers,
        batch=8,
        kinds=tuple(kinds),
        devices=devices,
        layer_weight_bytes=layer_bytes,
        embed_weight_bytes=0.2 * GIB,
        head_weight_bytes=0.2 * GIB,
        tied_embeddings=False,
        kv_bytes_per_seq_per_layer=0.01 * GIB / 8,
        hop_decode_s=rng.uniform(0, 1e-3),
        hop_prefill_s=rng.uniform(0, 5e-3),
        tpot_slo_s=tpot,
        max_stages=min(n_devices, n_layers),
    )


def random_pool_problem(seed: int, n_models: int = 2, max_devices: int = 7) -> PoolProblem:
    """Returns 2-3 random models (own layer counts, speeds, sizes, demands, weights) sharing
    one random pool of <= max_devices devices."""
    rng = random.Random(5000 + seed)
    base = random_small_problem(seed, max_devices=max_devices, max_layers=20)
    problems = []
    for m in range(n_models):
        n_layers = rng.randint(4, 20)
        speed = rng.uniform(0.5, 2.0)  # a bigger model is slower per layer
        kinds = tuple(
            replace(
                k,
                layer_decode_s=k.layer_decode_s * speed,
                layer_prefill_s=k.layer_prefill_s * speed,
            )
            for k in base.kinds
        )
        model = replace(
            base,
            model_name=f"random-{seed}-m{m}",
            n_layers=n_layers,
            kinds=kinds,
            layer_weight_bytes=base.layer_weight_bytes * rng.uniform(0.3, 1.2),
            tpot_slo_s=None,
            max_stages=min(len(base.devices), n_layers),
        )
        # demand between a tenth of one pipeline's rate and the whole pool's
        one = model.batch / (n_layers * min(k.layer_decode_s for k in kinds))
        problems.append(replace(model, demand_tok_s=rng.uniform(0.1, 1.0) * one * 2))
    return PoolProblem(
        problems=tuple(problems),
        labels=tuple(f"m{m}" for m in range(n_models)),
        weights=tuple(rng.choice((1.0, 1.0, 2.0, 0.5)) for _ in range(n_models)),
    )
