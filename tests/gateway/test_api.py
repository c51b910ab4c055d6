"""The OpenAI-shaped endpoints against a scripted engine, in process."""

from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient

from agent.engine_api import EngineError
from agent.gateway import create_app
from tests.gateway.fake_engine import FakeEngine
from tests.gateway.sse_parsing import sse_payloads


def test_models_lists_the_served_model_and_its_aliases(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-model", "fake-alias"]
    assert all(m["object"] == "model" and m["max_model_len"] == 64 for m in body["data"])
    assert client.get("/v1/models/fake-alias").json()["id"] == "fake-alias"
    assert client.get("/v1/models/nope").json()["error"]["code"] == "model_not_found"
    # aliases repeating the name (the CLI passes the requested name as one) are listed once
    again = TestClient(create_app(FakeEngine(), aliases=["fake-model", "a", "a"]))
    assert [m["id"] for m in again.get("/v1/models").json()["data"]] == ["fake-model", "a"]
    # where the KV cache holds less than the context, that is the longest request
    small = TestClient(create_app(FakeEngine(kv_tokens=48)))
    assert small.get("/v1/models").json()["data"][0]["max_model_len"] == 48


def test_served_model_names_replace_the_models_own_names() -> None:
    """vLLM's --served-model-name: only these names are served, the first in every answer."""
    client = TestClient(create_app(FakeEngine(), aliases=["fake-alias"], served_names=["chat", "c2"]))
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["chat", "c2"]
    for name, answered in ((None, "chat"), ("chat", "chat"), ("c2", "c2")):
        body = {"prompt": "Hi", "max_tokens": 2} | ({"model": name} if name else {})
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == answered
    for gone in ("fake-model", "fake-alias"):
        r = client.post("/v1/completions", json={"model": gone, "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 404 and "'chat', 'c2'" in r.json()["error"]["message"]


def test_completion_whole(client: TestClient, engine: FakeEngine) -> None:
    r = client.post(
        "/v1/completions", json={"model": "fake-model", "prompt": "Hi there", "max_tokens": 10}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("cmpl-") and r.headers["x-request-id"] == body["id"]
    assert body["object"] == "text_completion" and body["model"] == "fake-model"
    assert isinstance(body["created"], int)
    assert body["choices"] == [
        {"index": 0, "text": "Hello, world!", "logprobs": None, "finish_reason": "stop"}
    ]
    assert body["usage"] == {"prompt_tokens": 8, "completion_tokens": 4, "total_tokens": 12}
    assert engine.aborted == []


def test_completion_stops_at_max_tokens_with_length(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
    assert r.json()["choices"][0]["text"] == "Hello,"
    assert r.json()["choices"][0]["finish_reason"] == "length"


def test_sampling_parameters_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    r = client.post(
        "/v1/completions",
        json={
            "model": "fake-alias",
            "prompt": "abc",
            "max_tokens": 7,
            "temperature": 0,
            "top_p": 0.5,
            "seed": 42,
            "stop": ["\n", "END"],
        },
    )
    assert r.status_code == 200 and r.json()["model"] == "fake-alias"
    request_id, prompt_ids, params = engine.calls[-1]
    assert request_id == r.json()["id"]
    assert prompt_ids == [97, 98, 99]
    assert (params.max_tokens, params.temperature, params.top_p, params.seed) == (7, 0.0, 0.5, 42)
    assert params.stop == ("\n", "END") and params.ignore_eos is False
    client.post("/v1/completions", json={"prompt": "abc", "ignore_eos": True})
    assert engine.calls[-1][2].ignore_eos is True
    client.post("/v1/completions", json={"prompt": "abc", "stop": "END"})
    assert engine.calls[-1][2].stop == ("END",)
    assert engine.calls[-1][2].max_tokens == 16  # OpenAI's default for completions


def test_vllm_top_k_and_min_p_reach_the_sampler(client: TestClient, engine: FakeEngine) -> None:
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    for path, body in (("/v1/completions", {"prompt": "abc"}), ("/v1/chat/completions", chat)):
        assert client.post(path, json={**body, "top_k": 40, "min_p": 0.05}).status_code == 200
        params = engine.calls[-1][2]
        assert (params.top_k, params.min_p) == (40, 0.05)
        assert params.wire()["top_k"] == 40 and params.wire()["min_p"] == 0.05
        assert client.post(path, json={**body, "top_k": -1}).status_code == 200  # vLLM's "all"
        params = engine.calls[-1][2]
        assert (params.top_k, params.min_p) == (0, 0.0)
        assert "top_k" not in params.wire() and "min_p" not in params.wire()


@pytest.mark.parametrize(
    ("prompt", "ids"),
    [(["ab"], [97, 98]), ([5, 6, 7], [5, 6, 7]), ([[5, 6]], [5, 6])],
)
def test_prompt_as_list_or_token_ids(client: TestClient, engine: FakeEngine, prompt, ids) -> None:
    assert client.post("/v1/completions", json={"prompt": prompt}).status_code == 200
    assert engine.calls[-1][1] == ids


def test_completion_stream(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/completions", json={"prompt": "Hi", "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    chunks, done = sse_payloads(r.text)
    assert done
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello, world!"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * 4 + ["stop"]
    assert all("usage" not in c or c["usage"] is None for c in chunks)
    assert engine.aborted == []


def test_chat_stream_with_usage(client: TestClient, engine: FakeEngine) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "fake-model",
            "messages": [{"role": "user", "content": "Hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks, done = sse_payloads(r.text)
    assert done
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    first, *middle, last_choice, usage_chunk = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"]["content"] for c in middle) == "Hello, world!"
    assert last_choice["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_chat_whole_and_default_max_tokens(client: TestClient, engine: FakeEngine) -> None:
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "fake-model",
            "messages": [
                {"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
            ],
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello, world!"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 4
    assert engine.chats[-1] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    prompt_tokens = len(engine.calls[-1][1])
    assert engine.calls[-1][2].max_tokens == 64 - prompt_tokens  # all the room left


def test_max_completion_tokens_wins_over_max_tokens(client: TestClient, engine: FakeEngine) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    r = client.post(
        "/v1/chat/completions",
        json={"messages": messages, "max_tokens": 30, "max_completion_tokens": 1},
    )
    assert r.json()["choices"][0]["finish_reason"] == "length"
    assert engine.calls[-1][2].max_tokens == 1


def test_engine_refusal_keeps_its_status(engine: FakeEngine, client: TestClient) -> None:
    engine.refuse = EngineError("the KV cache can never hold this request", 429, "max_tokens")
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "Hi", "stream": stream})
        assert r.status_code == 429
        assert r.json()["error"]["message"] == "the KV cache can never hold this request"
        assert r.json()["error"]["param"] == "max_tokens"


def test_refusal_when_generate_is_called(
    engine: FakeEngine, client: TestClient, monkeypatch
) -> None:
    def refuse_at_once(request_id, prompt_ids, params):  # a plain function, not a generator
        raise EngineError("draining for reconfiguration", 503)

    monkeypatch.setattr(engine, "generate", refuse_at_once)
    r = client.post("/v1/completions", json={"prompt": "Hi", "stream": True})
    assert r.status_code == 503 and "draining" in r.json()["error"]["message"]
    assert r.json()["error"]["type"] == "server_error"


def test_engine_error_while_encoding_keeps_its_status(
    engine: FakeEngine, client: TestClient, monkeypatch
) -> None:
    def refuse(messages):
        raise EngineError("the chat template needs a user message last", 400, "messages")

    monkeypatch.setattr(engine, "encode_chat", refuse)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "user message last" in r.json()["error"]["message"]


def test_null_means_default(client: TestClient, engine: FakeEngine) -> None:
    body = {"prompt": "Hi", "temperature": None, "top_p": None, "stop": None, "n": None}
    assert client.post("/v1/completions", json=body).status_code == 200
    params = engine.calls[-1][2]
    assert (params.temperature, params.top_p, params.stop) == (1.0, 1.0, ())


def test_engine_error_mid_request(engine: FakeEngine, client: TestClient) -> None:
    engine.error_at = 2
    r = client.post("/v1/completions", json={"prompt": "Hi"})
    assert r.status_code == 503
    assert r.json()["error"]["code"] == "engine_error"
    assert "stage 1 worker died" in r.json()["error"]["message"]

    r = client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "x"}], "stream": True},
    )
    assert r.status_code == 200
    chunks, done = sse_payloads(r.text)
    assert done
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-1]) == "Hello,"
    assert chunks[-1]["error"]["code"] == "engine_error"
    assert "stage 1 worker died" in chunks[-1]["error"]["message"]
    assert chunks[-1]["error"]["message"].endswith("Retry the request.")


def test_a_deployment_down_does_not_tell_clients_to_retry_at_once(
    engine: FakeEngine, client: TestClient
) -> None:
    """A stage lost outside an apply is not repaired live: 'Retry the request.' misled."""
    from agent.engine_api import pipeline_down

    engine.error_at, engine.error = 2, pipeline_down("worker-1 died (exit -9)")
    r = client.post("/v1/completions", json={"prompt": "Hi"})
    message = r.json()["error"]["message"]
    assert r.status_code == 503 and "worker-1 died (exit -9)" in message
    assert "Retry the request." not in message
    assert "retry once GET /health answers 200" in message


def test_unexpected_exception_is_a_logged_500(
    engine: FakeEngine, client: TestClient, caplog: pytest.LogCaptureFixture, monkeypatch
) -> None:
    def broken(prompt: str) -> list[int]:
        raise RuntimeError("tokenizer exploded")

    monkeypatch.setattr(engine, "encode_prompt", broken)
    with caplog.at_level(logging.ERROR):
        r = client.post("/v1/completions", json={"prompt": "Hi"})
    assert r.status_code == 500
    assert r.json()["error"]["type"] == "server_error"
    assert "tokenizer exploded" in caplog.text


def test_health(engine: FakeEngine, client: TestClient) -> None:
    assert client.get("/health").status_code == 200
    assert client.get("/health").json() == {"status": "ok"}
    engine.healthy = (False, "stage 2 is reloading layers 10-19")
    r = client.get("/health")
    assert r.status_code == 503
    assert r.json()["reason"] == "stage 2 is reloading layers 10-19"


def test_unknown_route_is_openai_shaped(client: TestClient) -> None:
    r = client.post("/v1/embeddings", json={})
    assert r.status_code == 404
    assert "/v1/embeddings" in r.json()["error"]["message"]


def test_two_apps_in_one_process_keep_separate_metrics() -> None:
    a, b = FakeEngine(), FakeEngine()
    client_a = TestClient(create_app(a))
    client_b = TestClient(create_app(b))
    client_a.post("/v1/completions", json={"prompt": "Hi"})
    assert 'pipeshift_requests_total{finish_reason="stop"} 1.0' in client_a.get("/metrics").text
    assert 'pipeshift_requests_total{finish_reason="stop"}' not in client_b.get("/metrics").text
