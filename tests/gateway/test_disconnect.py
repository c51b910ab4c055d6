"""A client that leaves mid-request makes the gateway close the engine stream (abort + free KV).

These drive the ASGI app directly, so the moment of disconnect is exact: under ASGI spec 2.3
Starlette notices the disconnect itself; under 2.4 only the gateway's own checks do.
"""

from __future__ import annotations

import json
from typing import Any

import anyio
import pytest

from agent.gateway import create_app
from tests.gateway.fake_engine import FakeEngine

pytestmark = pytest.mark.anyio


def http_scope(path: str, spec_version: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": spec_version},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }


def slow_engine() -> FakeEngine:
    return FakeEngine(script=tuple(f" t{i}" for i in range(40)), delay_s=0.02)


async def call_until_disconnect(
    engine: FakeEngine,
    path: str,
    body: dict[str, Any],
    spec_version: str,
    leave_after_s: float | None,
    send_fails: bool = False,
) -> list[dict[str, Any]]:
    """Sends one request; the client leaves after the first body chunk, or after a delay.

    `send_fails`: the disconnect shows only as writes raising OSError (a server that does not
    report http.disconnect); otherwise it is reported to `receive` while writes still succeed.
    """
    app = create_app(engine)
    first_chunk = anyio.Event()
    sent: list[dict[str, Any]] = []
    messages = [{"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        if send_fails:  # the failed write is the only sign of the disconnect
            await anyio.sleep_forever()
        if leave_after_s is None:
            if not first_chunk.is_set():  # like uvicorn: no await once disconnected
                await first_chunk.wait()
        else:
            await anyio.sleep(leave_after_s)
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)
        if message["type"] == "http.response.body" and message.get("body"):
            first_chunk.set()
        if send_fails and first_chunk.is_set() and len(sent) > 4:
            raise OSError("connection reset by peer")

    with anyio.fail_after(5):
        await app(http_scope(path, spec_version), receive, send)
    return sent


@pytest.mark.parametrize(
    ("spec_version", "send_fails"), [("2.3", False), ("2.4", False), ("2.4", True)]
)
@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "Hi", "max_tokens": 40, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
    ],
)
async def test_stream_disconnect_aborts_the_engine_request(
    path: str, body: dict[str, Any], spec_version: str, send_fails: bool
) -> None:
    engine = slow_engine()
    await call_until_disconnect(engine, path, body, spec_version, None, send_fails)
    assert len(engine.calls) == 1
    assert engine.aborted == [engine.calls[0][0]]
    assert engine.events_sent < 20  # stopped soon after the client left, not at the end


async def test_whole_request_disconnect_aborts_the_engine_request() -> None:
    engine = slow_engine()
    sent = await call_until_disconnect(
        engine, "/v1/completions", {"prompt": "Hi", "max_tokens": 40}, "2.3", leave_after_s=0.1
    )
    assert engine.aborted == [engine.calls[0][0]]
    assert engine.events_sent < 20
    assert sent[0]["status"] == 499


async def test_disconnect_counts_as_abort_in_metrics() -> None:
    engine = slow_engine()
    app = create_app(engine)
    first = anyio.Event()
    messages = [
        {"type": "http.request", "body": b'{"prompt": "Hi", "stream": true, "max_tokens": 40}'}
    ]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await first.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body" and message.get("body"):
            first.set()

    with anyio.fail_after(5):
        await app(http_scope("/v1/completions", "2.3"), receive, send)
    registry = app.state.metrics.registry
    assert registry.get_sample_value("pipeshift_requests_total", {"finish_reason": "abort"}) == 1
    assert registry.get_sample_value("pipeshift_gateway_inflight_requests") == 0
