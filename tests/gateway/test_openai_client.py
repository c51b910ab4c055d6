"""A real uvicorn server on a loopback port, driven by the official `openai` client."""

from __future__ import annotations

import json
from collections.abc import Iterator

import anyio
import httpx
import openai
import pytest

from agent.gateway import create_app
from agent.gateway.server import ServerThread
from tests.gateway.fake_engine import FakeEngine


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[FakeEngine, ServerThread]]:
    engine = FakeEngine(max_context=256)
    with ServerThread(create_app(engine, aliases=["fake-alias"])) as server:
        yield engine, server


@pytest.fixture
def client(served: tuple[FakeEngine, ServerThread]) -> openai.OpenAI:
    # No retries: a retried 5xx would hide a failure and slow the test down.
    return openai.OpenAI(
        base_url=f"{served[1].base_url}/v1", api_key="unused", max_retries=0, timeout=10
    )


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == ["fake-model", "fake-alias"]


def test_completion_whole_and_streamed(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="fake-model", prompt="Hi", max_tokens=8, seed=1)
    assert whole.choices[0].text == "Hello, world!"
    assert whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens == 4

    chunks = list(
        client.completions.create(model="fake-model", prompt="Hi", max_tokens=3, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == "Hello, world"
    assert chunks[-1].choices[0].finish_reason == "length"


def test_chat_whole_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "system", "content": "Be nice."}, {"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(model="fake-alias", messages=messages, temperature=0)
    assert whole.model == "fake-alias"
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].message.content == "Hello, world!"
    assert whole.usage is not None and whole.usage.total_tokens == whole.usage.prompt_tokens + 4

    stream = client.chat.completions.create(
        model="fake-model",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, world!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_errors_reach_the_client_as_exceptions(
    client: openai.OpenAI, served: tuple[FakeEngine, ServerThread]
) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model="fake-model", prompt="x" * 250, max_tokens=20)
    assert "prompt has 250 tokens and max_tokens is 20" in bad.value.message
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "Hi"}])
    assert missing.value.code == "model_not_found"

    engine = served[0]
    engine.error_at = 1
    try:
        with pytest.raises(openai.APIError, match="stage 1 worker died"):
            list(client.completions.create(model="fake-model", prompt="Hi", stream=True))
    finally:
        engine.error_at = None


def test_client_leaving_mid_stream_aborts_the_engine_request(
    served: tuple[FakeEngine, ServerThread],
) -> None:
    engine, server = served
    engine.delay_s, engine.script = 0.02, tuple(f" t{i}" for i in range(100))
    engine.abort_seen.clear()
    events_before = engine.events_sent
    try:
        body = {"model": "fake-model", "prompt": "Hi", "max_tokens": 100, "stream": True}
        with httpx.Client(timeout=10) as http:
            with http.stream("POST", f"{server.base_url}/v1/completions", json=body) as r:
                first = next(r.iter_lines())
                assert json.loads(first.removeprefix("data: "))["choices"][0]["text"] == " t0"
            # leaving the block closes the connection mid-stream
        assert engine.abort_seen.wait(5), "the engine was never told to abort"
        assert engine.calls[-1][0] in engine.aborted
        assert engine.events_sent - events_before < 100  # stopped early
    finally:
        engine.delay_s, engine.script = FakeEngine.delay_s, FakeEngine.script


def test_server_thread_health_and_metrics(served: tuple[FakeEngine, ServerThread]) -> None:
    base = served[1].base_url
    assert httpx.get(f"{base}/health").json() == {"status": "ok"}
    text = httpx.get(f"{base}/metrics").text
    assert "pipeshift_time_to_first_token_seconds_bucket" in text


@pytest.mark.anyio
async def test_concurrent_streams_with_the_async_client() -> None:
    engine = FakeEngine(delay_s=0.01, script=tuple(f" w{i}" for i in range(10)))
    async with ServerThread(create_app(engine)) as server:
        client = openai.AsyncOpenAI(
            base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0
        )

        async def one(i: int) -> str:
            stream = await client.chat.completions.create(
                model="fake-model", messages=[{"role": "user", "content": f"q{i}"}], stream=True
            )
            return "".join([c.choices[0].delta.content or "" async for c in stream])

        async with anyio.create_task_group() as group:
            answers: dict[int, str] = {}

            async def run(i: int) -> None:
                answers[i] = await one(i)

            for i in range(8):
                group.start_soon(run, i)
        await client.close()
    assert answers == {i: "".join(engine.script) for i in range(8)}
    assert len(engine.calls) == 8 and engine.aborted == []


def test_chat_logprobs_whole_and_streamed(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Hi"}]
    whole = client.chat.completions.create(
        model="fake-model", messages=messages, logprobs=True, top_logprobs=2
    )
    content = whole.choices[0].logprobs.content
    assert [c.token for c in content] == ["Hello", ",", " world", "!"]
    assert [c.logprob for c in content] == [-0.25, -0.5, -0.75, -1.0]
    assert content[2].bytes == list(b" world")
    assert [(t.token, t.logprob) for t in content[0].top_logprobs] == [("Hello", -0.25), ("alt0", -1.0)]

    chunks = list(client.chat.completions.create(
        model="fake-model", messages=messages, logprobs=True, stream=True
    ))
    streamed = [c for ch in chunks if ch.choices and ch.choices[0].logprobs for c in ch.choices[0].logprobs.content]
    assert [(c.token, c.logprob, c.top_logprobs) for c in streamed] == [
        (c.token, c.logprob, []) for c in content
    ]
    plain = client.chat.completions.create(model="fake-model", messages=messages)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_whole_and_streamed(client: openai.OpenAI) -> None:
    whole = client.completions.create(model="fake-model", prompt="Hi", max_tokens=8, logprobs=1)
    logprobs = whole.choices[0].logprobs
    assert logprobs.tokens == ["Hello", ",", " world", "!"]
    assert logprobs.token_logprobs == [-0.25, -0.5, -0.75, -1.0]
    assert logprobs.text_offset == [0, 5, 6, 12]
    assert logprobs.top_logprobs[1] == {",": -0.5}

    chunks = list(client.completions.create(
        model="fake-model", prompt="Hi", max_tokens=8, logprobs=0, stream=True
    ))
    with_logprobs = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [lp.tokens[0] for lp in with_logprobs] == logprobs.tokens
    assert [lp.text_offset[0] for lp in with_logprobs] == logprobs.text_offset


def test_penalties_and_logit_bias_reach_the_engine(
    client: openai.OpenAI, served: tuple[FakeEngine, ServerThread]
) -> None:
    client.completions.create(
        model="fake-model", prompt="Hi", max_tokens=2, presence_penalty=0.5, frequency_penalty=-1.0,
        logit_bias={"7": 3.5, "12": -100}, extra_body={"repetition_penalty": 1.2},
    )
    params = served[0].calls[-1][2]
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, -1.0, 1.2)
    assert params.logit_bias == ((7, 3.5), (12, -100.0))
    assert params.logprobs is None
