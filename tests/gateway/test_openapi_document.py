"""/openapi.json says what the gateway does, and the gateway does what it says: the answers of
each route (400/404/503 in OpenAI's error shape, never FastAPI's 422), the limits of each field,
and the defects schemathesis found when it held the two against each other
(tests/gateway/test_openapi_fuzz.py runs it against the real engine)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from agent.gateway.admin import install_admin_api
from agent.gateway.errors import install_error_handlers
from planner.configuration import ConfigurationError
from tests.gateway.fake_engine import FakeEngine

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Hi"}]
ERROR = {"$ref": "#/components/schemas/ErrorResponse"}


@pytest.fixture
def document(client: TestClient) -> dict[str, Any]:
    return client.get("/openapi.json").json()


def test_every_route_declares_the_statuses_it_answers(document: dict[str, Any]) -> None:
    paths = document["paths"]
    assert not any("422" in op["responses"] for ops in paths.values() for op in ops.values())
    assert "HTTPValidationError" not in document["components"]["schemas"]
    for path in (COMPLETIONS, CHAT):
        responses = paths[path]["post"]["responses"]
        assert set(responses) == {"200", "400", "404", "503"}
        assert set(responses["200"]["content"]) == {"application/json", "text/event-stream"}
        for status in ("400", "404", "503"):
            assert responses[status]["content"]["application/json"]["schema"] == ERROR
    assert set(paths["/v1/models/{model_id}"]["get"]["responses"]) == {"200", "404"}
    assert set(paths["/health"]["get"]["responses"]) == {"200", "503"}
    assert set(paths["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}


def test_a_streamed_event_is_a_chunk_an_error_or_done(document: dict[str, Any]) -> None:
    stream = document["paths"][CHAT]["post"]["responses"]["200"]["content"]["text/event-stream"]
    data = stream["schema"]["properties"]["data"]["anyOf"]
    assert {"const": "[DONE]"} in data
    chunk = next(d for d in data if "contentSchema" in d)["contentSchema"]["anyOf"]
    assert {"$ref": "#/components/schemas/ChatCompletionChunk"} in chunk and ERROR in chunk
    assert "ChatCompletionChunk" in document["components"]["schemas"]


def test_request_schemas_state_the_limits_the_server_enforces(
    document: dict[str, Any], engine: FakeEngine
) -> None:
    schemas = document["components"]["schemas"]
    completion = schemas["CompletionRequest"]["properties"]
    text, texts, ids, nested = completion["prompt"]["anyOf"]
    assert text["minLength"] == 1 and texts["items"]["minLength"] == 1
    assert (texts["minItems"], texts["maxItems"], nested["maxItems"]) == (1, 64, 64)  # a batch
    assert ids["minItems"] == 1 and ids["maxItems"] == engine.max_context - 1
    assert ids["items"]["minimum"] == 0 and "maximum" not in ids["items"]  # no vocabulary here
    assert completion["max_tokens"]["anyOf"][0]["maximum"] == engine.max_context - 1
    assert completion["seed"]["anyOf"][0]["maximum"] == 2**63 - 1  # exactly, not as a float
    stop = completion["stop"]["anyOf"]
    assert stop[0]["minLength"] == 1 and stop[1]["maxItems"] == 4
    assert completion["n"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 16}
    assert completion["max_tokens"]["anyOf"][0]["minimum"] == 0  # with echo: the prompt alone
    assert completion["presence_penalty"]["anyOf"][0] == {"type": "number", "minimum": -2.0, "maximum": 2.0}
    bias = completion["logit_bias"]["anyOf"][0]
    assert bias["propertyNames"] == {"pattern": "^(0|[1-9][0-9]*)$"}  # no vocabulary here
    assert bias["additionalProperties"] == {"type": "number", "minimum": -100, "maximum": 100}
    assert completion["logprobs"]["anyOf"][0]["maximum"] == 20
    assert completion["echo"]["anyOf"][0] == {"type": "boolean"}
    (echo_alone,) = schemas["CompletionRequest"]["allOf"]
    assert echo_alone["if"]["properties"]["max_tokens"] == {"const": 0}
    assert echo_alone["then"]["properties"]["echo"] == {"const": True}
    assert completion["temperature"]["anyOf"][1] == {"type": "null"}  # null means "not set"
    assert schemas["CompletionRequest"]["then"]["properties"]["stream"] == {"const": True}
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["minItems"] == 1
    assert chat["max_completion_tokens"]["anyOf"][0]["maximum"] == engine.max_context - 1
    assert chat["tools"]["anyOf"][0]["maxItems"] == 0
    (needs_logprobs,) = schemas["ChatCompletionRequest"]["allOf"]
    assert needs_logprobs["then"]["properties"]["logprobs"] == {"const": True}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        # JSON Schema's integers include 3.0.
        (COMPLETIONS, {"prompt": "Hi", "max_tokens": 3.0, "n": 1.0}),
        (COMPLETIONS, {"prompt": [[5.0, 6]]}),
        (CHAT, {"messages": USER, "max_completion_tokens": 2.0}),
        (COMPLETIONS, {"prompt": "Hi", "seed": 2**63 - 1}),
        (COMPLETIONS, {"prompt": "Hi", "max_tokens": 3, "suffix": "", "best_of": 1}),
    ],
)
def test_what_the_schema_allows_is_accepted(client: TestClient, path: str, body: dict) -> None:
    assert client.post(path, json=body).status_code == 200


def _post_raw(client: TestClient, path: str, text: str):
    return client.post(path, content=text.encode(), headers={"content-type": "application/json"})


@pytest.mark.parametrize(
    ("path", "body", "param", "words"),
    [
        (COMPLETIONS, {"prompt": "Hi", "echo": 0}, "echo", ["boolean"]),
        (COMPLETIONS, {"prompt": "Hi", "best_of": "1"}, "best_of", ["integer"]),
        (CHAT, {"messages": USER, "top_logprobs": False}, "top_logprobs", ["integer"]),
        (COMPLETIONS, {"prompt": "Hi", "max_tokens": "3"}, "max_tokens", ["integer"]),
        (COMPLETIONS, {"prompt": "Hi", "seed": 2**63}, "seed", ["less than or equal"]),
        (COMPLETIONS, {"prompt": ["Hi"], "max_tokens": 64}, "max_tokens", ["at most 63"]),
        # max_completion_tokens wins, but a max_tokens beyond the context is still refused.
        (CHAT, {"messages": USER, "max_tokens": 64, "max_completion_tokens": 1}, "max_tokens",
         ["max_tokens is 64", "at most 63"]),
        (COMPLETIONS, {"prompt": [""]}, "prompt", ["prompt is empty"]),
    ],
)
def test_what_the_schema_refuses_is_refused(
    client: TestClient, path: str, body: dict, param: str, words: list[str]
) -> None:
    answer = client.post(path, json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param
    for word in words:
        assert word in error["message"], error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        (COMPLETIONS, '{"prompt": "a\\ud800b"}', "prompt"),
        (COMPLETIONS, '{"prompt": ["\\udc00"]}', "prompt"),
        (COMPLETIONS, '{"prompt": "Hi", "stop": ["\\ud800"]}', "stop"),
        (CHAT, '{"messages": [{"role": "user", "content": "\\ud800"}]}', "messages[0].content"),
        (CHAT, '{"messages": [{"role": "user", "content": [{"type": "text", "text": "\\ud800"}]}]}',
         "messages[0].content"),
    ],
)
def test_a_lone_surrogate_is_a_400_not_a_500(
    client: TestClient, engine: FakeEngine, path: str, body: str, param: str
) -> None:
    answer = _post_raw(client, path, body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and "lone surrogate" in error["message"]
    assert engine.calls == []


@pytest.mark.parametrize("sampling", [{"temperature": 1e-300}, {"top_p": 5e-324}])
def test_a_vanishing_temperature_or_top_p_samples_greedily(
    client: TestClient, engine: FakeEngine, sampling: dict[str, float]
) -> None:
    # float32 holds neither: the sampler would divide by zero, or drop every token.
    assert client.post(COMPLETIONS, json={"prompt": "Hi", **sampling}).status_code == 200
    assert engine.calls[-1][2].temperature == 0.0


class Refusing:
    """Stands in for an engine's reconfigurations: every target misfits the deployment."""

    def plan(self, target, *args, **kwargs):
        raise ConfigurationError("stages end at layer 30, but the model has 2 layers")

    def start(self, target, *args, **kwargs):
        return self.plan(target)

    def get(self, apply_id):
        return None

    def history(self):
        return []


