"""GGUF files that llama.cpp files under the `llama` architecture but whose model is more than
a plain Llama decoder (Mixtral, Llama 3.1's RoPE factors, scaled or partial RoPE, biases):
refused by name when the model is resolved, before any worker starts, instead of served with
the difference ignored (wrong logits) or failing in each worker."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.loaders import resolve_model

gguf = pytest.importorskip("gguf")

HIDDEN, HEADS = 64, 4


def write_gguf(path: Path, extra_kv: dict | None = None, extra_tensors: tuple[str, ...] = ()) -> str:
    """A one-block llama GGUF header with token_embd/output_norm and `extra_tensors`."""
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
        writer.add_tensor(name, np.ones(HIDDEN // HEADS // 2, dtype=np.float32))
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
        ({}, ("rope_freqs.weight",), "rope_freqs.weight"),
        ({"add_rope_scaling_type": gguf.RopeScalingType.LINEAR}, (), "RoPE is scaled ('linear')"),
        ({"add_rope_dimension_count": 8}, (), "RoPE rotates 8 of each head's 16 dimensions"),
        ({}, ("blk.0.attn_q.bias",), "biases (blk.0.attn_q.bias)"),
    ],
    ids=["mixtral", "llama3.1-rope-factors", "linear-rope", "partial-rope", "biases"],
)
def test_what_the_runtime_would_ignore_is_refused_by_name(tmp_path, extra_kv, extra_tensors, named):
    path = write_gguf(tmp_path / "model.gguf", extra_kv, extra_tensors)
    with pytest.raises(ValueError, match="which pipeshift does not run") as refusal:
        resolve_model(path)
    assert named in str(refusal.value)
