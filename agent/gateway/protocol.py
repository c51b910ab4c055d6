"""The OpenAI request and response shapes the gateway accepts and returns.

Only what pipeshift serves is modelled. Fields that OpenAI clients commonly send but we do not
honour are accepted when they hold their neutral value and refused with a 400 otherwise
(`unsupported_fields`), so a client never silently gets something other than what it asked for.
Unknown fields are ignored, as OpenAI-compatible servers usually do.

The JSON Schema of each request says exactly what is accepted (the OpenAPI document is generated
from it): an unsupported field's schema lists only its neutral value, every optional field also
accepts null ("not set"), and the limits that depend on the model (context length, vocabulary)
are added per server by `describe_model_limits`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_serializer,
    model_validator,
)

MAX_STOP_SEQUENCES = 4
TEXT_CHOICES = ("none", "auto")  # the tool_choice values a text answer satisfies
TOOL_CHOICE_OF = {"tools": "tool_choice", "functions": "function_call"}
# What a client that asks for a tool call to get JSON (a structured output) can send instead.
STRUCTURED_OUTPUT = (
    'for structured output send response_format {"type": "json_schema", "json_schema": '
    '{"name": ..., "schema": ...}} instead, which is served.'
)
MAX_CHOICES = 16  # n: sequences per prompt, all admitted together
MAX_PROMPTS = 64  # prompts in one /v1/completions request
# The seed range vLLM accepts (int64); torch's generators overflow beyond it.
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1


def _integral(value: Any) -> Any:
    """Returns an integral number (`31.0`) as an int: JSON Schema's "integer" includes it."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# Integers as JSON Schema has them (`31.0` is 31); strings and booleans are refused. Bounds sit
# before the validator, or pydantic would not write them as JSON Schema's minimum/maximum.
Integer = Annotated[int, Field(strict=True), BeforeValidator(_integral)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0), BeforeValidator(_integral)]
PositiveInt = Annotated[int, Field(strict=True, ge=1), BeforeValidator(_integral)]
Seed = Annotated[int, Field(strict=True, ge=SEED_MIN, le=SEED_MAX), BeforeValidator(_integral)]
TokenId = NonNegativeInt
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
TOKEN_KEY = r"^(0|[1-9][0-9]*)$"  # a token id as a JSON object's key
MAX_LOGPROBS = 20  # vLLM's default max_logprobs; OpenAI's top_logprobs allows as many
LogitBias = dict[
    Annotated[str, Field(pattern=TOKEN_KEY)], Annotated[float, Field(strict=True, ge=-100, le=100)]
]
Logprobs = Annotated[int, Field(strict=True, ge=0, le=MAX_LOGPROBS), BeforeValidator(_integral)]
ChoiceCount = Annotated[int, Field(strict=True, ge=1, le=MAX_CHOICES), BeforeValidator(_integral)]
TopK = Annotated[int, Field(strict=True, ge=-1), BeforeValidator(_integral)]  # -1, 0: every token

# vLLM's request extensions this server does not do: each is accepted at its neutral value (the
# first) and refused otherwise with the message, so a vLLM client never silently loses one.
VLLM_NEUTRAL_ONLY: dict[str, tuple[Any, str]] = {
    "min_tokens": (0, "min_tokens is not supported: leave it out or set it to 0"),
    "stop_token_ids": ([], "stop_token_ids is not supported: leave it out (stop takes strings)"),
    "include_stop_str_in_output": (
        False, "include_stop_str_in_output is not supported: leave it out or set it to false"),
    "use_beam_search": (False, "beam search is not supported: leave use_beam_search out"),
    "guided_json": (None, 'guided_json is not supported: send response_format {"type": '
                    '"json_schema", "json_schema": {"name": ..., "schema": ...}} instead'),
    "guided_regex": (None, "guided_regex is not supported: leave it out"),
    "guided_choice": (None, "guided_choice is not supported: leave it out"),
    "guided_grammar": (None, "guided_grammar is not supported: leave it out"),
    "truncate_prompt_tokens": (None, "truncate_prompt_tokens is not supported: shorten the prompt "
                               "yourself"),
}
VLLM_CHAT_NEUTRAL_ONLY: dict[str, tuple[Any, str]] = {
    "add_generation_prompt": (True, "add_generation_prompt false is not supported: the chat "
                              "prompt always ends with the assistant's turn opened"),
    "continue_final_message": (False, "continue_final_message is not supported: leave it out"),
    "echo": (False, "echo is not supported on chat completions: leave it out (/v1/completions "
             "echoes the prompt)"),
}

