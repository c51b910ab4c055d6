"""A HF directory whose generation_config.json lists an end-of-generation id that its
tokenizer_config.json's eos_token is not (as Llama 3 Instruct's <|eot_id|>): the engine stops
there, as transformers' generate does; it used to run on to max_tokens."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch

from agent.engine import EngineConfig, PipelineEngine
from agent.engine_api import SamplingParams
from tests.tiny_llama import save_tokenizer, tiny_llama_config

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
PROMPT = "The capital of France is"
STOP_ID = 2  # <|im_end|>


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gguf_path):
    """A tiny random Llama whose greedy answer reaches STOP_ID at its fourth token."""
    directory = tmp_path_factory.mktemp("tiny-llama-eos")
    torch.manual_seed(0)
    config = tiny_llama_config()
    model = transformers.LlamaForCausalLM(config).eval()
    save_tokenizer(directory, gguf_path, template=None)
    prompt = transformers.AutoTokenizer.from_pretrained(str(directory))(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        fourth = model.generate(prompt, max_new_tokens=4, do_sample=False, eos_token_id=None)[0, -1]
        model.lm_head.weight[STOP_ID] = model.lm_head.weight[fourth] * 1.05
    model.generation_config.eos_token_id = [0, STOP_ID]
    model.save_pretrained(directory)
    tokenizer_config = json.loads((directory / "tokenizer_config.json").read_text())
    tokenizer_config["eos_token"] = "<|endoftext|>"  # id 0: not the id the answer ends with
    (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    with torch.no_grad():
        expected = transformers.AutoModelForCausalLM.from_pretrained(str(directory)).generate(
            prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1]:].tolist()
    assert expected[-1] == STOP_ID and len(expected) == 4
    return directory, expected


def test_the_engine_stops_where_transformers_does(model_dir):
    directory, expected = model_dir
    engine = PipelineEngine(EngineConfig(model=str(directory), n_devices=1, kv_cache_bytes=8 << 20)).start()
    try:
        prompt = engine.encode_prompt(PROMPT)

        async def greedy() -> tuple[list[int], str | None]:
            tokens, finish = [], None
            async for ev in engine.generate("tiny", prompt, SamplingParams(max_tokens=12, temperature=0)):
                tokens += ev.token_ids
                finish = ev.finish_reason or finish
            return tokens, finish

        tokens, finish = asyncio.run(greedy())
    finally:
        engine.stop()
    assert (tokens, finish) == (expected, "stop")
