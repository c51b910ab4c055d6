"""The OpenAI request and response shapes the gateway accepts and returns.

Only what pipeshift serves is modelled. Fields that OpenAI clients commonly send but we do not
honour are accepted when they hold their neutral value and refused with a 400 otherwise
(`unsupported_fields`), so a client never silently gets something other than what it asked for.
Unknown fields are ignored, as OpenAI-compatible servers usually do.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_STOP_SEQUENCES = 4


class StreamOptions(BaseModel):
    include_usage: bool = Field(default=False, strict=True)


class _GenerationRequest(BaseModel):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")

    # Optional: when omitted the server's model answers (curl users rarely know its name).
    model: str | None = None
    # Numbers and flags are strict: "ten" or "yes" is a client bug to report, not to coerce.
    max_tokens: int | None = Field(default=None, strict=True, ge=1)
    temperature: float = Field(default=1.0, strict=True, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, strict=True, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, strict=True)
    stop: str | list[str] | None = None
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, strict=True)
    presence_penalty: float = Field(default=0.0, strict=True)
    frequency_penalty: float = Field(default=0.0, strict=True)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # Extension (same name as vLLM's): generate exactly max_tokens, for benchmarks.
    ignore_eos: bool = Field(default=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Many clients send `"temperature": null` for "not set"; OpenAI treats it so too.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    # Before-validators phrase one message instead of pydantic's one error per union member.
    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop(cls, stop: Any) -> Any:
        sequences = [stop] if isinstance(stop, str) else stop
        if not isinstance(sequences, list) or not all(isinstance(s, str) for s in sequences):
            raise ValueError(
                f"stop must be a string or a list of up to {MAX_STOP_SEQUENCES} strings"
            )
        if len(sequences) > MAX_STOP_SEQUENCES:
            raise ValueError(
                f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed, got {len(sequences)}"
            )
        if any(s == "" for s in sequences):
            raise ValueError("stop sequences must not be empty strings")
        return stop

    def stop_sequences(self) -> tuple[str, ...]:
        """Returns the stop strings as a tuple, whichever form the client used."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """Returns (param, message) for each field set to something this server cannot do."""
        problems: list[tuple[str, str]] = []
        if self.n != 1:
            problems.append(
                ("n", f"n={self.n} is not supported: this server returns one choice (n=1)")
            )
        if self.presence_penalty or self.frequency_penalty:
            param = "presence_penalty" if self.presence_penalty else "frequency_penalty"
            problems.append((param, f"{param} is not supported: leave it out or set it to 0"))
        if self.logit_bias:
            problems.append(("logit_bias", "logit_bias is not supported: leave it out"))
        if self.stream_options is not None and not self.stream:
            problems.append(
                ("stream_options", "stream_options is only allowed when stream is true")
            )
        return problems


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt` is a string, a list of one string, or token ids."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt:
            if len(prompt) == 1 and isinstance(prompt[0], str):
                return prompt
            ids = prompt[0] if len(prompt) == 1 and isinstance(prompt[0], list) else prompt
            if ids and all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                if min(ids) < 0:
                    raise ValueError(f"prompt token ids must be >= 0, got {min(ids)}")
                return prompt
            if len(prompt) > 1 and all(isinstance(p, str | list) for p in prompt):
                raise ValueError(
                    f"a batch of {len(prompt)} prompts is not supported: send one prompt per request"
                )
        raise ValueError(
            "prompt must be a non-empty string, a list of one string, or a list of token ids"
        )

    def unsupported_fields(self) -> list[tuple[str, str]]:
        problems = super().unsupported_fields()
        if self.echo:
            problems.append(("echo", "echo is not supported: leave it out or set it to false"))
        if self.logprobs is not None:
            problems.append(("logprobs", "logprobs is not supported: leave it out"))
        if self.best_of not in (None, 1):
            problems.append(("best_of", "best_of is not supported: leave it out or set it to 1"))
        if self.suffix:
            problems.append(("suffix", "suffix is not supported: leave it out"))
        return problems


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One chat turn. `developer` is OpenAI's newer name for `system` and is mapped to it."""

    role: Literal["system", "developer", "user", "assistant"]
    # A list of text parts is what newer clients send for plain text; we join them.
    content: str | list[TextPart]
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, content: Any) -> Any:
        if isinstance(content, str):
            return content
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            return content
        raise ValueError(
            'content must be a string or a list of {"type": "text", "text": ...} parts '
            "(images and audio are not supported)"
        )

    def as_engine_message(self) -> dict[str, str]:
        """Returns the {"role", "content"} dict that Engine.encode_chat takes."""
        role = "system" if self.role == "developer" else self.role
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return {"role": role, "content": text}


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage]
    max_completion_tokens: int | None = Field(default=None, strict=True, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None

    @field_validator("messages", mode="before")
    @classmethod
    def _check_messages(cls, messages: Any) -> Any:
        if isinstance(messages, list) and not messages:
            raise ValueError("messages is empty: send at least one message")
        # Say what we do not support instead of pydantic's "Input should be 'system', ...".
        if isinstance(messages, list):
            for i, m in enumerate(messages):
                if isinstance(m, dict) and m.get("role") in ("tool", "function"):
                    raise ValueError(
                        f"messages[{i}] has role {m['role']!r}: tool calling is not supported; "
                        "use system, developer, user or assistant"
                    )
        return messages

    def output_limit(self) -> int | None:
        """Returns the completion token limit; max_completion_tokens wins over max_tokens."""
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    def unsupported_fields(self) -> list[tuple[str, str]]:
        problems = super().unsupported_fields()
        if self.logprobs or self.top_logprobs:
            problems.append(("logprobs", "logprobs is not supported: leave it out"))
        if self.tools or self.functions:
            param = "tools" if self.tools else "functions"
            problems.append((param, "tool calling is not supported: leave tools out"))
        if self.response_format and self.response_format.get("type", "text") != "text":
            problems.append(
                ("response_format", 'only response_format {"type": "text"} is supported')
            )
        return problems


# ---- responses ---------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: str | None


class CompletionResponse(BaseModel):
    """Both the whole answer and each streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    # OpenAI sends only the keys that changed; the final chunk's delta is {}.
    @model_serializer(mode="plain")
    def _drop_unset(self) -> dict[str, str]:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "pipeshift"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
