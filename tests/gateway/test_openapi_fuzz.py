"""Schemathesis fuzzes the gateway from its own OpenAPI document (/openapi.json) with all of its
checks, against the real engine: a tiny random Llama served over HTTP by a real server.

Every answer must be one the document declares, in the declared shape; schema-valid requests
must be accepted and schema-invalid ones refused; nothing may answer 5xx. A schema-valid request
may be refused only for what JSON Schema cannot state, and only truthfully: a prompt and its
max_tokens that do not fit the context together (400 `context_length_exceeded`), a prompt of
characters the tokenizer has no token for (400 `empty_prompt`), both checked against the
tokenizer, and an admin target that misfits the deployment's layers or devices (400
`invalid_configuration`), a device to add whose name is outside the server's worker-N scheme
or whose kind is not the server's (400 `invalid_device`, checked against both), and a
response_format JSON schema the grammar library cannot enforce (400 `invalid_json_schema`,
checked against the library).

The admin routes are fuzzed too, with a token: on one device every valid target is the
configuration already serving, so an apply changes nothing and the run stays reproducible.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from typing import Any

import pytest
import torch

from agent.constrained import InvalidSchema, json_schema_grammar
from agent.engine import EngineConfig, PipelineEngine
from agent.gateway.app import create_app
from agent.gateway.server import ServerThread
from agent.loaders.gguf_file import GGUFFile
from tests.tiny_llama import save_tokenizer, tiny_llama_config

pytestmark = pytest.mark.slow
schemathesis = pytest.importorskip("schemathesis")
transformers = pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis.pytest.lazy import get_all_tests  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

TOKEN = "fuzz-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CONTEXT = 64  # small, so that chat requests without max_tokens end quickly


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gguf_path):
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template, as transformers saves it."""
    directory = tmp_path_factory.mktemp("fuzz-llama")
    torch.manual_seed(0)
    config = tiny_llama_config(max_position_embeddings=CONTEXT, initializer_range=0.02)
    model = transformers.LlamaForCausalLM(config)
    end_answers_early(model, eos_token_id=2)
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, gguf_path, GGUFFile(gguf_path).metadata["tokenizer.chat_template"])
    return directory


def end_answers_early(model, eos_token_id: int) -> None:
    """Makes <|im_end|> the most likely next token at temperature 1 and below, so that answers
    end after a token or two unless the request sets ignore_eos (the fuzz runs on 2 CPU cores).

    Hidden dimension 0 holds a constant: every embedding sets it and no layer writes it; after
    the final norm it dominates, and only the end-of-sequence row of the head reads it.
    """
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0] = 0.0
            layer.mlp.down_proj.weight[0] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[eos_token_id, 0] = 1.6  # a logit of about 13 against about 0


@pytest.fixture(scope="module")
def served(model_dir):
    engine = PipelineEngine(EngineConfig(model=str(model_dir), n_devices=1, kv_cache_bytes=8 << 20)).start()
    try:
        with ServerThread(create_app(engine, admin_token=TOKEN)) as server:
            yield engine, server
    finally:
        engine.stop()


# A derandomized run of a few examples per operation (plus schemathesis' coverage cases, about
# 300 requests for each generation route); PIPESHIFT_FUZZ_EXAMPLES=300 searches longer, at random.
EXAMPLES = int(os.environ.get("PIPESHIFT_FUZZ_EXAMPLES", "0"))
SETTINGS = hypothesis.settings(
    max_examples=EXAMPLES or 15, derandomize=not EXAMPLES, deadline=None, database=None,
    suppress_health_check=list(hypothesis.HealthCheck),
)


