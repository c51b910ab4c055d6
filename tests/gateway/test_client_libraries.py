"""Requests that OpenAI client libraries other than `openai` send, as they send them, and what
the gateway answers: the body of each request is copied from the library (named in the test),
so that no library needs installing here."""

from __future__ import annotations

import pytest

from tests.gateway.test_bad_input import CHAT, USER, error_of

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
PERSON_TOOL = {"type": "function", "function": {"name": "Person", "parameters": PERSON}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # langchain-openai: ChatOpenAI(...).with_structured_output(Person, method="function_calling")
        ({"tools": [PERSON_TOOL], "tool_choice": {"type": "function", "function": {"name": "Person"}},
          "parallel_tool_calls": False}, "tools"),
        # langchain-openai: ChatOpenAI(...).bind_tools([Person])
        ({"tools": [PERSON_TOOL]}, "tools"),
        # llama-index-llms-openai-like: OpenAILike(...).as_structured_llm(Person) sends
        # tool_choice "required" without tools when the model is not a function-calling one
        ({"tool_choice": "required"}, "tool_choice"),
    ],
)
def test_a_tool_call_request_is_one_400_that_points_to_response_format(client, engine, body, param):
    error = error_of(client.post(CHAT, json={"messages": USER, **body}), 400)
    assert error["param"] == param
    message = error["message"]
    # One refusal, said once, in sentences: not one message per field run together.
    assert message.count("not supported") == 1, message
    assert message.endswith("."), message
    # What to do instead for structured output: the JSON schema format, which is served.
    assert '"type": "json_schema"' in message, message
    assert engine.calls == []


@pytest.mark.parametrize(
    ("response_format", "missing"),
    [
        ({"type": "json_schema", "json_schema": {"name": "Person"}}, "response_format.json_schema.schema"),
        ({"type": "json_schema"}, "response_format.json_schema"),
    ],
)
def test_a_json_schema_format_missing_a_field_names_it_as_sent(client, response_format, missing):
    # A response_format hand-written for litellm's or llama-index's response_format argument
    # that lost a key; the path in the error is the request's own, without pydantic's union tag
    # (it said response_format.json_schema.json_schema.schema).
    error = error_of(client.post(CHAT, json={"messages": USER, "response_format": response_format}), 400)
    assert error["param"] == missing
    assert error["message"] == f"{missing} is required."
