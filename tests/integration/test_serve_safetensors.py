"""`--model DIR`: a Hugging Face safetensors directory (weights, tokenizer.json, config) served by
the real engine on 2 worker processes, greedy tokens equal to transformers' on the same model.
The directory is saved by transformers itself, so its chat template sits in chat_template.jinja;
a model saved without one answers chat requests with a 400 that points to /v1/completions."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from agent.engine import EngineConfig, PipelineEngine
from agent.engine_api import SamplingParams
from agent.loaders.gguf_file import GGUFFile
from agent.tokenizer import Tokenizer
from tests.tiny_llama import save_tokenizer, tiny_llama_config

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gguf_path):
    """A small random Llama with SmolLM2's tokenizer, saved the way transformers saves models."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = tiny_llama_config(num_hidden_layers=4)
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    template = GGUFFile(gguf_path).metadata["tokenizer.chat_template"]
    save_tokenizer(directory, gguf_path, template)
    assert (directory / "chat_template.jinja").exists()
    assert "chat_template" not in json.loads((directory / "tokenizer_config.json").read_text())
    return directory, model


def test_safetensors_directory_serves_transformers_greedy_tokens(model_dir):
    directory, hf_model = model_dir
    engine = PipelineEngine(EngineConfig(model=str(directory), n_devices=2, kv_cache_bytes=8 << 20)).start()
    try:
        assert [(s.start, s.end) for s in engine.stages] == [(0, 2), (2, 4)]
        assert engine.tokenizer.eos_token_id == 2
        prompt = engine.encode_prompt("The capital of France is")
        assert prompt == Tokenizer.from_hf_dir(directory).encode("The capital of France is")
        assert engine.encode_chat([{"role": "user", "content": "hi"}])[:1] == [1]  # <|im_start|>

        async def greedy() -> list[int]:
            tokens: list[int] = []
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
            async for ev in engine.generate("tiny", prompt, params):
                tokens += ev.token_ids
            return tokens

        ours = asyncio.run(greedy())
    finally:
        engine.stop()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert ours == out[0, len(prompt):].tolist()


def _post(base_url: str, path: str, body: dict) -> tuple[int, dict]:
    import urllib.error
    import urllib.request

    request = urllib.request.Request(f"{base_url}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("with_template", [True, False])
def test_chat_through_the_gateway_uses_the_jinja_template_or_answers_400(model_dir, tmp_path, gguf_path, with_template):
    from agent.gateway.app import create_app
    from agent.gateway.server import ServerThread

    directory, _ = model_dir
    if not with_template:  # the same model, its tokenizer saved without a chat template
        for f in directory.iterdir():
            if f.name != "chat_template.jinja":
                (tmp_path / f.name).write_bytes(f.read_bytes())
        save_tokenizer(tmp_path, gguf_path, None)
        directory = tmp_path
    engine = PipelineEngine(EngineConfig(model=str(directory), n_devices=2, kv_cache_bytes=8 << 20)).start()
    try:
        with ServerThread(create_app(engine)) as server:
            chat = {"model": engine.model_name, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
            status, body = _post(server.base_url, "/v1/chat/completions", chat)
            if with_template:
                assert status == 200 and body["usage"]["prompt_tokens"] == len(engine.encode_chat(chat["messages"]))
            else:
                assert status == 400, body
                assert "no chat template" in body["error"]["message"]
                assert "/v1/completions" in body["error"]["message"] and body["error"]["param"] == "messages"
            status, body = _post(server.base_url, "/v1/completions",
                                 {"model": engine.model_name, "max_tokens": 4, "prompt": "hi"})
            assert status == 200  # a plain prompt works either way
    finally:
        engine.stop()
