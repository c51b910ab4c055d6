"""A Qwen2 GGUF (architecture "qwen2", pre-tokenizer "qwen2") served by the real engine on worker
processes: the prompt's ids are transformers' Qwen2Tokenizer's on the file's vocabulary, and
greedy tokens equal transformers', before and after a live apply moves a layer (and its biases)
between workers.

No downloads: a tiny random Qwen2 (random biases), written as llama.cpp's converter writes
Qwen2, with SmolLM2's vocabulary and merges (from the packaged GGUF) under Qwen2's pre-tokenizer.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from agent.engine import EngineConfig, PipelineEngine
from agent.engine_api import SamplingParams
from agent.tokenizer import read_tokenizer_metadata
from planner.configuration import Configuration
from tests.agent.gguf_writing import write_qwen2_gguf
from tests.tiny_llama import TINY_LLAMA, randomize_biases

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
NEW_TOKENS = 8
PROMPT = "The capital of France is 1234 km away, isn't it?"


@pytest.fixture(scope="module")
def qwen2_gguf(tmp_path_factory, gguf_path):
    """(path, transformers' model, SmolLM2's tokenizer keys)."""
    meta = read_tokenizer_metadata(gguf_path)
    torch.manual_seed(0)
    shape = TINY_LLAMA | {"num_hidden_layers": 4, "vocab_size": len(meta["tokenizer.ggml.tokens"])}
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, rope_theta=1e6)).float().eval()
    randomize_biases(model)

    def add_tokenizer(writer) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(list(meta["tokenizer.ggml.tokens"]))
        writer.add_token_types(list(meta["tokenizer.ggml.token_type"]))
        writer.add_token_merges(list(meta["tokenizer.ggml.merges"]))
        writer.add_eos_token_id(int(meta["tokenizer.ggml.eos_token_id"]))
        writer.add_add_bos_token(False)

    path = write_qwen2_gguf(tmp_path_factory.mktemp("qwen2-gguf") / "tiny-qwen2.gguf", model, add_tokenizer)
    return path, model, meta


def _generate(engine: PipelineEngine, prompt: list[int]) -> list[int]:
    async def run() -> list[int]:
        tokens = []
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        async for ev in engine.generate("q", prompt, params):
            tokens += ev.token_ids
        return tokens

    return asyncio.run(run())


def test_a_qwen2_gguf_serves_transformers_tokens_before_and_after_a_layer_moves(qwen2_gguf):
    path, hf_model, meta = qwen2_gguf
    engine = PipelineEngine(EngineConfig(model=path, n_devices=2, kv_cache_bytes=8 << 20)).start()
    try:
        assert engine.arch.family == "qwen2" and engine.arch.qkv_bias and not engine.arch.o_bias
        prompt = engine.encode_prompt(PROMPT)
        before = _generate(engine, prompt)
        target = Configuration.from_stages_text("0:1,1:4", ["worker-0", "worker-1"])
        record = engine.reconfig.start(target, max_overhead=1.0)
        assert record.done.wait(120), "the apply did not finish"
        assert record.outcome == "applied", record.error
        after = _generate(engine, prompt)
    finally:
        engine.stop()
    tokens = list(meta["tokenizer.ggml.tokens"])
    reference = transformers.Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(tokens)},
        merges=[tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]],
    )
    assert prompt == reference.encode(PROMPT)
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert before == out[0, len(prompt):].tolist()
    assert after == before
