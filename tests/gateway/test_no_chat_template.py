"""A model without a chat template answers chat requests with a 400 pointing to /v1/completions.

The engines here hold a real `Tokenizer` loaded from a model directory that has no template, and
turn chat messages into ids as the pipeline engine does: one hands `Tokenizer.encode_chat` on as
it is, the other runs the pipeline engine's own `encode_chat` (no worker processes needed).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from agent.engine import PipelineEngine
from agent.gateway import create_app
from agent.tokenizer import Tokenizer
from tests.gateway.fake_engine import FakeEngine

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi there"}]


def templateless_tokenizer(directory: Path) -> Tokenizer:
    """Returns the tokenizer of a model directory whose tokenizer_config.json and files have no
    chat template (a tiny word-level vocabulary, so no model file is needed)."""
    vocab = {"<unk>": 0, "</s>": 1, "hi": 2, "there": 3}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(directory / "tokenizer.json"))
    config = {"eos_token": "</s>", "unk_token": "<unk>", "chat_template": None}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return Tokenizer.from_hf_dir(directory)


@dataclass
class TokenizerEngine(FakeEngine):
    """The fake engine, but prompts go through a real tokenizer, as in the pipeline engine."""

    tokenizer: Tokenizer | None = None

    def encode_prompt(self, prompt: str) -> list[int]:
        assert self.tokenizer is not None
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        assert self.tokenizer is not None
        return self.tokenizer.encode_chat(messages)


@dataclass
class PipelineEncodingEngine(TokenizerEngine):
    """Chat messages become ids through `PipelineEngine.encode_chat` itself."""

    encode_chat = PipelineEngine.encode_chat  # uses only .tokenizer and .model_name


@pytest.fixture(params=[TokenizerEngine, PipelineEncodingEngine])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> TokenizerEngine:
    return request.param(tokenizer=templateless_tokenizer(tmp_path))


@pytest.fixture
def client(engine: TokenizerEngine) -> TestClient:
    return TestClient(create_app(engine), raise_server_exceptions=False)


@pytest.mark.parametrize("stream", [False, True])
def test_chat_without_a_template_is_a_400_pointing_to_completions(
    client: TestClient, engine: TokenizerEngine, stream: bool
) -> None:
    r = client.post(CHAT, json={"messages": USER, "stream": stream})
    assert r.status_code == 400, r.text
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages"
    assert "no chat template" in error["message"]
    assert "/v1/completions" in error["message"]
    assert engine.calls == []  # refused before any engine work
    assert 'pipeshift_error_responses_total{status="400"} 1.0' in client.get("/metrics").text
    # What the message advises works: the same text as a plain prompt.
    r = client.post("/v1/completions", json={"prompt": "hi there", "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert engine.calls[0][1] == [2, 3]
