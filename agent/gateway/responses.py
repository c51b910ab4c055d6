"""Turns engine output into OpenAI bodies: whole answers and SSE chunks, per endpoint.

Logprobs, when asked for, come in each endpoint's own shape: chat's `{"content": [{token,
logprob, bytes, top_logprobs}]}`, the legacy completions' parallel lists `{tokens,
token_logprobs, top_logprobs, text_offset}`; streamed, each chunk carries those of its tokens.
With several choices (n > 1, or a batch of prompts) every chunk names its choice's `index`.
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
    (as vLLM does), and offsets count the tokens' texts from `text_offset`. An echoed prompt's
    first token has no logprob: null in both lists, as vLLM answers."""
    offsets = []
    for e in entries:
        offsets.append(text_offset)
        text_offset += len(e.token)
    return CompletionLogprobs(
        tokens=[e.token for e in entries],
        token_logprobs=[e.logprob for e in entries],
        top_logprobs=[
            None if e.logprob is None else {t: lp for _, t, lp in e.top} | {e.token: e.logprob}
            for e in entries
        ],
        text_offset=offsets,
    )


@dataclass
class ChoiceResult:
    """One choice of a whole (not streamed) answer, as the engine produced it."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str = "stop"


@dataclass
class CompletionFormat:
    """/v1/completions: the same `text_completion` object whole and streamed.

    `echo`: each prompt's text, put before its choices' text (and, with logprobs, the prompt's
    logprobs before theirs); `echo_only` (echo with max_tokens 0): the prompt alone, the token
    generated to compute it left out. Choice i answers prompt i // n.
    """

    request_id: str
    model: str
    created: int
    include_usage: bool = False
    n: int = 1
    echo: list[str] | None = None
    echo_only: bool = False
    logprobs: bool = False  # whether the request asked for logprobs
    text_offset: dict[int, int] = field(default_factory=dict, init=False)  # of each choice's next token
    echoed: set[int] = field(default_factory=set, init=False)

    def opening(self) -> list[bytes]:
        return []

    def _parts(self, index: int, text: str, logprobs: list[TokenLogprob] | None,
               prompt_logprobs: list[TokenLogprob] | None, first: bool) -> tuple[str, list[TokenLogprob] | None]:
        """Returns a choice's text and logprob entries with the echo put in front (on `first`)."""
        entries = list(logprobs or []) if self.logprobs else None
        if self.echo_only:
            text, entries = "", [] if entries is not None else None
        if self.echo is not None and first:
            text = self.echo[index // self.n] + text
            if entries is not None:
                entries = list(prompt_logprobs or []) + entries
        return text, entries

    def _logprobs(self, index: int, entries: list[TokenLogprob] | None) -> CompletionLogprobs | None:
        if entries is None:
            return None
        offset = self.text_offset.get(index, 0)
        rendered = completion_logprobs(entries, offset)
        self.text_offset[index] = offset + sum(len(e.token) for e in entries)
        return rendered

    def _body(self, choices: list[CompletionChoice], usage: Usage | None) -> CompletionResponse:
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )

    def text(self, index: int, text: str, logprobs: list[TokenLogprob] | None = None,
             prompt_logprobs: list[TokenLogprob] | None = None) -> bytes | None:
        """Returns the chunk of one event of choice `index`, or None when it carries nothing."""
        first = index not in self.echoed
        self.echoed.add(index)
        text, entries = self._parts(index, text, logprobs, prompt_logprobs, first)
        if not text and not entries:
            return None
        choice = CompletionChoice(index=index, text=text, finish_reason=None,
                                  logprobs=self._logprobs(index, entries))
        return sse(self._body([choice], None).model_dump(mode="json"))

    def finish(self, index: int, finish_reason: str) -> bytes:
        choice = CompletionChoice(index=index, text="", finish_reason=finish_reason)
        return sse(self._body([choice], None).model_dump(mode="json"))

    def _counted(self, usage: Usage) -> Usage:
        """Returns `usage` as the client sees it: echo alone generated nothing it answers."""
        return Usage.of(usage.prompt_tokens, 0) if self.echo_only else usage

    def usage(self, usage: Usage) -> bytes:
        return sse(self._body([], self._counted(usage)).model_dump(mode="json"))

    def whole(self, results: list[ChoiceResult], usage: Usage) -> BaseModel:
        usage = self._counted(usage)
        choices = []
        for r in results:
            text, entries = self._parts(r.index, r.text, r.logprobs, r.prompt_logprobs, first=True)
            choices.append(CompletionChoice(index=r.index, text=text, finish_reason=r.finish_reason,
                                            logprobs=self._logprobs(r.index, entries)))
        return self._body(choices, usage)


@dataclass
class ChatFormat:
    """/v1/chat/completions: `chat.completion` whole, `chat.completion.chunk` streamed."""

    request_id: str
    model: str
    created: int
    include_usage: bool = False
    n: int = 1
    logprobs: bool = False  # whether the request asked for logprobs

    def _chunk(self, choices: list[ChatChunkChoice], usage: Usage | None = None) -> bytes:
        chunk = ChatCompletionChunk(
            id=self.request_id, created=self.created, model=self.model, choices=choices, usage=usage
        )
        return sse(chunk.model_dump(mode="json"))

    def opening(self) -> list[bytes]:
        # OpenAI's first chunk of each choice names the role and carries no text yet.
        return [self._chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
                for i in range(self.n)]

    def text(self, index: int, text: str, logprobs: list[TokenLogprob] | None = None,
             prompt_logprobs: list[TokenLogprob] | None = None) -> bytes | None:
        if not text and not logprobs:
            return None
        rendered = chat_logprobs(logprobs) if logprobs is not None and self.logprobs else None
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(content=text), logprobs=rendered)])

    def finish(self, index: int, finish_reason: str) -> bytes:
        return self._chunk([ChatChunkChoice(index=index, delta=ChatDelta(), finish_reason=finish_reason)])

    def usage(self, usage: Usage) -> bytes:
        return self._chunk([], usage)

    def whole(self, results: list[ChoiceResult], usage: Usage) -> BaseModel:
        choices = [
            ChatChoice(
                index=r.index, message=AssistantMessage(content=r.text), finish_reason=r.finish_reason,
                logprobs=chat_logprobs(r.logprobs) if self.logprobs else None,
            )
            for r in results
        ]
        return ChatCompletionResponse(
            id=self.request_id,
            created=self.created,
            model=self.model,
            choices=choices,
            usage=usage,
        )


ResponseFormat = CompletionFormat | ChatFormat
