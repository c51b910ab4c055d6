"""Checks a request against the model before any engine work: name, context, limits.

Each refusal says what was wrong, with the numbers, and what to change.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from agent.constrained import InvalidSchema, json_schema_grammar
from agent.engine_api import SamplingParams
from agent.gateway.errors import APIError

# OpenAI's default for /v1/completions; chat defaults to whatever room the context leaves.
DEFAULT_COMPLETION_MAX_TOKENS = 16
# A temperature or top_p below this samples greedily (vLLM treats temperature so too): it keeps
# only the most likely token anyway, and the sampler's float32 arithmetic would break on it
# (5e-324 is 0 in float32: a division by zero, or every token dropped).
SAMPLING_EPS = 1e-5


def resolve_model(requested: str | None, served: str, aliases: Sequence[str]) -> str:
    """Returns the name to answer with; raises a 404 `model_not_found` for any other model."""
    if requested is None or requested == served or requested in aliases:
        return requested or served
    names = ", ".join(repr(n) for n in dict.fromkeys((served, *aliases)))  # each once
    raise APIError(
        f"The model {requested!r} does not exist on this server; it serves {names} "
        "(GET /v1/models lists them).",
        status=404,
        param="model",
        code="model_not_found",
    )


def check_output_limit(max_tokens: int | None, max_context: int, param: str) -> None:
    """Raises a 400 when `max_tokens` alone leaves no room for a prompt: the limit the OpenAPI
    document states (a prompt and its max_tokens together are checked by `sampling_params`)."""
    if max_tokens is not None and max_tokens >= max_context:
        raise APIError(
            f"{param} is {max_tokens}; the model's context is {max_context} tokens and must also "
            f"hold the prompt: lower {param} to at most {max_context - 1}.",
            param=param,
            code="context_length_exceeded",
        )


def sampling_params(
    *,
    prompt_tokens: int,
    max_context: int,
    max_tokens: int | None,
    default_max_tokens: int | None,
    temperature: float,
    top_p: float,
    seed: int | None,
    top_k: int = 0,
    min_p: float = 0.0,
    stop: tuple[str, ...],
    prompt_param: str,
    max_tokens_param: str = "max_tokens",
    prompt_name: str = "prompt",
    ignore_eos: bool = False,
    logit_bias: tuple[tuple[int, float], ...] = (),
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    repetition_penalty: float = 1.0,
    logprobs: int | None = None,
    grammar: str | None = None,
    n: int = 1,
    prompt_logprobs: int | None = None,
) -> SamplingParams:
    """Returns the engine's parameters, or raises a 400 when prompt and output cannot fit.

    `default_max_tokens` None means "all the room the context leaves". `prompt_param` is the
    request field holding the prompt; `prompt_name` is how messages call it.
    """
    if prompt_tokens == 0:  # text, but only characters the tokenizer has no token for
        raise APIError(
            f"{prompt_name} has no tokens: the model's tokenizer has none for any of its "
            "characters (control characters such as \\x04): send some text.",
            param=prompt_param,
            code="empty_prompt",
        )
    room = max_context - prompt_tokens
    if room <= 0:
        raise APIError(
            f"{prompt_name} has {prompt_tokens} tokens; the model's context is {max_context} "
            f"tokens and must also hold the answer: shorten the {prompt_param} to at most "
            f"{max_context - 1} tokens.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    asked = max_tokens is not None
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    elif max_tokens > room:
        raise APIError(
            f"{prompt_name} has {prompt_tokens} tokens and {max_tokens_param} is {max_tokens}; "
            f"the model's context is {max_context} tokens: shorten the {prompt_param} or lower "
            f"{max_tokens_param} (at most {room} with this prompt).",
            param=max_tokens_param,
            code="context_length_exceeded",
        )
    if temperature < SAMPLING_EPS or top_p < SAMPLING_EPS:
        temperature = 0.0
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=max(top_k, 0),
        min_p=min_p,
        seed=seed,
        stop=stop,
        ignore_eos=ignore_eos,
        logit_bias=logit_bias,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        repetition_penalty=repetition_penalty,
        logprobs=logprobs,
        grammar=grammar,
        n=n,
        prompt_logprobs=prompt_logprobs,
        max_tokens_asked=asked,
    )


def response_grammar(schema: dict[str, Any] | None) -> str | None:
    """Returns the grammar that constrains the answer to `schema` (None: unconstrained); raises
    a 400 `invalid_json_schema` with the grammar library's reason when it cannot be used."""
    if schema is None:
        return None
    try:
        return json_schema_grammar(schema)
    except InvalidSchema as exc:
        raise APIError(
            f"response_format's JSON schema cannot be used for constrained decoding: {exc}. "
            "Fix the schema (JSON Schema draft 2020-12; see the supported keywords of llguidance).",
            param="response_format",
            code="invalid_json_schema",
        ) from None
