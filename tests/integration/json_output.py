"""response_format through the official `openai` client: JSON answers constrained by a grammar
on the last stage always parse, and validate against their schema.

These tests run on tests/integration/test_openai_params.py's servers (1 and 3 stages), which
import them, so no server of their own is started.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pydantic
import pytest

openai = pytest.importorskip("openai")

MODEL = "smollm2-135m"
MAX_TOKENS = 100  # ample: the answers below take 15 to 30 tokens

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "country": {"type": "string", "maxLength": 24},
        "founded": {"type": "integer", "minimum": -3000, "maximum": 2100},
    },
    "required": ["city", "country", "founded"],
    "additionalProperties": False,
}
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "is_student": {"type": "boolean"},
    },
    "required": ["name", "age", "is_student"],
    "additionalProperties": False,
}
COLORS = {
    "type": "object",
    "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue", "yellow"]},
                   "minItems": 1, "maxItems": 4},
    },
    "required": ["colors"],
    "additionalProperties": False,
}
SCHEMAS = [("city", CITY), ("person", PERSON), ("colors", COLORS)]
TOPICS = ["Paris", "Tokyo", "Alice, 30", "Bob, a student", "a rainbow", "the sea", "Rome",
          "Carol, 12", "grass", "Lagos"]


def _validator(schema: dict):
    """jsonschema_rs (schemathesis' validator) checks the answers against their schema."""
    return pytest.importorskip("jsonschema_rs").validator_for(schema)


def _ask(client, schema_name: str, schema: dict, topic: str, max_tokens: int = MAX_TOKENS, **extra):
    return client.chat.completions.create(
        model=MODEL, max_tokens=max_tokens,
        messages=[{"role": "user", "content": f"Describe {topic} as JSON."}],
        response_format={"type": "json_schema",
                         "json_schema": {"name": schema_name, "schema": schema, "strict": True}},
        **extra,
    )


def test_json_schema_answers_parse_and_validate(client):
    """20 requests, 3 schemas, greedy and sampled, all at once, and one streamed: every answer
    ends by itself ("stop") and is JSON valid against its schema; the streamed one's text is
    the same request's answered whole."""
    jobs = [(SCHEMAS[i % 3], TOPICS[i % len(TOPICS)],
             {"temperature": 0} if i % 2 == 0 else {"temperature": 0.9, "seed": i})
            for i in range(20)]

    def streamed() -> str:
        (name, schema), topic, extra = jobs[0]
        chunks = _ask(client, name, schema, topic, stream=True, **extra)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(len(jobs) + 1) as pool:
        text = pool.submit(streamed)
        answers = list(pool.map(lambda job: _ask(client, *job[0], job[1], **job[2]), jobs))
    for ((_, schema), topic, _), answer in zip(jobs, answers, strict=True):
        choice = answer.choices[0]
        assert choice.finish_reason == "stop", (topic, choice.message.content)
        _validator(schema).validate(json.loads(choice.message.content))
    assert text.result() == answers[0].choices[0].message.content


def test_json_object_answers_parse(client):
    answer = client.chat.completions.create(
        model=MODEL, max_tokens=MAX_TOKENS, temperature=0, response_format={"type": "json_object"},
        messages=[{"role": "user", "content": "Give the capital of France as JSON."}],
    )
    assert answer.choices[0].finish_reason == "stop", answer.choices[0].message.content
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


def test_completions_take_a_response_format_too(client):
    """As vLLM does: the legacy endpoint constrains its text the same way."""
    answer = client.completions.create(
        model=MODEL, prompt="A person as JSON:", max_tokens=MAX_TOKENS, temperature=0,
        extra_body={"response_format": {"type": "json_schema",
                                        "json_schema": {"name": "person", "schema": PERSON}}},
    )
    assert answer.choices[0].finish_reason == "stop", answer.choices[0].text
    _validator(PERSON).validate(json.loads(answer.choices[0].text))


class Capital(pydantic.BaseModel):
    country: str = pydantic.Field(max_length=30)
    capital: str = pydantic.Field(max_length=30)


def test_the_clients_own_structured_outputs_parse(client):
    """`client.chat.completions.parse` with a pydantic model: the client builds the strict
    json_schema and parses the answer into the model itself."""
    answer = client.chat.completions.parse(
        model=MODEL, max_tokens=MAX_TOKENS, temperature=0, response_format=Capital,
        messages=[{"role": "user", "content": "What is the capital of Italy?"}],
    )
    assert isinstance(answer.choices[0].message.parsed, Capital)


def test_a_short_max_tokens_may_cut_the_json(client):
    answer = _ask(client, "city", CITY, "Paris", temperature=0, max_tokens=3)
    assert answer.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    ("response_format", "names"),
    [
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}},
         "Invalid type: strin"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "integer", "minimum": 5, "maximum": 1}}}, "minimum (5) is greater than maximum (1)"),
        ({"type": "json_schema"}, "json_schema"),
        ({"type": "xml"}, "xml"),
    ],
)
def test_a_bad_response_format_is_a_400_naming_the_problem(client, response_format, names):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}],
            response_format=response_format,
        )
    assert names in caught.value.message
    assert caught.value.body["param"].startswith("response_format")
