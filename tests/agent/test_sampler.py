"""agent.sampler: greedy at temperature 0, per-request seeded sampling, top-p."""

from __future__ import annotations

import torch

from agent.sampler import Sampler, process_logits

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


def test_top_k_and_min_p_keep_only_the_likeliest_tokens():
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    logits = probs.log().unsqueeze(0)
    sampler = Sampler()

    def seen(**params: float) -> set[int]:
        return {sampler.sample(logits, ["r"], [{"temperature": 1.0, **params}])[0] for _ in range(300)}

    assert seen() == {0, 1, 2, 3}
    assert seen(top_k=2) == {0, 1}
    assert seen(top_k=1) == {0}
    assert seen(top_k=10) == {0, 1, 2, 3}  # more than the vocabulary keeps all
    assert seen(min_p=0.4) == {0, 1, 2}  # 0.1 < 0.4 x 0.4 <= 0.2
    assert seen(min_p=0.6) == {0, 1}
    # top-p then takes its mass from what top-k left: 0.4 / 0.7 < 0.6 needs the second token
    assert seen(top_k=2, top_p=0.6) == {0, 1}
    assert seen(top_k=3, top_p=0.4) == {0}  # 0.4 / 0.9 >= 0.4 stops at the first


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


# ---- logit bias and penalties, against a plain-Python reference of their formulas ----------


def reference_logits(logits: list[float], prompt: list[int], output: list[int], *, bias=(),
                     repetition=1.0, frequency=0.0, presence=0.0) -> list[float]:
    """vLLM's order, one token at a time: bias, then repetition, frequency, presence."""
    out = list(logits)
    for t, b in bias:
        out[t] += b
    for t in range(len(out)):
        if t in prompt or t in output:
            out[t] = out[t] / repetition if out[t] > 0 else out[t] * repetition
        count = output.count(t)
        out[t] -= frequency * count + presence * (1.0 if count else 0.0)
    return out


def test_penalties_and_bias_follow_their_formulas():
    logits = random_logits(1, seed=7)[0] * 3
    prompt, output = [1, 2, 3, 3], [3, 5, 5, 5, 9]
    cases = [
        {"bias": [(4, 2.5), (60, -100.0)]},
        {"repetition": 1.3},
        {"repetition": 0.7},
        {"frequency": 0.4},
        {"presence": -0.6},
        {"bias": [(5, 1.0)], "repetition": 1.2, "frequency": 0.5, "presence": 0.25},
    ]
    for case in cases:
        params = {
            "logit_bias": [list(b) for b in case.get("bias", ())],
            "repetition_penalty": case.get("repetition", 1.0),
            "frequency_penalty": case.get("frequency", 0.0),
            "presence_penalty": case.get("presence", 0.0),
            "prompt_ids": prompt, "output_ids": output,
        }
        expected = torch.tensor(reference_logits(logits.tolist(), prompt, output, **case))
        got = process_logits(logits, params)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        assert not torch.equal(got, logits)  # each case changes something


def test_repetition_penalty_reads_the_prompt_frequency_only_the_output():
    logits = torch.ones(VOCAB)
    got = process_logits(logits, {"repetition_penalty": 2.0, "frequency_penalty": 1.0,
                                  "prompt_ids": [1], "output_ids": [2, 2]})
    assert got[1] == 0.5  # seen in the prompt: divided, not counted
    assert got[2] == 0.5 - 2.0  # seen twice in the output: divided, then 2 x 1.0 subtracted
    assert got[0] == 1.0


def test_bias_steers_greedy_and_logprobs_come_from_the_processed_logits():
    logits = random_logits(1, seed=3)
    target = int(logits[0].argmin())
    params = {"temperature": 0.0, "logit_bias": [[target, 100.0]], "logprobs": 3}
    (choice,) = Sampler().choose(logits, ["r"], [params])
    assert choice.token == target
    expected = torch.log_softmax(process_logits(logits[0], params), dim=-1)
    assert choice.logprob == float(expected[target])
    assert choice.top[0] == (target, choice.logprob)  # the same number, compared exactly
    assert [t for t, _ in choice.top] == expected.topk(3).indices.tolist()


def test_logprobs_without_processing_are_the_models_log_softmax():
    logits = random_logits(3, seed=11)
    params = [{"logprobs": 0}, {}, {"logprobs": 2, "temperature": 1.0, "seed": 1}]
    chosen = Sampler().choose(logits, ["a", "b", "c"], params)
    expected = torch.log_softmax(logits, dim=-1)
    assert chosen[0].logprob == float(expected[0, chosen[0].token]) and chosen[0].top is None
    assert chosen[1].logprob is None
    assert chosen[2].logprob == float(expected[2, chosen[2].token])  # before temperature
    assert [lp for _, lp in chosen[2].top] == expected[2].topk(2).values.tolist()
    assert chosen[2].to_json() == [chosen[2].token, chosen[2].logprob, [list(t) for t in chosen[2].top]]