def _admin_client(token: str | None = None) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)
    install_admin_api(app, Refusing(), token)
    return TestClient(app)


def test_405_lists_every_method_of_the_path(client: TestClient) -> None:
    answer = _admin_client().request("OPTIONS", "/admin/v1/applies")
    assert answer.status_code == 405
    assert {"GET", "POST"} <= {m.strip() for m in answer.headers["allow"].split(",")}
    assert client.get(COMPLETIONS).headers["allow"] == "POST"


def test_admin_targets_say_what_misfits(client: TestClient) -> None:
    admin = _admin_client()
    misfit = admin.post("/admin/v1/applies", json={"stages": " 0 : 30 "}).json()["error"]
    assert misfit["code"] == "invalid_configuration" and "2 layers" in misfit["message"]
    malformed = admin.post("/admin/v1/applies", json={"stages": "0-30"})
    assert malformed.status_code == 400
    assert "START:END" in malformed.json()["error"]["message"]
    strict = admin.post("/admin/v1/applies", json={"target": {"pipelines": [{"stages": [
        {"start": "0", "end": 30}]}]}})
    assert strict.status_code == 400 and "integer" in strict.json()["error"]["message"]
    document = admin.get("/openapi.json").json()
    apply = document["components"]["schemas"]["ApplyBody"]
    assert apply["properties"]["stages"]["anyOf"][0]["pattern"].startswith("^")
    assert len(apply["oneOf"]) == 2  # exactly one of target and stages


def test_a_non_ascii_admin_token_is_a_401_not_a_500() -> None:
    admin = _admin_client(token="s3cret")
    answer = admin.get("/admin/v1/applies", headers={"Authorization": "Bearer \xe9".encode("latin-1")})
    assert answer.status_code == 401
    document = admin.get("/openapi.json").json()
    assert document["paths"]["/admin/v1/applies"]["get"]["security"] == [{"HTTPBearer": []}]
    assert "401" in document["paths"]["/admin/v1/applies"]["get"]["responses"]


def test_a_prompt_the_tokenizer_drops_entirely_is_a_400_that_says_why(
    client: TestClient, engine: FakeEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SmolLM2's tokenizer has no token for a few control characters, so "\x04" encodes to [].
    monkeypatch.setattr(engine, "encode_prompt", lambda text: [])
    answer = client.post(COMPLETIONS, json={"prompt": "\x04"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "empty_prompt" and "has no tokens" in error["message"]
    assert engine.calls == []
