"""Qwen2 GGUF files (architecture "qwen2", as llama.cpp's convert_hf_to_gguf.py writes Qwen2 and
Qwen2.5): metadata under `qwen2.*`, biases on Q, K and V, Q/K rows in transformers' order (the
converter permutes them for "llama" only), no output.weight when the embeddings are tied. A tiny
random Qwen2ForCausalLM, with random biases, written so, must give transformers' logits through
our stages (1, 2 and 3 of them); what the runtime would compute wrongly is refused by name.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from agent.loaders import ModelSource, resolve_model
from tests.agent.gguf_writing import write_qwen2_gguf
from tests.agent.stage_runner import InProcessPipeline
from tests.agent.test_attention_biases import SHAPE, SPLITS, randomize_biases

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

TOLERANCE = 1e-4  # as the other GGUF parity tests
N_TOKENS = 20


def qwen2_model(tied: bool, **overrides):
    torch.manual_seed(0)
    config = transformers.Qwen2Config(
        **SHAPE | dict(tie_word_embeddings=tied, rope_theta=1e6, rms_norm_eps=1e-6) | overrides
    )
    model = transformers.Qwen2ForCausalLM(config).float().eval()
    randomize_biases(model)
    return model


def token_ids() -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (N_TOKENS,), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module", params=["untied", "tied"])
def written(request, tmp_path_factory):
    """(kind, the GGUF's source, transformers' logits over token_ids())."""
    model = qwen2_model(tied=request.param == "tied")
    path = write_qwen2_gguf(tmp_path_factory.mktemp("qwen2-gguf") / "tiny-qwen2.gguf", model)
    with torch.no_grad():
        reference = model(token_ids().unsqueeze(0)).logits[0].float()
    return request.param, resolve_model(path), reference


def our_logits(source: ModelSource, splits) -> torch.Tensor:
    pipe = InProcessPipeline(source, splits, block_size=4)
    return pipe.step(["r"], [0], [N_TOKENS], token_ids(), all_rows=True)


def test_the_file_resolves_to_qwen2s_shape(written):
    kind, source, _ = written
    arch = source.arch
    assert source.format == "gguf" and arch.family == "qwen2"
    assert arch.qkv_bias and not arch.o_bias
    assert arch.tie_embeddings == (kind == "tied")
    assert (arch.n_layers, arch.hidden_size, arch.ffn_size, arch.n_heads, arch.n_kv_heads) == (3, 64, 128, 4, 2)
    # no qwen2.vocab_size in the file: the embedding's rows
    assert (arch.vocab_size, arch.max_context, arch.head_dim) == (256, 128, 16)
    assert (arch.rope_theta, arch.rms_norm_eps, arch.rope_freq_factors) == (1e6, pytest.approx(1e-6), None)


@pytest.mark.parametrize("splits", list(SPLITS.values()), ids=list(SPLITS))
def test_logits_match_transformers(written, splits):
    _, source, reference = written
    logits = our_logits(source, splits)
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() <= TOLERANCE


def test_decode_through_the_paged_cache_matches_transformers(written):
    _, source, reference = written
    ids = token_ids()
    pipe = InProcessPipeline(source, SPLITS["2-stage"], block_size=4)
    head = N_TOKENS - 3
    for pos, logits in enumerate(pipe.decoded(ids, head), start=head):
        assert (logits - reference[pos]).abs().max().item() <= TOLERANCE


def test_q_and_k_rows_are_not_unpermuted_as_llamas_are(written):
    """Guards the parity above: read as a llama file's (rows un-permuted), the logits are far off."""
    _, source, reference = written
    as_llama = replace(source, arch=replace(source.arch, family="llama"))
    assert (our_logits(as_llama, SPLITS["1-stage"]) - reference).abs().max().item() > 100 * TOLERANCE


def test_without_the_biases_the_logits_differ(written):
    """Guards the parity above: the file's biases (random, non-zero) are read and added."""
    _, source, reference = written
    unbiased = replace(source, arch=replace(source.arch, qkv_bias=False))
    assert (our_logits(unbiased, SPLITS["1-stage"]) - reference).abs().max().item() > 100 * TOLERANCE


# -- refusals --------------------------------------------------------------------------------

def _refusal(path: str) -> str:
    with pytest.raises(ValueError) as refusal:
        resolve_model(path)
    return str(refusal.value)


@pytest.mark.parametrize(
    "extra_tensors,add_metadata,named",
    [
        ({"blk.1.attn_output.bias": np.ones(64, dtype=np.float32)}, None,
         "its projections have biases (blk.1.attn_output.bias)"),
        ({"blk.0.ffn_down.bias": np.ones(64, dtype=np.float32)}, None,
         "its projections have biases (blk.0.ffn_down.bias)"),
        ({}, lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN), "its RoPE is scaled ('yarn')"),
        ({}, lambda w: w.add_rope_dimension_count(8), "RoPE rotates 8 of each head's 16 dimensions"),
        ({"rope_freqs.weight": np.ones(8, dtype=np.float32)}, None,
         "RoPE frequency factors (rope_freqs.weight), which architecture 'qwen2' has not"),
    ],
    ids=["output-bias", "mlp-bias", "yarn", "partial-rope", "rope-factors"],
)
def test_what_the_runtime_would_ignore_is_refused_by_name(tmp_path, extra_tensors, add_metadata, named):
    path = write_qwen2_gguf(tmp_path / "model.gguf", qwen2_model(tied=True), add_metadata, extra_tensors)
    message = _refusal(path)
    assert named in message
    assert "which pipeshift does not run: it serves Qwen2 decoders (architecture 'qwen2')" in message


def test_a_block_missing_a_bias_is_refused_by_name(tmp_path):
    path = write_qwen2_gguf(tmp_path / "model.gguf", qwen2_model(tied=True), omit=("blk.2.attn_k.bias",))
    assert "it has Q/K/V biases but no blk.2.attn_k.bias" in _refusal(path)


def test_a_llama_file_with_biases_is_still_refused(tmp_path):
    from tests.agent.test_gguf_checks import write_gguf

    message = _refusal(write_gguf(tmp_path / "llama.gguf", extra_tensors=("blk.0.attn_q.bias",)))
    assert "its projections have biases (blk.0.attn_q.bias)" in message
    assert "it serves Llama decoders (architecture 'llama')" in message


@pytest.mark.parametrize("architecture", ["qwen3", "qwen2moe", "phi3"])
def test_other_architectures_are_refused_by_name(tmp_path, architecture):
    writer = gguf.GGUFWriter(str(tmp_path / "other.gguf"), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((16, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    message = _refusal(str(tmp_path / "other.gguf"))
    assert f"architecture {architecture!r} is not supported" in message
    assert "'llama' or 'qwen2'" in message
