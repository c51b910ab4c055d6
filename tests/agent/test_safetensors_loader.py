"""Safetensors loading: a tiny random Llama saved by transformers, run through our stages.

No downloads: each case builds a random `LlamaForCausalLM`, saves it with `save_pretrained`,
and compares our stage-split model's logits with transformers' on the same input (fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from agent.loaders import load_stage_weights, resolve_model
from tests.agent.stage_runner import InProcessPipeline

transformers = pytest.importorskip("transformers")

N_LAYERS = 4
N_TOKENS = 20
TOLERANCE = 1e-4
SPLITS = [[(0, 4)], [(0, 1), (1, 3), (3, 4)]]
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


@dataclass
class TinyModel:
    directory: str
    hf_model: object
    reference_logits: torch.Tensor  # [N_TOKENS, vocab]


def tiny_config(tie: bool, rope_scaling: dict | None) -> object:
    return transformers.LlamaConfig(
        num_hidden_layers=N_LAYERS,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=tie,
        rope_scaling=rope_scaling,
        # Larger than the default 0.02, so that attention scores (and with them RoPE) move
        # the logits by far more than TOLERANCE.
        initializer_range=0.2,
    )


def token_ids() -> torch.Tensor:
    return torch.randint(0, 256, (N_TOKENS,), generator=torch.Generator().manual_seed(7))


def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.unsqueeze(0)).logits[0].float()


def build(directory, tie: bool, rope_scaling: dict | None) -> TinyModel:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_config(tie, rope_scaling)).float().eval()
    model.save_pretrained(str(directory), safe_serialization=True)
    return TinyModel(str(directory), model, hf_logits(model, token_ids()))


@pytest.fixture(scope="module")
def untied(tmp_path_factory) -> TinyModel:
    return build(tmp_path_factory.mktemp("untied"), tie=False, rope_scaling=None)


@pytest.fixture(scope="module")
def tied(tmp_path_factory) -> TinyModel:
    return build(tmp_path_factory.mktemp("tied"), tie=True, rope_scaling=None)


@pytest.fixture(scope="module")
def llama3_rope(tmp_path_factory) -> TinyModel:
    return build(tmp_path_factory.mktemp("llama3"), tie=False, rope_scaling=LLAMA3_SCALING)


def our_logits(directory: str, splits: list[tuple[int, int]]) -> torch.Tensor:
    pipe = InProcessPipeline(resolve_model(directory), splits, block_size=4)
    return pipe.step(["r"], [0], [N_TOKENS], token_ids(), all_rows=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


# ---- architecture from config.json ----------------------------------------------------------
def test_resolve_model_reads_the_architecture(untied, tied):
    source = resolve_model(untied.directory)
    assert source.format == "safetensors"
    arch = source.arch
    assert (arch.n_layers, arch.hidden_size, arch.ffn_size) == (4, 64, 128)
    assert (arch.n_heads, arch.n_kv_heads, arch.head_dim, arch.vocab_size) == (4, 2, 16, 256)
    assert arch.max_context == 128
    assert arch.rms_norm_eps == untied.hf_model.config.rms_norm_eps
    assert arch.rope_scaling is None
    assert not arch.tie_embeddings
    assert resolve_model(tied.directory).arch.tie_embeddings


def test_resolve_model_reads_llama3_rope_scaling(llama3_rope):
    scaling = resolve_model(llama3_rope.directory).arch.rope_scaling
    assert scaling is not None
    assert scaling.factor == 8.0
    assert (scaling.low_freq_factor, scaling.high_freq_factor) == (1.0, 4.0)
    assert scaling.original_max_position_embeddings == 32


# ---- parity with transformers ---------------------------------------------------------------
@pytest.mark.parametrize("splits", SPLITS, ids=["1-stage", "3-stage"])
@pytest.mark.parametrize("case", ["untied", "tied"])
def test_logits_match_transformers(request, case, splits):
    model: TinyModel = request.getfixturevalue(case)
    assert max_diff(our_logits(model.directory, splits), model.reference_logits) <= TOLERANCE


@pytest.mark.parametrize("splits", SPLITS, ids=["1-stage", "3-stage"])
def test_logits_match_transformers_with_llama3_rope_scaling(llama3_rope, splits):
    assert (
        max_diff(our_logits(llama3_rope.directory, splits), llama3_rope.reference_logits)
        <= TOLERANCE
    )


def test_rope_scaling_changes_the_logits_by_more_than_the_tolerance(llama3_rope):
    """Guards the test above: unscaled RoPE must be detectable on this tiny model and input."""
    torch.manual_seed(0)
    unscaled = transformers.LlamaForCausalLM(tiny_config(False, None)).float().eval()
    unscaled.load_state_dict(llama3_rope.hf_model.state_dict())
    assert (
        max_diff(hf_logits(unscaled, token_ids()), llama3_rope.reference_logits) > 100 * TOLERANCE
    )


# ---- what each stage loads ------------------------------------------------------------------
def test_middle_stage_loads_only_its_layers(untied):
    weights = load_stage_weights(resolve_model(untied.directory), 1, 3)
    assert not any(name.startswith(("embed.", "norm.", "lm_head.")) for name in weights)
    assert {name.split(".")[1] for name in weights} == {"1", "2"}
    assert all(name.startswith("layers.") for name in weights)
    assert len(weights) == 2 * 9  # two layers, nine tensors each
    hf = untied.hf_model.state_dict()
    assert torch.equal(
        weights["layers.2.attn.k_proj.weight"], hf["model.layers.2.self_attn.k_proj.weight"]
    )
    assert torch.equal(
        weights["layers.1.mlp_norm.weight"], hf["model.layers.1.post_attention_layernorm.weight"]
    )


@pytest.mark.parametrize(
    "case,last_stage_extra",
    [
        ("untied", {"norm.weight", "lm_head.weight"}),
        ("tied", {"norm.weight", "embed.weight"}),  # the tied head reads the embedding
    ],
)
def test_first_and_last_stages_load_embedding_and_head(request, case, last_stage_extra):
    source = resolve_model(request.getfixturevalue(case).directory)
    first = load_stage_weights(source, 0, 1)
    assert {n for n in first if not n.startswith("layers.")} == {"embed.weight"}
    last = load_stage_weights(source, 3, 4)
    assert {n for n in last if not n.startswith("layers.")} == last_stage_extra
    assert {n.split(".")[1] for n in last if n.startswith("layers.")} == {"3"}
