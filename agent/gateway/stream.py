"""One request's engine event stream: timed, disconnect-aware, and closed exactly once.

Closing the engine's iterator early is how the engine learns to abort a request and free its
KV blocks, so every path out of a request (finish, error, client gone, server shutdown) goes
through `EngineStream.close`. The engine's generator always runs in the request's own task:
an engine may hold cancel scopes or timeouts across its `yield`s, which breaks if the steps
ran in different tasks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import anyio
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from agent.engine_api import EngineError, TokenEvent
from agent.metrics import RequestTimer

logger = logging.getLogger(__name__)

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


class EngineStream:
    """Wraps `Engine.generate`'s iterator; feeds the request's timer as events arrive.

    A request of several choices (n > 1, a batch of prompts) ends when each has finished, or
    at the first error: the rest of it is then aborted.
    """

    def __init__(self, events: AsyncIterator[TokenEvent], timer: RequestTimer, prompt_tokens: int,
                 choices: int = 1):
        self._events = events
        self._timer = timer
        self.prompt_tokens = prompt_tokens  # replaced by the engine's count once it reports one
        self.choices = choices
        self.completion_tokens = 0
        self.finish_reason: str | None = None  # of the whole request: "error", or the last choice's
        self.finished: dict[int, str] = {}  # choice -> its finish_reason
        self._completion_by_choice: dict[int, int] = {}
        self._events_seen = 0
        self._closed = False

    async def next(self) -> TokenEvent:
        """Returns the next event; once every choice has had one with `finish_reason` (or one
        had "error"), `finish_reason` is set here too.

        Raises EngineError only for the first event (the engine refused the request, which
        deserves its own status); later failures come back as a `finish_reason="error"` event.
        """
        if self.finish_reason is not None:
            raise RuntimeError("the stream already finished")
        try:
            event = await self._events.__anext__()
        except StopAsyncIteration:
            event = TokenEvent(finish_reason="error", error="the engine ended the request early")
        except EngineError as exc:
            if self._events_seen == 0:
                raise
            event = TokenEvent(finish_reason="error", error=exc.message)
        except Exception as exc:
            logger.exception("engine failed while generating")
            event = TokenEvent(finish_reason="error", error=f"{type(exc).__name__}: {exc}")
        self._events_seen += 1
        if event.prompt_tokens and self.choices == 1:
            self.prompt_tokens = event.prompt_tokens
        # Trust the engine's running total where it gives one; count token ids otherwise.
        new_tokens = len(event.token_ids)
        so_far = self._completion_by_choice.get(event.index, 0)
        if event.completion_tokens:
            new_tokens = max(new_tokens, event.completion_tokens - so_far)
        self._completion_by_choice[event.index] = so_far + new_tokens
        self.completion_tokens += new_tokens
        self._timer.tokens(new_tokens)
        if event.finish_reason is not None:
            self.finished[event.index] = event.finish_reason
            if event.finish_reason == "error" or len(self.finished) >= self.choices:
                self.finish_reason = event.finish_reason
                await self.close()
        return event

    async def close(self, refused: bool = False) -> None:
        """Closes the engine iterator (which aborts an unfinished request) and records it.

        `refused`: the engine turned the request down, so it counts in no latency metric.
        """
        if self._closed:
            return
        self._closed = True
        # Shielded: after a disconnect this runs inside a cancelled scope, where any await
        # would be cancelled again and the engine's own cleanup would never finish.
        with anyio.CancelScope(shield=True):
            try:
                # Async generators have aclose(); a hand-written iterator may not.
                aclose = getattr(self._events, "aclose", None)
                if aclose is not None:
                    await aclose()
            except Exception:
                logger.exception("closing the engine stream failed")
        if refused:
            self._timer.discard()
        else:
            self._timer.finish(self.finish_reason or "abort")


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Returns `work`'s result, or raises ClientGone as soon as the client disconnects.

    `work` runs in this task (see the module docstring); a watcher task waits for the ASGI
    `http.disconnect` message and cancels it.
    """
    outcome: list[T] = []
    failure: Exception | None = None

    async def watch(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(watch, group.cancel_scope)
        try:
            outcome.append(await work)
        except Exception as exc:  # re-raised below, unwrapped from anyio's ExceptionGroup
            failure = exc
        group.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if not outcome:
        raise ClientGone()
    return outcome[0]


def sse(payload: dict[str, Any]) -> bytes:
    """Returns one server-sent event carrying `payload` as JSON."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


class EventStreamResponse(StreamingResponse):
    """An SSE response that always closes its body and the engine stream behind it.

    Starlette leaves the body iterator suspended when the send fails (client gone under ASGI
    spec 2.4) and never starts it when the headers cannot be sent; either way the engine
    would keep generating for nobody until garbage collection.
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        on_close: Callable[[], Awaitable[None]],
        headers: dict[str, str],
    ):
        super().__init__(body, media_type="text/event-stream", headers=headers)
        self._body = body
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self._body.aclose()  # type: ignore[attr-defined]
                await self._on_close()
