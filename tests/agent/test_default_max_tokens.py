"""A request that sets no max_tokens gets the server's default, and the server must be able to
hold it: chat's default is all the room the context leaves (8154 tokens after SmolLM2's 38-token
chat prompt), more than the KV pool of `pipeshift serve --devices 1` (364 blocks of 16 tokens,
5824) or of any worker after an apply to four replicas. The README's first client example (no
max_tokens) was a 400 "lower max_tokens" there, naming a field the client never sent. The
default is now lowered to what the KV pool holds for the prompt."""

from __future__ import annotations

from fastapi.testclient import TestClient

from agent.engine import fit_default_output
from agent.engine_api import SamplingParams
from agent.gateway import create_app
from tests.gateway.fake_engine import FakeEngine

BLOCK = 16


def test_the_gateway_marks_a_max_tokens_the_client_did_not_set() -> None:
    engine = FakeEngine()
    client = TestClient(create_app(engine))
    user = [{"role": "user", "content": "Hi"}]
    assert client.post("/v1/chat/completions", json={"messages": user}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": user, "max_tokens": 5}).status_code == 200
    assert client.post("/v1/completions", json={"prompt": "Hi"}).status_code == 200
    default_chat, asked, default_completion = (params for _, _, params in engine.calls)
    assert (default_chat.max_tokens, default_chat.max_tokens_asked) == (61, False)  # 64 - 3
    assert (asked.max_tokens, asked.max_tokens_asked) == (5, True)
    assert (default_completion.max_tokens, default_completion.max_tokens_asked) == (16, False)


def test_a_default_max_tokens_is_lowered_to_what_the_kv_pool_holds() -> None:
    default = SamplingParams(max_tokens=8192 - 38, max_tokens_asked=False)
    fitted = fit_default_output(default, [38], capacity_blocks=364, block_size=BLOCK)
    assert fitted.max_tokens == 364 * BLOCK - 38
    assert -(-(38 + fitted.max_tokens) // BLOCK) == 364  # exactly the pool
    # n sequences are admitted together: each gets its share
    two = fit_default_output(SamplingParams(max_tokens=8154, max_tokens_asked=False, n=2), [38], 364, BLOCK)
    assert two.max_tokens == 182 * BLOCK - 38
    # the longest prompt of a batch decides
    assert fit_default_output(default, [38, 100], 364, BLOCK).max_tokens == 364 * BLOCK - 100


def test_what_the_client_asked_for_or_what_fits_is_left_alone() -> None:
    asked = SamplingParams(max_tokens=8154)
    assert fit_default_output(asked, [38], 364, BLOCK) is asked  # the engine refuses it, saying why
    small = SamplingParams(max_tokens=16, max_tokens_asked=False)
    assert fit_default_output(small, [38], 364, BLOCK) is small
    # a prompt that alone fills the pool is left for check_request to refuse
    assert fit_default_output(SamplingParams(max_tokens=100, max_tokens_asked=False), [364 * BLOCK], 364, BLOCK).max_tokens == 100