# OpenAI's chat fields that would change what the answer is (audio out, web search): accepted at
# their neutral value and refused otherwise, so that a client never gets text alone in silence.
OPENAI_CHAT_NEUTRAL_ONLY: dict[str, tuple[Any, str]] = {
    "modalities": (["text"], 'audio output is not supported: leave modalities out or set it to '
                   '["text"]'),
    "audio": (None, "audio output is not supported: leave audio out"),
    "web_search_options": (None, "web search is not supported: leave web_search_options out"),
}


def _neutral(value: Any) -> Callable[[dict[str, Any]], None]:
    return _only(value) if value is None else _only(value, None)


def _only(*values: Any) -> Callable[[dict[str, Any]], None]:
    """Returns a json_schema_extra that documents a field accepting only `values`."""

    def document(schema: dict[str, Any]) -> None:
        kept = {k: schema[k] for k in ("title", "description") if k in schema}
        schema.clear()
        schema.update(kept, enum=list(values))

    return document


def _limit(**keywords: Any) -> Callable[[dict[str, Any]], None]:
    """Returns a json_schema_extra that adds `keywords` to the field's non-null schema."""

    def document(schema: dict[str, Any]) -> None:
        for option in schema.get("anyOf", [schema]):
            if option.get("type") != "null":
                option.update(keywords)

    return document


def decimal_at_most(n: int) -> str:
    """Returns a regular expression matching the decimal integers 0..n, without leading zeros."""
    digits = str(n)
    options = ["0"] if n < 10 else ["0", f"[1-9][0-9]{{0,{len(digits) - 2}}}"]
    for i, d in enumerate(digits):
        low = 1 if i == 0 else 0
        if int(d) > low:
            rest = len(digits) - i - 1
            options.append(f"{digits[:i]}[{low}-{int(d) - 1}]" + (f"[0-9]{{{rest}}}" if rest else ""))
    if n >= 10:
        options.append(digits)
    elif n > 0:
        options = [f"[0-{n}]"]
    return "^(" + "|".join(options) + ")$"


def _token_map(schema: dict[str, Any]) -> None:
    """Documents logit_bias: token ids (decimal strings) to a bias in [-100, 100]."""
    for option in schema.get("anyOf", [schema]):
        if option.get("type") == "object":
            value = next(iter(option.pop("patternProperties").values()))
            option.update(propertyNames={"pattern": TOKEN_KEY}, additionalProperties=value)


def _accepts_null(schema: dict[str, Any]) -> bool:
    return (
        schema.get("type") == "null"
        or None in schema.get("enum", ())
        or any(_accepts_null(s) for s in schema.get("anyOf", ()))
    )


def _document_request(schema: dict[str, Any]) -> None:
    """Completes a request's JSON Schema with the rules its validators enforce."""
    required = set(schema.get("required", ()))
    for name, prop in schema.get("properties", {}).items():
        # `_null_means_default`: null is accepted wherever a field may be left out.
        if name in required or _accepts_null(prop):
            continue
        if "enum" in prop:
            prop["enum"].append(None)
            continue
        kept = {k: prop.pop(k) for k in ("title", "description", "default") if k in prop}
        inner = dict(prop)
        prop.clear()
        prop.update(anyOf=[inner, {"type": "null"}], **kept)
    # `unsupported_fields`: stream_options (not null) needs "stream": true.
    schema["if"] = {
        "properties": {"stream_options": {"type": "object"}},
        "required": ["stream_options"],
    }
    schema["then"] = {"properties": {"stream": {"const": True}}, "required": ["stream"]}


