"""Every kind of bad input answers 400/404 in OpenAI's shape, saying what to fix."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from agent.gateway import create_app
from tests.gateway.fake_engine import FakeEngine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]


def error_of(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


CASES = [
    # (path, body, param, words the message must contain)
    (
        COMPLETIONS,
        {"prompt": "x" * 64},
        "prompt",
        ["prompt has 64 tokens", "context is 64", "shorten"],
    ),
    (
        COMPLETIONS,
        {"prompt": "x" * 50, "max_tokens": 20},
        "max_tokens",
        [
            "prompt has 50 tokens and max_tokens is 20",
            "context is 64 tokens",
            "lower max_tokens",
            "at most 14",
        ],
    ),
    (
        COMPLETIONS,
        {"prompt": "Hi", "max_tokens": 10**12},
        "max_tokens",
        ["max_tokens is 1000000000000"],
    ),
    (CHAT, {"messages": USER, "max_tokens": 0}, "max_tokens", ["max_tokens", "greater than or equal to 1"]),
    (COMPLETIONS, {"prompt": "Hi", "max_tokens": -5}, "max_tokens", ["max_tokens", "got -5"]),
    (
        COMPLETIONS,
        {"prompt": "Hi", "max_tokens": "ten"},
        "max_tokens",
        ["max_tokens", "integer", "'ten'"],
    ),
    (COMPLETIONS, {"prompt": "Hi", "max_tokens": 2.5}, "max_tokens", ["max_tokens", "integer"]),
    (
        COMPLETIONS,
        {"prompt": "Hi", "temperature": -0.1},
        "temperature",
        ["temperature", "greater than or equal to 0"],
    ),
    (
        COMPLETIONS,
        {"prompt": "Hi", "temperature": 2.5},
        "temperature",
        ["temperature", "less than or equal to 2"],
    ),
    (COMPLETIONS, {"prompt": "Hi", "top_p": 0}, "top_p", ["top_p", "greater than 0"]),
    (COMPLETIONS, {"prompt": "Hi", "top_p": 1.5}, "top_p", ["top_p", "less than or equal to 1"]),
    (COMPLETIONS, {"prompt": "Hi", "n": 17}, "n", ["n", "less than or equal to 16"]),
    (CHAT, {"messages": USER, "n": 0}, "n", ["n", "greater than or equal to 1"]),
    (
        COMPLETIONS,
        {"prompt": "Hi", "stop": ["a", "b", "c", "d", "e"]},
        "stop",
        ["at most 4 stop sequences", "got 5"],
    ),
    (COMPLETIONS, {"prompt": "Hi", "stop": [""]}, "stop", ["stop", "empty"]),
    (COMPLETIONS, {"max_tokens": 5}, "prompt", ["prompt is required"]),
    (COMPLETIONS, {"prompt": ""}, "prompt", ["prompt is empty"]),
    (COMPLETIONS, {"prompt": []}, "prompt", ["prompt must be"]),
    (
        COMPLETIONS,
        {"prompt": ["a"] * 65},
        "prompt",
        ["at most 64 prompts", "got 65"],
    ),
    (COMPLETIONS, {"prompt": ["a", ""]}, "prompt", ["prompt[1] holds no text"]),
    (COMPLETIONS, {"prompt": ["Hi", "x" * 64, "x" * 63]}, "prompt", ["prompt[1] has 64 tokens", "shorten"]),
    (
        COMPLETIONS,
        {"prompt": [[1] * 30, [2] * 50], "max_tokens": 20},
        "max_tokens",
        ["prompt[1] has 50 tokens and max_tokens is 20", "at most 14"],
    ),
    (COMPLETIONS, {"prompt": [[1, 2], [3, -1]]}, "prompt", ["prompt[1] token ids must be >= 0"]),
    (COMPLETIONS, {"prompt": 7}, "prompt", ["prompt must be"]),
    (COMPLETIONS, {"prompt": [[3, -1]]}, "prompt", ["token ids must be >= 0, got -1"]),
    (COMPLETIONS, {"prompt": [[]]}, "prompt", ["prompt[0] must be a non-empty list of token ids"]),
    (COMPLETIONS, {"prompt": "Hi", "max_tokens": 0}, "max_tokens", ["max_tokens=0", "needs echo"]),
    (
        COMPLETIONS,
        {"prompt": "Hi", "stream_options": {"include_usage": True}},
        "stream_options",
        ["only allowed when stream is true"],
    ),
    (CHAT, {"model": "fake-model"}, "messages", ["messages is required"]),
    (CHAT, {"messages": []}, "messages", ["messages is empty", "at least one message"]),
    (
        CHAT,
        {"messages": [{"role": "robot", "content": "Hi"}]},
        "messages[0].role",
        ["messages[0].role", "'user'", "'robot'"],
    ),
    (
        CHAT,
        {"messages": [{"role": "tool", "content": "42"}]},
        "messages",
        ["tool calling is not supported"],
    ),
    (
        CHAT,
        {"messages": [{"role": "user"}]},
        "messages[0].content",
        ["messages[0].content is required"],
    ),
    (CHAT, {"messages": "Hi"}, "messages", ["messages", "list"]),
    (
        CHAT,
        {"messages": [{"role": "user", "content": "x" * 70}]},
        "messages",
        ["chat prompt (messages) has 71 tokens", "context is 64", "shorten the messages"],
    ),
    (
        CHAT,
        {"messages": USER, "max_completion_tokens": 100},
        "max_completion_tokens",
        ["max_completion_tokens is 100", "lower max_completion_tokens"],
    ),
    (
        CHAT,
        {"messages": USER, "tools": [{"type": "function"}]},
        "tools",
        ["tool calling is not supported"],
    ),
    (
        CHAT,
        {"messages": USER, "tool_choice": "required"},
        "tool_choice",
        ["tool_choice 'required' asks for a tool call", "leave tool_choice out", '"none" or "auto"'],
    ),
    (
        CHAT,
        {"messages": USER, "tool_choice": {"type": "function", "function": {"name": "f"}}},
        "tool_choice",
        ["asks for a tool call", "tool calling is not supported"],
    ),
    (CHAT, {"messages": USER, "function_call": {"name": "f"}}, "function_call", ["leave function_call out"]),
    (CHAT, {"messages": USER, "stream": "yes"}, "stream", ["stream", "boolean"]),
    (COMPLETIONS, {"prompt": "Hi", "top_k": -2}, "top_k", ["greater than or equal to -1"]),
    (COMPLETIONS, {"prompt": "Hi", "top_k": "5"}, "top_k", ["top_k", "integer"]),
    (CHAT, {"messages": USER, "min_p": 1.5}, "min_p", ["less than or equal to 1"]),
    # vLLM's extensions that are not done: refused unless neutral, never silently dropped
    (COMPLETIONS, {"prompt": "Hi", "min_tokens": 5}, "min_tokens", ["min_tokens is not supported"]),
    (CHAT, {"messages": USER, "stop_token_ids": [2]}, "stop_token_ids", ["stop takes strings"]),
    (CHAT, {"messages": USER, "include_stop_str_in_output": True}, "include_stop_str_in_output",
     ["not supported"]),
    (COMPLETIONS, {"prompt": "Hi", "use_beam_search": True}, "use_beam_search", ["beam search"]),
    (CHAT, {"messages": USER, "guided_json": {"type": "object"}}, "guided_json", ["response_format"]),
    (CHAT, {"messages": USER, "guided_choice": ["a", "b"]}, "guided_choice", ["not supported"]),
    (COMPLETIONS, {"prompt": "Hi", "truncate_prompt_tokens": 10}, "truncate_prompt_tokens", ["shorten"]),
    (CHAT, {"messages": USER, "add_generation_prompt": False}, "add_generation_prompt", ["always ends"]),
    (CHAT, {"messages": USER, "continue_final_message": True}, "continue_final_message", ["not supported"]),
    (CHAT, {"messages": USER, "echo": True}, "echo", ["/v1/completions echoes"]),
    (CHAT, {"messages": USER, "use_beam_search": 0}, "use_beam_search", ["beam search"]),  # 0 is not false
    # OpenAI's that would change the answer: audio out and web search were silently dropped
    (CHAT, {"messages": USER, "modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
     "modalities", ["audio output is not supported", 'set it to ["text"]']),
    (CHAT, {"messages": USER, "audio": {"voice": "alloy", "format": "wav"}}, "audio", ["leave audio out"]),
    (CHAT, {"messages": USER, "web_search_options": {}}, "web_search_options", ["web search is not supported"]),
    (
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content",
        ["messages[0].content must be a string or a list of", "images and audio are not supported"],
    ),
    (
        CHAT,  # an assistant turn that only called tools, as the openai client sends it back
        {"messages": [*USER, {"role": "assistant", "content": None, "tool_calls": []}, *USER]},
        "messages[1].content",
        ["messages[1].content is null", "tool_calls alone is not supported"],
    ),
    (CHAT, {"messages": USER, "stop": 5}, "stop", ["stop must be a string or a list of up to 4"]),
    (CHAT, {"messages": USER, "frequency_penalty": 2.5}, "frequency_penalty", ["less than or equal to 2"]),
    (COMPLETIONS, {"prompt": "Hi", "repetition_penalty": 0}, "repetition_penalty", ["greater than or equal to 0.01"]),
    (COMPLETIONS, {"prompt": "Hi", "logit_bias": {"x": 1}}, "logit_bias.x.[key]", ["pattern"]),
    (COMPLETIONS, {"prompt": "Hi", "logit_bias": {"5": 101}}, "logit_bias.5", ["less than or equal to 100"]),
    (COMPLETIONS, {"prompt": "Hi", "logprobs": 21}, "logprobs", ["less than or equal to 20"]),
    (CHAT, {"messages": USER, "top_logprobs": 2}, "top_logprobs", ["set logprobs to true"]),
]


@pytest.mark.parametrize(("path", "body", "param", "words"), CASES)
def test_bad_input_is_a_400_that_says_what_to_fix(
    client: TestClient,
    engine: FakeEngine,
    path: str,
    body: dict[str, Any],
    param: str,
    words: list[str],
) -> None:
    error = error_of(client.post(path, json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    for word in words:
        assert word in error["message"], (word, error["message"])
    assert engine.calls == []  # refused before any engine work


def test_context_message_reads_like_the_example(client: TestClient) -> None:
    error = error_of(client.post(COMPLETIONS, json={"prompt": "x" * 60, "max_tokens": 20}), 400)
    assert error["message"] == (
        "prompt has 60 tokens and max_tokens is 20; the model's context is 64 tokens: "
        "shorten the prompt or lower max_tokens (at most 4 with this prompt)."
    )
    assert error["code"] == "context_length_exceeded"


@pytest.mark.parametrize(
    ("content", "content_type", "words"),
    [
        (b'{"prompt": "Hi", ', "application/json", ["not valid JSON", "send a JSON object"]),
        (b"", "application/json", ["body is empty"]),
        (b'["Hi"]', "application/json", ["must be a JSON object"]),
        (b"prompt=Hi", "application/x-www-form-urlencoded", ["Content-Type: application/json"]),
    ],
)
def test_body_that_is_not_a_json_object(
    client: TestClient, content: bytes, content_type: str, words: list[str]
) -> None:
    r = client.post(COMPLETIONS, content=content, headers={"content-type": content_type})
    error = error_of(r, 400)
    for word in words:
        assert word in error["message"], error["message"]


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT])
def test_unknown_model_is_a_404_naming_the_served_one(client: TestClient, path: str) -> None:
    r = client.post(path, json={"model": "gpt-9", "prompt": "Hi", "messages": USER})
    error = error_of(r, 404)
    assert error["code"] == "model_not_found" and error["param"] == "model"
    assert "'gpt-9'" in error["message"] and "'fake-model'" in error["message"]
    assert "/v1/models" in error["message"]


def test_unknown_model_names_each_served_name_once(engine: FakeEngine) -> None:
    # serve's aliases repeat what --model said when the catalog lists it as well
    app = create_app(engine, aliases=["fake-alias", "fake-model", "fake-alias"])
    error = error_of(TestClient(app).post(CHAT, json={"model": "gpt-9", "messages": USER}), 404)
    assert "it serves 'fake-model', 'fake-alias' (GET /v1/models" in error["message"]


@pytest.mark.parametrize("choice", ["none", "auto", None])
def test_a_tool_choice_a_text_answer_satisfies_is_served(client: TestClient, choice: str | None) -> None:
    r = client.post(CHAT, json={"messages": USER, "tool_choice": choice, "function_call": choice})
    assert r.status_code == 200, r.text


NEUTRAL_VLLM_FIELDS = {
    "min_tokens": 0, "stop_token_ids": [], "include_stop_str_in_output": False, "use_beam_search": False,
    "guided_json": None, "guided_regex": None, "guided_choice": None, "guided_grammar": None,
    "truncate_prompt_tokens": None,
}


@pytest.mark.parametrize(("path", "body"), [
    (COMPLETIONS, {"prompt": "Hi", **NEUTRAL_VLLM_FIELDS}),
    (CHAT, {"messages": USER, **NEUTRAL_VLLM_FIELDS, "add_generation_prompt": True,
            "continue_final_message": False, "echo": False}),
    (CHAT, {"messages": USER, "modalities": ["text"], "audio": None, "web_search_options": None}),
])
def test_vllm_extensions_at_their_neutral_value_are_served(
    client: TestClient, path: str, body: dict[str, Any]
) -> None:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text


def test_rejections_are_counted(client: TestClient) -> None:
    client.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": "ten"})
    client.post(COMPLETIONS, json={"model": "gpt-9", "prompt": "Hi"})
    text = client.get("/metrics").text
    assert 'pipeshift_error_responses_total{status="400"} 1.0' in text
    assert 'pipeshift_error_responses_total{status="404"} 1.0' in text
