"""Test helper: write a transformers `LlamaForCausalLM` or `Qwen2ForCausalLM` to a GGUF file as
llama.cpp's converter does (or only a tokenizer, on a BPE trained here), in float32, with no tokenizer unless one is added: tensor names, and
for llama Q/K rows permuted for its RoPE layout; for qwen2 (convert_hf_to_gguf.py's Qwen2Model)
Q/K rows as transformers holds them, Q/K/V biases, metadata under `qwen2.*` without vocab_size or
rope.dimension_count, and no output.weight when the embeddings are tied."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# transformers' per-layer names -> llama.cpp's.
LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def permute_for_gguf(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter permutation of Q/K rows (the inverse of our loader's unpermute)."""
    out_dim = weight.shape[0]
    return (
        weight.reshape(n_heads, 2, out_dim // n_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def model_writer(path: Path, arch: str, name: str, cfg):
    """Returns a GGUF writer of architecture `arch` holding the metadata every model file has,
    from a transformers config."""
    import gguf

    rope_theta = getattr(cfg, "rope_theta", None) or (cfg.rope_parameters or {}).get("rope_theta", 10000.0)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(name)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(rope_theta))
    return writer


def finish(writer, path: Path) -> str:
    """Writes what `writer` holds to its file; returns the path."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(path)


def byte_level_split(pattern: str):
    """A pre-tokenizer that splits by `pattern`, then maps bytes without GPT-2's regex (Llama 3's
    and Qwen2's tokenizer.json)."""
    from tokenizers import Regex, pre_tokenizers

    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train_bpe(corpus: list[str], pattern: str, vocab_size: int, nfc: bool = False) -> tuple[list[str], list[str]]:
    """Returns (tokens in id order, merges "a b") of a small byte-level BPE trained on `corpus`,
    split by `pattern` (after NFC when `nfc`)."""
    import json

    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = byte_level_split(pattern)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(corpus, trainer)
    model = json.loads(tok.to_str())["model"]
    vocab = model["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))
    return tokens, [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]


def write_tokenizer_gguf(path: Path, arch: str, vocab_size: int, add_tokenizer: Callable[[Any], None]) -> str:
    """Writes a one-tensor GGUF of architecture `arch` holding the keys `add_tokenizer(writer)` adds."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    add_tokenizer(writer)
    writer.add_tensor("token_embd.weight", np.zeros((vocab_size, 8), dtype=np.float32))
    return finish(writer, path)


def write_llama_gguf(
    path: Path, hf_model, rope_freqs: torch.Tensor | np.ndarray | None = None,
    add_metadata: Callable[[Any], None] | None = None,
) -> str:
    """Writes `hf_model` (fp32) as a llama GGUF; `rope_freqs` becomes `rope_freqs.weight`;
    `add_metadata(writer)` adds more keys (a tokenizer's)."""
    cfg = hf_model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = model_writer(path, "llama", "tiny-llama3", cfg)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if add_metadata is not None:
        add_metadata(writer)
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, dtype=np.float32))
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in LAYER_TENSORS.items():
            array = state[f"model.layers.{i}.{ours}.weight"]
            if theirs == "attn_q":
                array = permute_for_gguf(array, cfg.num_attention_heads)
            elif theirs == "attn_k":
                array = permute_for_gguf(array, cfg.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{theirs}.weight", np.ascontiguousarray(array))
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        writer.add_tensor("output.weight", state["lm_head.weight"])
    return finish(writer, path)


def write_qwen2_gguf(
    path: Path, hf_model, add_metadata: Callable[[Any], None] | None = None,
    extra_tensors: dict[str, np.ndarray] | None = None, omit: tuple[str, ...] = (),
) -> str:
    """Writes `hf_model` (a Qwen2ForCausalLM, fp32) as a qwen2 GGUF; `add_metadata(writer)` adds
    more keys (a tokenizer's, a RoPE scaling), `extra_tensors` more tensors; the tensors named in
    `omit` are left out."""
    import gguf

    cfg = hf_model.config
    writer = model_writer(path, "qwen2", "tiny-qwen2", cfg)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    if add_metadata is not None:
        add_metadata(writer)
    state = {k: v.detach().float().numpy() for k, v in hf_model.state_dict().items()}
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"]}
    for i in range(cfg.num_hidden_layers):
        for ours, theirs in LAYER_TENSORS.items():
            tensors[f"blk.{i}.{theirs}.weight"] = state[f"model.layers.{i}.{ours}.weight"]
            if theirs in ("attn_q", "attn_k", "attn_v"):
                tensors[f"blk.{i}.{theirs}.bias"] = state[f"model.layers.{i}.{ours}.bias"]
    tensors["output_norm.weight"] = state["model.norm.weight"]
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = state["lm_head.weight"]
    for name, array in {**tensors, **(extra_tensors or {})}.items():
        if name not in omit:
            writer.add_tensor(name, array)
    return finish(writer, path)
