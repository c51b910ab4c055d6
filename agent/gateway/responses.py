"""Turns engine output into OpenAI bodies: whole answers and SSE chunks, per endpoint.

Logprobs, when asked for, come in each endpoint's own shape: chat's `{"content": [{token,
logprob, bytes, top_logprobs}]}`, the legacy completions' parallel lists `{tokens,
token_logprobs, top_logprobs, text_offset}`; streamed, each chunk carries those of its tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel

from agent.engine_api import TokenLogprob
from agent.gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    TopLogprob,
    Usage,
)
from agent.gateway.stream import sse


def chat_logprobs(entries: list[TokenLogprob]) -> ChatLogprobs:
    def top(token: str, logprob: float) -> TopLogprob:
        return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

    return ChatLogprobs(content=[
        ChatTokenLogprob(
            token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
            top_logprobs=[top(t, lp) for _, t, lp in e.top],
        )
        for e in entries
    ])


def completion_logprobs(entries: list[TokenLogprob], text_offset: int) -> CompletionLogprobs:
    """Returns the legacy shape; each token's top dict lists the top ones and the token itself
    (as vLLM does), and offsets count the tokens' texts from `text_offset`."""
    offsets = []
    for e in entries:
        offsets.append(text_offset)
        text_offset += len(e.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[{t: lp for _, t, lp in e.top} | {e.token: e.logprob} for e in entries],
        text_offset=offsets,
    )


@dataclass
class CompletionFormat:
    """/v1/completions: the same `text_completion` object whole and streamed."""

    request_id: str
    model: str
    created: int
    include_usage: bool = False
    text_offset: int = field(default=0, init=False)  # of the next streamed token

    def opening(self) -> list[bytes]:
        return []

    def _chunk(self, text: str, finish_reason: str | None, logprobs: list[TokenLogprob] | None = None) -> bytes:
        choice = CompletionChoice(text=text, finish_reason=finish_reason, logprobs=self._logprobs(logprobs))
        return sse(self._body([choice], None).model_dump(mode="json"))

    def _logprobs(self, entries: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        if entries is None:
            return None
        rendered = completion_logprobs(entries, self.text_offset)
        self.text_offset += sum(len(e.token) for e in entries)
        return rendered

    def _body(self, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def text(self, text: str, logprobs: list[TokenLogprob] | None = None) -> bytes:
        return self._chunk(text, None, logprobs)

    def finish(self, finish_reason: str) -> bytes:
        return self._chunk("", finish_reason)

    def usage(self, usage: Usage) -> bytes:
        return sse(self._body([], usage).model_dump(mode="json"))

    def whole(self, text: str, finish_reason: str, usage: Usage,
              logprobs: list[TokenLogprob] | None = None) -> BaseModel:
        choice = CompletionChoice(text=text, finish_reason=finish_reason, logprobs=self._logprobs(logprobs))
        return self._body([choice], usage)


@dataclass
class ChatFormat:
    """/v1/chat/completions: `chat.completion` whole, `chat.completion.chunk` streamed."""

    request_id: str
    model: str
    created: int
    include_usage: bool = False

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return sse(chunk.model_dump(mode="json"))

    def opening(self) -> list[bytes]:
        # OpenAI's first chunk names the role and carries no text yet.
        return [self._chunk([ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))])]

    def text(self, text: str, logprobs: list[TokenLogprob] | None = None) -> bytes:
        rendered = chat_logprobs(logprobs) if logprobs is not None else None
        return self._chunk([ChatChunkChoice(delta=ChatDelta(content=text), logprobs=rendered)])

    def finish(self, finish_reason: str) -> bytes:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> bytes:
        return self._chunk([], usage)

    def whole(self, text: str, finish_reason: str, usage: Usage,
              logprobs: list[TokenLogprob] | None = None) -> BaseModel:
        choice = ChatChoice(
            message=AssistantMessage(content=text), finish_reason=finish_reason,
            logprobs=chat_logprobs(logprobs) if logprobs is not None else None,
        )
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage,
        )


ResponseFormat = CompletionFormat | ChatFormat
