"""A Qwen2 safetensors directory (biases on Q, K and V) served by the real engine on worker
processes: greedy tokens equal transformers', and after live applies that move layers and the
head between workers (their biases sent by the peer that held them) every token's logprobs
equal those before the move."""

from __future__ import annotations

import asyncio

import pytest
import torch

from agent.engine import EngineConfig, PipelineEngine
from agent.engine_api import SamplingParams
from planner.configuration import Configuration
from tests.tiny_llama import TINY_LLAMA, randomize_biases, save_tokenizer

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
NEW_TOKENS = 8
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gguf_path):
    """A tiny random Qwen2 (random biases: transformers starts them at zero) with SmolLM2's
    tokenizer, saved the way transformers saves models."""
    directory = tmp_path_factory.mktemp("tiny-qwen2")
    torch.manual_seed(0)
    shape = {k: v for k, v in TINY_LLAMA.items()} | {"num_hidden_layers": 4}
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**shape, rope_theta=1e6)).float().eval()
    randomize_biases(model)
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, gguf_path, None)
    return directory, model


def _generate(engine: PipelineEngine, prompt: list[int]) -> tuple[list[int], list]:
    async def run() -> tuple[list[int], list]:
        tokens, logprobs = [], []
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=5)
        async for ev in engine.generate("q", prompt, params):
            tokens += ev.token_ids
            logprobs += ev.logprobs or []
        return tokens, logprobs

    return asyncio.run(run())


def _apply(engine: PipelineEngine, stages: str) -> dict:
    target = Configuration.from_stages_text(stages, ["worker-0", "worker-1"])
    record = engine.reconfig.start(target, max_overhead=1.0)
    assert record.done.wait(120), "the apply did not finish"
    assert record.outcome == "applied", record.error
    return record.phases["prefetch"].detail


def test_qwen2_serves_transformers_tokens_before_and_after_layers_move(model_dir):
    directory, hf_model = model_dir
    engine = PipelineEngine(EngineConfig(model=str(directory), n_devices=2, kv_cache_bytes=8 << 20)).start()
    try:
        assert engine.arch.qkv_bias and not engine.arch.o_bias
        prompt = engine.encode_prompt(PROMPT)
        before = _generate(engine, prompt)
        moves = [_apply(engine, "0:1,1:4"), _apply(engine, "0:3,3:4")]  # layer 1 one way, 1-2 back
        assert [(s.start, s.end) for s in engine.stages] == [(0, 3), (3, 4)]
        after = _generate(engine, prompt)
    finally:
        engine.stop()
    loads = [load for detail in moves for load in detail.get("loads", [])]
    assert any(load["part"] == "layers" and load["source"] != "disk" for load in loads), loads
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    assert before[0] == out[0, len(prompt):].tolist()
    assert after[0] == before[0]
    for moved, unmoved in zip(after[1], before[1], strict=True):
        assert moved.logprob == pytest.approx(unmoved.logprob, abs=1e-4)
        assert [t[0] for t in moved.top] == [t[0] for t in unmoved.top]
        assert [t[2] for t in moved.top] == pytest.approx([t[2] for t in unmoved.top], abs=1e-4)
