"""Turns engine output into OpenAI bodies: whole answers and SSE chunks, per endpoint."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from agent.gateway.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
    Usage,
)
from agent.gateway.stream import sse


@dataclass(frozen=True)
class CompletionFormat:
    """/v1/completions: the same `text_completion` object whole and streamed."""

    request_id: str
    model: str
    created: int
    include_usage: bool = False

    def opening(self) -> list[bytes]:
        return []

    def _chunk(self, text: str, finish_reason: str | None) -> bytes:
        choice = CompletionChoice(text=text, finish_reason=finish_reason)
        return sse(self._body([choice], None).model_dump(mode="json"))

    def _body(self, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def text(self, text: str) -> bytes:
        return self._chunk(text, None)

    def finish(self, finish_reason: str) -> bytes:
        return self._chunk("", finish_reason)

    def usage(self, usage: Usage) -> bytes:
        return sse(self._body([], usage).model_dump(mode="json"))

    def whole(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        return self._body([CompletionChoice(text=text, finish_reason=finish_reason)], usage)


@dataclass(frozen=True)
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

    def text(self, text: str) -> bytes:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(content=text))])

    def finish(self, finish_reason: str) -> bytes:
        return self._chunk([ChatChunkChoice(delta=ChatDelta(), finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> bytes:
        return self._chunk([], usage)

    def whole(self, text: str, finish_reason: str, usage: Usage) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=finish_reason)
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage,
        )


ResponseFormat = CompletionFormat | ChatFormat