def test_the_gateway_answers_as_its_openapi_document_says(served):
    """Each operation through schemathesis' phases (examples, coverage, fuzzing) with all its
    checks, as its pytest plugin would run them (the plugin itself does not run on pytest 9)."""
    engine, server = served
    config = schemathesis.Config.from_dict({"output": {"sanitization": {"enabled": False}}})
    schema = schemathesis.openapi.from_url(f"{server.base_url}/openapi.json", config=config)

    def positive_data_acceptance_within_limits(ctx, response, case):
        """positive_data_acceptance, but for the refusals JSON Schema cannot state."""
        if response.status_code == 400 and case.meta.generation.mode.is_positive:
            code = response.json()["error"]["code"]
            if code in ("context_length_exceeded", "empty_prompt"):
                prompt_tokens, limit = _prompt_tokens(engine, case)
                if code == "empty_prompt":
                    assert prompt_tokens == 0, response.text
                else:
                    assert prompt_tokens + (limit or 1) > engine.max_context, response.text
                return None
            if code == "invalid_configuration" and case.operation.path.startswith("/admin/"):
                return None
            if code == "invalid_device" and case.operation.path == "/admin/v1/devices":
                body = case.body if isinstance(case.body, dict) else {}
                named = re.fullmatch(r"worker-[0-9]+", body.get("device") or "worker-0")
                assert body.get("kind") not in (None, "cpu") or not named, response.text
                return None
            if code == "invalid_json_schema":  # a JSON Schema the grammar library refuses
                with pytest.raises(InvalidSchema):
                    json_schema_grammar(case.body["response_format"]["json_schema"]["schema"])
                return None
        return positive_data_acceptance(ctx, response, case)

    def check(case):
        case.call_and_validate(
            headers=AUTH, excluded_checks=[positive_data_acceptance],
            additional_checks=[positive_data_acceptance_within_limits],
        )

    failures, fuzzed = [], []
    for result in get_all_tests(schema=schema, test_func=check, settings=SETTINGS, given_kwargs=None):
        operation, test = result.ok()
        fuzzed.append(operation.label)
        try:
            test()
        except (Exception, BaseExceptionGroup) as exc:  # every operation runs; all failures show
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert {"POST /v1/completions", "POST /v1/chat/completions", "POST /admin/v1/applies"} <= set(fuzzed)


def _prompt_tokens(engine: PipelineEngine, case: Any) -> tuple[int, int | None]:
    """Returns the prompt length in tokens of a generation `case`, and its max_tokens."""
    body = {k: v for k, v in case.body.items() if v is not None}
    if "messages" in body:
        messages = [
            {"role": "system" if m["role"] == "developer" else m["role"],
             "content": m["content"] if isinstance(m["content"], str)
             else "".join(p["text"] for p in m["content"])}
            for m in body["messages"]
        ]
        prompt_tokens = len(engine.encode_chat(messages))
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
    else:  # a batch is checked by its longest prompt, and refused for any empty one
        prompt = body["prompt"]
        prompts = [prompt] if isinstance(prompt, str) or isinstance(prompt[0], int) else prompt
        lengths = [len(engine.encode_prompt(p) if isinstance(p, str) else p) for p in prompts]
        prompt_tokens = 0 if 0 in lengths else max(lengths)
        limit = body.get("max_tokens")
    return prompt_tokens, limit


def test_the_document_declares_what_the_gateway_answers(served):
    """The parts of the document the fuzz relies on, read as a client would."""
    engine, server = served
    with urllib.request.urlopen(f"{server.base_url}/openapi.json") as answer:
        document = json.loads(answer.read())
    completions = document["paths"]["/v1/completions"]["post"]
    assert set(completions["responses"]) == {"200", "400", "404", "503"}
    assert set(completions["responses"]["200"]["content"]) == {"application/json", "text/event-stream"}
    request = document["components"]["schemas"]["CompletionRequest"]["properties"]
    assert {"type": "string", "minLength": 1} in request["prompt"]["anyOf"]
    assert request["max_tokens"]["anyOf"][0]["maximum"] == engine.max_context - 1
    assert not any("422" in op["responses"] for path in document["paths"].values() for op in path.values())
    admin = document["paths"]["/admin/v1/deployment"]["get"]
    assert "401" in admin["responses"] and admin["security"] == [{"HTTPBearer": []}]
