"""Llama 3.1's RoPE scaling in a GGUF: llama.cpp's converter stores it as `rope_freqs.weight`,
one factor per RoPE frequency that the frequency is divided by. A tiny random Llama with
transformers' `llama3` rope scaling, written to GGUF with the factors transformers' own llama3
init implies, must give transformers' logits through our stages (1, 2 and 3 of them)."""

from __future__ import annotations

import pytest
import torch

from agent.loaders import resolve_model
from tests.agent.gguf_writing import write_llama_gguf
from tests.agent.stage_runner import InProcessPipeline
from tests.agent.test_safetensors_loader import LLAMA3_SCALING
from tests.tiny_llama import tiny_llama_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

N_LAYERS, N_TOKENS, TOLERANCE = 4, 20, 1e-4
SPLITS = [[(0, 4)], [(0, 2), (2, 4)], [(0, 1), (1, 3), (3, 4)]]
# LLAMA3_SCALING's original_max_position_embeddings 32 puts the 8 frequencies of head_dim 16 in all three
# llama3 regimes: kept (wavelength < 8), smoothed (8..32) and divided by `factor` (> 32).


def token_ids() -> torch.Tensor:
    return torch.randint(0, 256, (N_TOKENS,), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def hf_model():
    torch.manual_seed(0)
    config = tiny_llama_config(
        num_hidden_layers=N_LAYERS, vocab_size=256, max_position_embeddings=128, rope_scaling=LLAMA3_SCALING
    )
    return transformers.LlamaForCausalLM(config).float().eval()


@pytest.fixture(scope="module")
def reference_logits(hf_model) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(token_ids().unsqueeze(0)).logits[0].float()


def llama3_factors(config) -> torch.Tensor:
    """The per-frequency divisors transformers' llama3 RoPE init implies: default / llama3."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, attention_factor = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    assert attention_factor == 1.0
    head_dim = config.hidden_size // config.num_attention_heads
    theta = config.rope_parameters["rope_theta"]
    default = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    return default / scaled


@pytest.fixture(scope="module")
def gguf_path(tmp_path_factory, hf_model) -> str:
    path = tmp_path_factory.mktemp("llama31") / "tiny-llama31.gguf"
    return write_llama_gguf(path, hf_model, rope_freqs=llama3_factors(hf_model.config))


def our_logits(path: str, splits: list[tuple[int, int]]) -> torch.Tensor:
    pipe = InProcessPipeline(resolve_model(path), splits, block_size=4)
    return pipe.step(["r"], [0], [N_TOKENS], token_ids(), all_rows=True)


def test_the_factors_cover_all_three_llama3_regimes(hf_model):
    factors = llama3_factors(hf_model.config)
    assert factors[0] == 1.0 and torch.allclose(factors[2:], torch.tensor(8.0))
    assert 1.0 < factors[1] < 8.0


def test_resolve_model_reads_the_rope_factors(gguf_path, hf_model):
    arch = resolve_model(gguf_path).arch
    assert arch.rope_scaling is None
    assert arch.rope_freq_factors == tuple(llama3_factors(hf_model.config).tolist())


@pytest.mark.parametrize("splits", SPLITS, ids=["1-stage", "2-stage", "3-stage"])
def test_logits_match_transformers_llama3_rope(gguf_path, reference_logits, splits):
    diff = (our_logits(gguf_path, splits) - reference_logits).abs().max().item()
    assert diff <= TOLERANCE


def test_without_the_factors_the_logits_differ(tmp_path, hf_model, reference_logits):
    """Guards the test above: the same weights with plain RoPE are far off on this input."""
    plain = write_llama_gguf(tmp_path / "plain.gguf", hf_model)
    assert (our_logits(plain, [(0, 4)]) - reference_logits).abs().max().item() > 100 * TOLERANCE