class JsonSchemaFormat(BaseModel):
    """response_format's `json_schema`: the answer is JSON valid against `schema`."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    # A JSON Schema object (the field is `schema`; pydantic's BaseModel owns that name).
    schema_: dict[str, Any] = Field(alias="schema")
    # OpenAI's strict mode; the answer follows the schema either way (constrained decoding).
    strict: bool | None = Field(default=None, strict=True)


class TextFormat(BaseModel):
    type: Literal["text"]


class JsonObjectFormat(BaseModel):
    type: Literal["json_object"]


class JsonSchemaResponseFormat(BaseModel):
    type: Literal["json_schema"]
    json_schema: JsonSchemaFormat


# JSON answers are decoded under a grammar of the schema (agent/constrained.py); a schema the
# grammar library cannot enforce is a 400 `invalid_json_schema` naming the reason.
ResponseFormat = Annotated[
    TextFormat | JsonObjectFormat | JsonSchemaResponseFormat, Field(discriminator="type")
]


class StreamOptions(BaseModel):
    include_usage: bool = Field(default=False, strict=True)


class _GenerationRequest(BaseModel):
    """Parameters shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_document_request)

    # Optional: when omitted the server's model answers (curl users rarely know its name).
    model: str | None = None
    # Numbers and flags are strict: "ten" or "yes" is a client bug to report, not to coerce.
    max_tokens: PositiveInt | None = None
    temperature: float = Field(default=1.0, strict=True, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, strict=True, gt=0.0, le=1.0)
    seed: Seed | None = None
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = Field(default=False, strict=True)
    stream_options: StreamOptions | None = None
    # Applied on the last stage before sampling, as OpenAI and vLLM define them
    # (agent/sampler.py has the formulas); repetition_penalty is vLLM's extension.
    presence_penalty: float = Field(default=0.0, strict=True, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, strict=True, ge=-2.0, le=2.0)
    # vLLM takes any positive value; float32 logits overflow or vanish far from 1.
    repetition_penalty: float = Field(default=1.0, strict=True, ge=0.01, le=100.0)
    # vLLM's sampling extensions, applied when sampling (agent/sampler.py): keep the top_k most
    # likely tokens (-1 or 0: all), and those at least min_p times as likely as the first.
    top_k: TopK = 0
    min_p: float = Field(default=0.0, strict=True, ge=0.0, le=1.0)
    # Accepted only at their neutral value (VLLM_NEUTRAL_ONLY).
    min_tokens: Any = Field(default=None, json_schema_extra=_neutral(0))
    stop_token_ids: Any = Field(default=None, json_schema_extra=_neutral([]))
    include_stop_str_in_output: Any = Field(default=None, json_schema_extra=_neutral(False))
    use_beam_search: Any = Field(default=None, json_schema_extra=_neutral(False))
    guided_json: Any = Field(default=None, json_schema_extra=_neutral(None))
    guided_regex: Any = Field(default=None, json_schema_extra=_neutral(None))
    guided_choice: Any = Field(default=None, json_schema_extra=_neutral(None))
    guided_grammar: Any = Field(default=None, json_schema_extra=_neutral(None))
    truncate_prompt_tokens: Any = Field(default=None, json_schema_extra=_neutral(None))
    logit_bias: LogitBias | None = Field(default=None, json_schema_extra=_token_map)
    # Choices per prompt; they share the prompt's prefill and KV blocks. With a seed, member
    # i samples with seed + i (as vLLM does).
    n: ChoiceCount = 1
    user: str | None = None
    # Extension (same name as vLLM's): generate exactly max_tokens, for benchmarks.
    ignore_eos: bool = Field(default=False, strict=True)
    # text, or JSON: json_object (any object) or json_schema (valid against a schema); vLLM
    # accepts it on /v1/completions too
    response_format: ResponseFormat | None = None

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
        for s in sequences:
            _check_unicode(s, "stop")
        return stop

    def stop_sequences(self) -> tuple[str, ...]:
        """Returns the stop strings as a tuple, whichever form the client used."""
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        """Returns logit_bias as (token id, bias) pairs, in token order."""
        return tuple(sorted((int(t), b) for t, b in (self.logit_bias or {}).items()))

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def response_schema(self) -> dict[str, Any] | None:
        """Returns the JSON Schema the answer must follow (None: free text)."""
        if isinstance(self.response_format, JsonObjectFormat):
            return {"type": "object"}
        if isinstance(self.response_format, JsonSchemaResponseFormat):
            return self.response_format.json_schema.schema_
        return None

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """Returns (param, message) for each field set to something this server cannot do."""
        problems: list[tuple[str, str]] = []
        if self.stream_options is not None and not self.stream:
            problems.append(
                ("stream_options", "stream_options is only allowed when stream is true")
            )
        problems += _not_neutral(self, VLLM_NEUTRAL_ONLY)
        return problems


