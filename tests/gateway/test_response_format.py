"""response_format at the gateway: both endpoints hand the schema's grammar to the engine, text
hands none, and a format that cannot be served is a 400 naming the problem."""

from __future__ import annotations

import pytest

from agent.constrained import ANY_OBJECT, json_schema_grammar

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
USER = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("response_format", "schema"),
    [
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}}, SCHEMA),
        ({"type": "json_object"}, ANY_OBJECT),
        ({"type": "text"}, None),
        (None, None),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_the_engine_gets_the_schemas_grammar(client, engine, path, response_format, schema):
    body = {"messages": USER} if path.endswith("chat/completions") else {"prompt": "Hi"}
    r = client.post(path, json={**body, "max_tokens": 2, "response_format": response_format})
    assert r.status_code == 200, r.text
    grammar = engine.calls[-1][2].grammar
    assert grammar == (None if schema is None else json_schema_grammar(schema))


@pytest.mark.parametrize(
    ("response_format", "param", "code", "words"),
    [
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "strin"}}},
         "response_format", "invalid_json_schema", "Invalid type: strin"),
        ({"type": "json_schema", "json_schema": {"name": "a", "schema": {"anyOf": []}}},
         "response_format", "invalid_json_schema", "anyOf is empty"),
        ({"type": "json_schema", "json_schema": {"name": "a"}}, "response_format", None, "schema"),
        ({"type": "json_schema"}, "response_format", None, "json_schema"),
        ({"type": "yaml"}, "response_format", None, "yaml"),
    ],
)
def test_a_format_that_cannot_be_served_is_a_400_naming_it(client, engine, response_format, param, code, words):
    r = client.post("/v1/chat/completions",
                    json={"messages": USER, "max_tokens": 2, "response_format": response_format})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"].startswith(param) and words in error["message"]
    if code is not None:
        assert error["code"] == code
    assert not engine.calls


def test_tools_stay_a_400_as_the_chat_template_has_none(client):
    r = client.post("/v1/chat/completions", json={
        "messages": USER, "tools": [{"type": "function", "function": {"name": "f"}}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"


def test_the_document_declares_the_formats(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    formats = {s["$ref"].rsplit("/", 1)[1] for s in
               schemas["ChatCompletionRequest"]["properties"]["response_format"]["anyOf"][0]["oneOf"]}
    assert formats == {"TextFormat", "JsonObjectFormat", "JsonSchemaResponseFormat"}
    assert schemas["JsonSchemaFormat"]["required"] == ["name", "schema"]
