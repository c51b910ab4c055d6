"""agent.sampler: greedy at temperature 0, per-request seeded sampling, top-p."""

from __future__ import annotations

import torch

from agent.sampler import Sampler

VOCAB = 64


def random_logits(rows: int, seed: int) -> torch.Tensor:
    return torch.randn((rows, VOCAB), generator=torch.Generator().manual_seed(seed))


def test_temperature_zero_is_argmax():
    logits = random_logits(8, seed=0)
    sampler = Sampler()
    rids = [f"r{i}" for i in range(8)]
    expected = logits.argmax(dim=-1).tolist()
    assert (
        sampler.sample(logits, rids, [{"temperature": 0.0, "seed": i} for i in range(8)])
        == expected
    )
    assert sampler.sample(logits, rids, [{} for _ in range(8)]) == expected  # greedy by default


def test_only_rows_with_temperature_are_sampled():
    logits = torch.zeros((2, VOCAB))
    logits[:, 5] = 1.0  # a near-flat distribution: sampling would rarely pick 5 every time
    sampler = Sampler()
    picks = [
        sampler.sample(
            logits, ["greedy", "hot"], [{"temperature": 0.0}, {"temperature": 1.0, "seed": s}]
        )
        for s in range(20)
    ]
    assert all(p[0] == 5 for p in picks)
    assert any(p[1] != 5 for p in picks)


def test_same_seed_gives_same_tokens_whatever_else_is_in_the_batch():
    steps = [random_logits(1, seed=100 + i)[0] for i in range(30)]
    params = {"temperature": 1.0, "seed": 1234}

    alone = Sampler()
    expected = [alone.sample(row.unsqueeze(0), ["a"], [params])[0] for row in steps]

    crowded = Sampler()
    got = []
    for i, row in enumerate(steps):
        # Other requests, some sampled and some not, in front of and behind "a"; the row
        # order and batch size change from step to step.
        others = random_logits(1 + i % 3, seed=500 + i)
        logits = torch.cat([others[: i % 2], row.unsqueeze(0), others[i % 2 :]])
        rids = [f"x{j}" for j in range(len(others))]
        rids.insert(i % 2, "a")
        ps: list[dict] = [{"temperature": 0.7 + 0.1 * j, "seed": j} for j in range(len(others))]
        ps.insert(i % 2, params)
        got.append(crowded.sample(logits, rids, ps)[i % 2])
    assert got == expected
    assert len(set(expected)) > 1  # the test would be vacuous if the draw never varied


def test_tiny_top_p_always_picks_the_most_likely_token():
    logits = random_logits(4, seed=1) * 0.1  # close to flat, so only top-p can make it certain
    best = logits.argmax(dim=-1).tolist()
    sampler = Sampler()
    rids = [f"r{i}" for i in range(4)]
    for step in range(25):
        params = [{"temperature": 1.0, "top_p": 1e-6, "seed": step * 4 + i} for i in range(4)]
        assert sampler.sample(logits, rids, params) == best


def test_top_p_keeps_the_smallest_prefix_that_reaches_it():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0)
    sampler = Sampler()
    seen = {
        sampler.sample(logits, ["r"], [{"temperature": 1.0, "top_p": 0.7, "seed": 3}])[0]
        for _ in range(200)
    }
    assert seen == {0, 1}  # 0.5 < 0.7 needs the second token; 0.8 >= 0.7 stops there


def test_different_seeds_differ_on_a_flat_distribution():
    flat = torch.zeros((1, 1000))

    def draw(seed: int) -> list[int]:
        sampler = Sampler()
        return [
            sampler.sample(flat, ["r"], [{"temperature": 1.0, "seed": seed}])[0] for _ in range(10)
        ]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_same_seed_on_two_requests_in_one_batch_repeats_the_draw():
    flat = torch.zeros((2, 1000))
    sampler = Sampler()
    a, b = sampler.sample(flat, ["a", "b"], [{"temperature": 1.0, "seed": 9}] * 2)
    assert a == b  # each request has its own generator


def test_forget_restarts_a_requests_generator():
    flat = torch.zeros((1, 1000))
    sampler = Sampler()
    params = [{"temperature": 1.0, "seed": 42}]
    first = [sampler.sample(flat, ["r"], params)[0] for _ in range(5)]
    sampler.forget(["r"])
    again = [sampler.sample(flat, ["r"], params)[0] for _ in range(5)]
    assert first == again