def _document_completion_request(schema: dict[str, Any]) -> None:
    _document_request(schema)
    # `unsupported_fields`: max_tokens 0 needs "echo": true.
    schema["allOf"] = [{
        "if": {"properties": {"max_tokens": {"const": 0}}, "required": ["max_tokens"]},
        "then": {"properties": {"echo": {"const": True}}, "required": ["echo"]},
    }]


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions. `prompt` is a string or token ids, or a batch of either: one choice
    per prompt (times n), in order."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_document_completion_request)

    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    # 0 only with echo: the prompt (and its logprobs) alone, as vLLM answers.
    max_tokens: NonNegativeInt | None = None
    # The prompt before the answer; with logprobs, the prompt tokens' logprobs too (the first
    # null), from the same float32 log-softmax as the answer's.
    echo: bool = Field(default=False, strict=True)
    # Each generated token's logprob and the `logprobs` most likely tokens' (at most 20).
    logprobs: Logprobs | None = None
    best_of: Integer | None = Field(default=None, json_schema_extra=_only(1, None))
    suffix: str | None = Field(default=None, json_schema_extra=_only("", None))

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty: send some text (or token ids)")
            _check_unicode(prompt, "prompt")
            return prompt
        if isinstance(prompt, list) and prompt:
            if len(prompt) > MAX_PROMPTS and not isinstance(prompt[0], int | float):
                raise ValueError(
                    f"a batch holds at most {MAX_PROMPTS} prompts, got {len(prompt)}: split it"
                )
            if all(isinstance(p, str) for p in prompt):
                for i, p in enumerate(prompt):
                    if not p:
                        raise ValueError(f"prompt is empty: prompt[{i}] holds no text")
                    _check_unicode(p, "prompt")
                return prompt
            if all(isinstance(p, list) for p in prompt):
                return [_token_ids(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
            return _token_ids(prompt, "prompt")
        raise ValueError(
            "prompt must be a non-empty string, token ids, or a batch (list) of either"
        )

    def prompts(self) -> list[str | list[int]]:
        """Returns the prompts of the request, a batch of one or more."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(t, int) for t in self.prompt):
            return [list(self.prompt)]  # type: ignore[arg-type]
        return list(self.prompt)  # type: ignore[arg-type]

    def unsupported_fields(self) -> list[tuple[str, str]]:
        problems = super().unsupported_fields()
        if self.max_tokens == 0 and not self.echo:
            problems.append(
                ("max_tokens", "max_tokens=0 generates nothing: it needs echo true (the prompt's "
                 "logprobs alone); otherwise ask for at least 1 token")
            )
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
            _check_unicode(content, "content")
            return content
        if isinstance(content, list) and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content
        ):
            for p in content:
                _check_unicode(p["text"], "content")
            return content
        if content is None:  # OpenAI's assistant turn that only calls tools
            raise ValueError(
                "content is null: every message needs its text, a string or a list of "
                '{"type": "text", "text": ...} parts (an assistant turn of tool_calls alone is not '
                "supported: tool calling is not)"
            )
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


def _document_chat_request(schema: dict[str, Any]) -> None:
    _document_request(schema)
    # `unsupported_fields`: top_logprobs above 0 needs "logprobs": true.
    schema["allOf"] = [{
        "if": {
            "properties": {"top_logprobs": {"type": "integer", "minimum": 1}},
            "required": ["top_logprobs"],
        },
        "then": {"properties": {"logprobs": {"const": True}}, "required": ["logprobs"]},
    }]


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore", json_schema_extra=_document_chat_request)

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: PositiveInt | None = None
    logprobs: bool = Field(default=False, strict=True)
    # With logprobs: how many of the most likely tokens to list at each position (at most 20).
    top_logprobs: Logprobs | None = None
    # Accepted only at their neutral value (see `unsupported_fields`).
    tools: list[Any] | None = Field(default=None, json_schema_extra=_limit(maxItems=0))
    functions: list[Any] | None = Field(default=None, json_schema_extra=_limit(maxItems=0))
    # Without tools the answer is text, which "none" and "auto" allow; "required" or a named
    # function asks for a tool call this server cannot make (OpenAI refuses it without tools).
    tool_choice: Any = Field(default=None, json_schema_extra=_only(*TEXT_CHOICES, None))
    function_call: Any = Field(default=None, json_schema_extra=_only(*TEXT_CHOICES, None))
    # vLLM's chat extensions, accepted only at their neutral value (VLLM_CHAT_NEUTRAL_ONLY).
    add_generation_prompt: Any = Field(default=None, json_schema_extra=_neutral(True))
    continue_final_message: Any = Field(default=None, json_schema_extra=_neutral(False))
    echo: Any = Field(default=None, json_schema_extra=_neutral(False))
    # OpenAI's, accepted only at their neutral value (OPENAI_CHAT_NEUTRAL_ONLY).
    modalities: Any = Field(default=None, json_schema_extra=_neutral(["text"]))
    audio: Any = Field(default=None, json_schema_extra=_neutral(None))
    web_search_options: Any = Field(default=None, json_schema_extra=_neutral(None))

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

    def logprobs_wanted(self) -> int | None:
        """Returns how many top alternatives to list per token, or None without logprobs."""
        return (self.top_logprobs or 0) if self.logprobs else None

    def unsupported_fields(self) -> list[tuple[str, str]]:
        problems = super().unsupported_fields()
        if self.top_logprobs and not self.logprobs:
            problems.append(
                ("top_logprobs", "top_logprobs needs logprobs: set logprobs to true as well")
            )
        # One refusal for tool calling however many of its fields ask for it (a tool-calling
        # client sends tools and tool_choice together), naming what does structured output.
        if self.tools or self.functions:
            param = "tools" if self.tools else "functions"
            problems.append((
                param,
                f"tool calling is not supported by this server: leave "
                f"{param} out, and {TOOL_CHOICE_OF[param]} with it; {STRUCTURED_OUTPUT}",
            ))
        else:
            for param in ("tool_choice", "function_call"):
                choice = getattr(self, param)
                if choice is not None and choice not in TEXT_CHOICES:
                    problems.append((
                        param,
                        f"{param} {choice!r} asks for a tool call, and tool calling is not "
                        f'supported: leave {param} out or set it to "none" or "auto" (the answer '
                        f"is text); {STRUCTURED_OUTPUT}",
                    ))
                    break
        problems += _not_neutral(self, VLLM_CHAT_NEUTRAL_ONLY)
        problems += _not_neutral(self, OPENAI_CHAT_NEUTRAL_ONLY)
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


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
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


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
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
    logprobs: ChatLogprobs | None = None
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


class Health(BaseModel):
    """GET /health: 200 with status "ok", or 503 with status "unavailable" and the reason."""

    status: Literal["ok", "unavailable"]
    reason: str | None = None
    epoch: int | None = None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def _not_neutral(body: BaseModel, fields: dict[str, tuple[Any, str]]) -> list[tuple[str, str]]:
    """Returns (param, message) for each of `fields` set to something else than its neutral value
    (the same type too: 0 is not false)."""
    problems = []
    for name, (neutral, message) in fields.items():
        value = getattr(body, name)
        if value is not None and (type(value) is not type(neutral) or value != neutral):
            problems.append((name, message))
    return problems


def _token_ids(ids: Any, field: str) -> list[int]:
    """Returns `ids` as a non-empty list of token ids; raises ValueError naming `field`."""
    values = [_integral(t) for t in ids] if isinstance(ids, list) else []
    if not values or not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
        if field == "prompt":
            raise ValueError(
                "prompt must be a non-empty string, token ids, or a batch (list) of either"
            )
        raise ValueError(f"{field} must be a non-empty list of token ids")
    if min(values) < 0:
        raise ValueError(f"{field} token ids must be >= 0, got {min(values)}")
    return values


def _check_unicode(text: str, field: str) -> None:
    """Refuses lone UTF-16 surrogates (JSON's "\\ud800"): no tokenizer can encode them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start]
        raise ValueError(
            f"{field} is not valid Unicode: it holds a lone surrogate {bad!r} at character "
            f"{exc.start}; send UTF-8 text"
        ) from None


def describe_model_limits(schema: dict[str, Any], max_context: int, vocab_size: int | None) -> None:
    """Adds the limits of the served model to the request bodies of the OpenAPI `schema`.

    A prompt takes at least one token, so max_tokens is at most `max_context - 1`; that a
    prompt and its max_tokens fit together JSON Schema cannot say: requests that do not are
    refused with a 400 `context_length_exceeded`.
    """
    schemas = schema["components"]["schemas"]
    for name, fields in (
        ("CompletionRequest", ("max_tokens",)),
        ("ChatCompletionRequest", ("max_tokens", "max_completion_tokens")),
    ):
        for field in fields:
            _limit(maximum=max_context - 1)(schemas[name]["properties"][field])
    for option in schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]:
        ids = option.get("items", {})
        if ids.get("type") == "array":  # a list of one list of token ids
            option, ids = ids, ids["items"]
        if ids.get("type") == "integer":
            option["maxItems"] = max_context - 1
            if vocab_size is not None:
                ids["maximum"] = vocab_size - 1
    if vocab_size is not None:
        for name in ("CompletionRequest", "ChatCompletionRequest"):
            for option in schemas[name]["properties"]["logit_bias"]["anyOf"]:
                if option.get("type") == "object":
                    option["propertyNames"] = {"pattern": decimal_at_most(vocab_size - 1)}
