"""A Mistral safetensors directory with a sliding window shorter than the prompts, served by the
real engine on 2 worker processes over its whole context: two requests of different lengths,
generated together, each reaching several windows past its start, give transformers' greedy
tokens. A Qwen2 whose sliding and full layers alternate gives them too after live applies move
a sliding layer to the stage of full ones and back (each stage builds the window's masks for
the layers it holds then)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from agent.engine import EngineConfig, PipelineEngine
from agent.engine_api import SamplingParams
from planner.configuration import Configuration
from tests.tiny_llama import TINY_LLAMA, save_tokenizer

pytestmark = pytest.mark.slow
transformers = pytest.importorskip("transformers")
WINDOW = 8
NEW_TOKENS = 16
PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived an old"]


def saved(directory, gguf_path, model_class, config, seed: int):
    """Saves a tiny random `model_class` of `config` with SmolLM2's tokenizer, the way
    transformers saves models; returns (directory, the model)."""
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    model.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(directory, gguf_path, None)
    return directory, model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, gguf_path):
    """A tiny random Mistral with its window in every layer."""
    config = transformers.MistralConfig(**(TINY_LLAMA | {"num_hidden_layers": 4}), sliding_window=WINDOW)
    return saved(tmp_path_factory.mktemp("tiny-mistral"), gguf_path, transformers.MistralForCausalLM, config, 0)


def test_mistral_with_a_window_serves_transformers_tokens_past_it(model_dir):
    directory, hf_model = model_dir
    engine = PipelineEngine(EngineConfig(model=str(directory), n_devices=2, kv_cache_bytes=8 << 20)).start()
    try:
        assert engine.arch.sliding_window == WINDOW
        assert engine.max_context == TINY_LLAMA["max_position_embeddings"]
        prompts = [engine.encode_prompt(text) for text in PROMPTS]
        ours = _greedy(engine, "r", prompts)
    finally:
        engine.stop()
    assert len(prompts[1]) > WINDOW  # one prefill already past the window
    assert ours == [hf_greedy(hf_model, prompt) for prompt in prompts]
    # Full attention would have chosen otherwise: the window is what the tokens agree on.
    hf_model.config.sliding_window = None
    try:
        assert ours != [hf_greedy(hf_model, prompt) for prompt in prompts]
    finally:
        hf_model.config.sliding_window = WINDOW


def hf_greedy(hf_model, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def alternating_qwen2(tmp_path_factory, gguf_path):
    """A tiny random Qwen2 whose layers 1 and 3 slide."""
    config = transformers.Qwen2Config(
        **(TINY_LLAMA | {"num_hidden_layers": 4}), use_sliding_window=True, sliding_window=WINDOW,
        layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"])
    return saved(tmp_path_factory.mktemp("tiny-qwen2-window"), gguf_path, transformers.Qwen2ForCausalLM, config, 1)


def test_sliding_layers_moved_live_keep_their_window(alternating_qwen2):
    directory, hf_model = alternating_qwen2
    engine = PipelineEngine(EngineConfig(model=str(directory), n_devices=2, stages=[(0, 1), (1, 4)],
                                         kv_cache_bytes=8 << 20)).start()
    try:
        assert engine.arch.sliding_layers == (1, 3)
        prompt = engine.encode_prompt(PROMPTS[1])
        (before,) = _greedy(engine, "before", [prompt])
        for stages in ("0:2,2:4", "0:1,1:4"):  # sliding layer 1 joins full layer 0's stage, and back
            target = Configuration.from_stages_text(stages, ["worker-0", "worker-1"])
            record = engine.reconfig.start(target, max_overhead=1.0)
            assert record.done.wait(120) and record.outcome == "applied", record.error
            assert _greedy(engine, f"after {stages}", [prompt]) == [before]
    finally:
        engine.stop()
    assert before == hf_greedy(hf_model, prompt)


def _greedy(engine: PipelineEngine, name: str, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt's NEW_TOKENS greedy tokens, the prompts generated together."""
    async def one(i: int, prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
        async for ev in engine.generate(f"{name}-{i}", prompt, params):
            tokens += ev.token_ids
        return tokens

    async def together() -> list[list[int]]:
        return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))

    return asyncio.run(together())
