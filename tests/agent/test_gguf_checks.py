"""GGUF files that llama.cpp files under the `llama` architecture but whose model is more than
a Llama decoder the runtime runs (Mixtral, scaled or partial RoPE, LongRoPE factors, biases):
refused by name when the model is resolved, before any worker starts, instead of served with
the difference ignored (wrong logits) or failing in each worker. Llama 3.1's RoPE factors
(rope_freqs.weight) are run (tests/agent/test_gguf_llama3_rope.py), unless mis-sized."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.loaders import resolve_model

gguf = pytest.importorskip("gguf")

HIDDEN, HEADS = 64, 4


def write_gguf(
    path: Path, extra_kv: dict | None = None, extra_tensors: tuple[str, ...] = (),
    extra_size: int = HIDDEN // HEADS // 2,
) -> str:
    """A one-block llama GGUF header with token_embd/output_norm and `extra_tensors` (each of
    `extra_size` ones)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(128)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(256)
    for key, value in (extra_kv or {}).items():
        getattr(writer, key)(value)
    writer.add_tensor("token_embd.weight", np.zeros((256, HIDDEN), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for name in extra_tensors:
        writer.add_tensor(name, np.ones(extra_size, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def test_a_plain_llama_header_resolves(tmp_path):
    arch = resolve_model(write_gguf(tmp_path / "plain.gguf")).arch
    assert (arch.n_layers, arch.hidden_size, arch.head_dim, arch.rope_scaling) == (1, HIDDEN, 16, None)


@pytest.mark.parametrize(
    "extra_kv,extra_tensors,named",
    [
        ({"add_expert_count": 8}, (), "mixture of experts (8 experts)"),
        ({}, ("rope_factors_long.weight",), "LongRoPE factors (rope_factors_long.weight)"),
        ({"add_rope_scaling_type": gguf.RopeScalingType.LINEAR}, (), "RoPE is scaled ('linear')"),
        ({"add_rope_dimension_count": 8}, (), "RoPE rotates 8 of each head's 16 dimensions"),
        ({}, ("blk.0.attn_q.bias",), "biases (blk.0.attn_q.bias)"),
    ],
    ids=["mixtral", "longrope-factors", "linear-rope", "partial-rope", "biases"],
)
def test_what_the_runtime_would_ignore_is_refused_by_name(tmp_path, extra_kv, extra_tensors, named):
    path = write_gguf(tmp_path / "model.gguf", extra_kv, extra_tensors)
    with pytest.raises(ValueError, match="which pipeshift does not run") as refusal:
        resolve_model(path)
    assert named in str(refusal.value)


def test_llama31_rope_factors_resolve(tmp_path):
    arch = resolve_model(write_gguf(tmp_path / "llama31.gguf", extra_tensors=("rope_freqs.weight",))).arch
    assert arch.rope_freq_factors == (1.0,) * (HIDDEN // HEADS // 2)


def test_rope_factors_of_the_wrong_length_are_refused(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", extra_tensors=("rope_freqs.weight",), extra_size=5)
    with pytest.raises(ValueError, match="which pipeshift does not run") as refusal:
        resolve_model(path)
    assert "rope_freqs.weight) hold 5 values for 8 frequencies" in str(refusal.value)
