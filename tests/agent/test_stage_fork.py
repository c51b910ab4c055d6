"""agent.stage_loop: a step that forks a request's members (n > 1) and returns its prompt's
logprobs, on a tiny random Llama: the members' KV shares the prompt's blocks and decodes as a
request prefilled on its own would; the prompt logprobs are the log-softmax of every row."""

from __future__ import annotations

import torch

from agent.kv_cache import KVCacheSpec, PagedKVCache
from agent.model import LlamaStage
from agent.stage_loop import StageHost, StageLoop
from cost_models.model_catalog import ModelArch

ARCH = ModelArch("tiny", n_layers=2, hidden_size=32, ffn_size=64, n_heads=4, n_kv_heads=2, vocab_size=64,
                 max_context=64)
PROMPT = [3, 17, 5, 40, 9, 22, 11]  # 7 positions: one full block of 4 and a partial one
GREEDY = {"temperature": 0.0, "top_p": 1.0, "seed": None, "logprobs": 2}


def make_loop() -> StageLoop:
    torch.manual_seed(0)
    stage = LlamaStage(ARCH, 0, ARCH.n_layers)
    with torch.no_grad():
        for p in stage.parameters():
            p.normal_(0.0, 0.3)
    kv = PagedKVCache(KVCacheSpec(4, ARCH.n_kv_heads, ARCH.head_dim), range(0, ARCH.n_layers), 16)
    return StageLoop(StageHost(stage, kv), "e1/p0", 1, range(0, ARCH.n_layers), True, None, None)


def step(loop: StageLoop, ids, start, tokens, **extra) -> tuple[dict, dict]:
    header = {"op": "step", "epoch": 1, "mb": 0, "ids": ids, "start": start, "n_new": [len(t) for t in tokens],
              "sample": {rid: GREEDY for rid in [*ids, *(m for ms in extra.get("fork", {}).values() for m in ms)]},
              **extra}
    return loop.step(header, torch.tensor([t for chunk in tokens for t in chunk]))


def test_members_forked_after_the_prefill_decode_as_requests_of_their_own():
    loop = make_loop()
    kv = loop.host.kv
    sampled, prompt = step(loop, ["lead"], [0], [PROMPT], fork={"lead": ["m1", "m2"]},
                           prompt_logprobs={"lead": {"k": 2, "skip": 0, "targets": PROMPT[1:]}})
    assert {rid: s.token for rid, s in sampled.items()}.keys() == {"lead", "m1", "m2"}
    assert len({s.token for s in sampled.values()}) == 1  # greedy members are one
    assert kv.block_tables["m1"][0] == kv.block_tables["lead"][0] != kv.block_tables["m1"][1]
    assert kv.num_used_blocks == 4  # the full block once, the partial one three times

    # The prompt's logprobs: every row's log-softmax at the next prompt token, the top 2 beside.
    ref = make_loop()
    _, every_row = step(ref, ["ref"], [0], [PROMPT], prompt_logprobs={"ref": {"k": 2, "skip": 0, "targets": PROMPT[1:]}})
    assert prompt["lead"] == every_row["ref"] and len(prompt["lead"]) == len(PROMPT) - 1
    token, logprob, top = prompt["lead"][2]
    assert token == PROMPT[3] and len(top) == 2
    assert top[0][1] >= top[1][1] and top[0][1] >= logprob

    # A member's next step reads the shared prompt KV: it equals a request prefilled alone.
    first = sampled["lead"].token
    decoded, _ = step(loop, ["m1", "lead"], [7, 7], [[first], [first]])
    alone, _ = step(ref, ["ref"], [0], [[*PROMPT, first]])
    assert decoded["m1"].logprob == decoded["lead"].logprob
    assert abs(decoded["m1"].logprob - alone["ref"].logprob) < 1e-5
    assert decoded["m1"].token == alone["ref"].token
    kv.free("lead")
    kv.free("m2")
    assert kv.block_tables["m1"] and kv.shared_blocks() == 0


def test_a_prompt_prefilled_in_chunks_gets_each_logprob_once():
    from agent.engine_api import SamplingParams
    from agent.sequence import Sequence

    seq = Sequence("lead", PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=1), emit=lambda event: None)
    loop = make_loop()
    for start, end in ((0, 3), (3, 6), (6, 7)):
        wanted = seq.prompt_logprobs_wanted(start, end)  # none in the last: its row predicts the answer
        assert (wanted is None) == (start == 6)
        _, prompt = step(loop, ["lead"], [start], [PROMPT[start:end]], prompt_logprobs={"lead": wanted} if wanted else {})
        seq.prompt_logprobs.extend(prompt.get("lead", []))
        seq.num_computed = end
    assert seq.prompt_logprobs_wanted(0, 7) is None  # a recompute asks nothing again
    _, whole = step(make_loop(), ["ref"], [0], [PROMPT],
                    prompt_logprobs={"ref": {"k": 1, "skip": 0, "targets": PROMPT[1:]}})
    assert [e[0] for e in seq.prompt_logprobs] == PROMPT[1:]
    for chunked, once in zip(seq.prompt_logprobs, whole["ref"], strict=True):
        assert abs(chunked[1] - once[1]) < 1e-5 and chunked[2][0][0] == once[2][0][0]
