"""Several choices per request (n > 1, a batch of prompts) and echo, whole and streamed, in
OpenAI's and vLLM's shapes: one choice per prompt times n, `index` in order; echo puts the
prompt (and its logprobs, the first null) before the answer."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.gateway.fake_engine import SCRIPT, FakeEngine
from tests.gateway.sse_parsing import sse_payloads

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
ANSWER = "".join(SCRIPT)


def test_a_batch_with_n_answers_prompt_by_prompt_then_member_by_member(client: TestClient, engine: FakeEngine):
    body = client.post(COMPLETIONS, json={"prompt": ["ab", "cde"], "n": 2}).json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert {c["text"] for c in body["choices"]} == {ANSWER}
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 4 * len(SCRIPT), "total_tokens": 21}
    (_, prompts, params), = engine.calls
    assert prompts == [[97, 98], [99, 100, 101]] and params.n == 2


def test_token_id_batches_reach_the_engine_as_given(client: TestClient, engine: FakeEngine):
    assert client.post(COMPLETIONS, json={"prompt": [[5, 6], [7]], "max_tokens": 2}).status_code == 200
    assert engine.calls[0][1] == [[5, 6], [7]]


def test_streamed_choices_carry_their_index_and_finish_each(client: TestClient):
    answer = client.post(CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "n": 3, "stream": True,
                                     "stream_options": {"include_usage": True}})
    chunks, done = sse_payloads(answer.text)
    assert done
    texts, finished = ["", "", ""], {}
    for chunk in chunks:
        for c in chunk["choices"]:
            texts[c["index"]] += c["delta"].get("content", "")
            if c["finish_reason"]:
                finished[c["index"]] = c["finish_reason"]
    assert texts == [ANSWER] * 3 and finished == {0: "stop", 1: "stop", 2: "stop"}
    assert chunks[-1]["usage"]["completion_tokens"] == 3 * len(SCRIPT)


def test_echo_puts_the_prompt_and_its_logprobs_first(client: TestClient):
    body = client.post(COMPLETIONS, json={"prompt": [[72, 105]], "echo": True, "logprobs": 1, "max_tokens": 1}).json()
    (choice,) = body["choices"]
    assert choice["text"] == "Hi" + SCRIPT[0]
    lp = choice["logprobs"]
    assert lp["tokens"] == ["H", "i", SCRIPT[0]]
    assert lp["token_logprobs"] == [None, -0.5, -0.25]
    assert lp["top_logprobs"][0] is None and lp["top_logprobs"][1] == {"i": -0.5}
    assert lp["text_offset"] == [0, 1, 2]


def test_echo_with_max_tokens_0_answers_the_prompt_alone(client: TestClient, engine: FakeEngine):
    body = client.post(COMPLETIONS, json={"prompt": "Hey", "echo": True, "logprobs": 0, "max_tokens": 0}).json()
    (choice,) = body["choices"]
    assert choice["text"] == "Hey"
    assert choice["logprobs"]["token_logprobs"] == [None, -0.5, -0.5]
    assert engine.calls[0][2].max_tokens == 1 and engine.calls[0][2].prompt_logprobs == 0
    streamed, _ = sse_payloads(client.post(COMPLETIONS, json={"prompt": "Hey", "echo": True, "max_tokens": 0,
                                                             "stream": True}).text)
    assert "".join(c["text"] for chunk in streamed for c in chunk["choices"]) == "Hey"


def test_echo_with_max_tokens_0_counts_no_completion_tokens(client: TestClient):
    # The token sampled to compute the prompt's last position is not answered, so not counted.
    body = client.post(COMPLETIONS, json={"prompt": "Hey", "echo": True, "max_tokens": 0}).json()
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    streamed, _ = sse_payloads(client.post(COMPLETIONS, json={
        "prompt": "Hey", "echo": True, "max_tokens": 0, "stream": True, "stream_options": {"include_usage": True},
    }).text)
    assert streamed[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3}
    body = client.post(COMPLETIONS, json={"prompt": "Hey", "echo": True, "max_tokens": 1}).json()
    assert body["usage"]["completion_tokens"] == 1


def test_an_error_in_one_choice_ends_the_request(engine: FakeEngine, client: TestClient):
    engine.error_at = 1
    chunks, done = sse_payloads(client.post(COMPLETIONS, json={"prompt": "Hi", "n": 2, "stream": True}).text)
    assert done and "error" in chunks[-1]
    assert client.post(COMPLETIONS, json={"prompt": "Hi", "n": 2}).status_code == 503
