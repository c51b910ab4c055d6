"""`--model DIR`: a Hugging Face safetensors directory (weights, tokenizer.json, config) served by
the real engine on 2 worker processes, greedy tokens equal to transformers' on the same model."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from agent.engine import EngineConfig, PipelineEngine
from agent.engine_api import SamplingParams
from agent.loaders.gguf_file import GGUFFile
from agent.tokenizer import Tokenizer

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gguf_path):
    """A small random Llama with SmolLM2's tokenizer, saved the way transformers saves models."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        num_hidden_layers=4, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=49152, max_position_embeddings=512,
        tie_word_embeddings=False, initializer_range=0.2,  # peaked logits: no near-ties
    )
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory, safe_serialization=True)
    Tokenizer.from_gguf(gguf_path).backend.save(str(directory / "tokenizer.json"))
    template = GGUFFile(gguf_path).metadata["tokenizer.chat_template"]
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "bos_token": "<|im_start|>", "chat_template": template})
    )
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
