"""Load one stage's weights from a GGUF file, dequantising what the file holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from agent.loaders.gguf_file import GGUFFile
from cost_models.model_catalog import ModelArch

GGML_TYPE_Q8_0 = 8

# GGUF tensor name -> ours, per block.
BLOCK_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "attn.q_proj",
    "attn_k": "attn.k_proj",
    "attn_v": "attn.v_proj",
    "attn_output": "attn.o_proj",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undoes llama.cpp's converter, which interleaves each head's rows for its RoPE layout
    (in llama-architecture files only: qwen2's are written as transformers holds them).

    Without this the model still writes plausible text, but its logits are wrong.
    """
    out_dim, in_dim = weight.shape
    return (
        weight.reshape(n_heads, out_dim // n_heads // 2, 2, in_dim)
        .swapaxes(1, 2)
        .reshape(out_dim, in_dim)
    )


def load_gguf_weights(
    path: Path, arch: ModelArch, layers: range, embed: bool, head: bool,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Returns the tensors of `layers`, plus the embedding (`embed`) and norm/head (`head`)."""
    gguf_file = GGUFFile(path, with_arrays=False)  # memory-mapped: untouched tensors are never read
    wanted: dict[str, str] = {}
    for layer in layers:
        for gguf_suffix, ours in BLOCK_NAMES.items():
            wanted[f"blk.{layer}.{gguf_suffix}.weight"] = f"layers.{layer}.{ours}.weight"
        if arch.qkv_bias:
            for gguf_suffix in ("attn_q", "attn_k", "attn_v"):
                wanted[f"blk.{layer}.{gguf_suffix}.bias"] = f"layers.{layer}.{BLOCK_NAMES[gguf_suffix]}.bias"
    head_needs_table = head and arch.tie_embeddings
    q8_table = gguf_file.tensors["token_embd.weight"].ggml_type == GGML_TYPE_Q8_0
    weights: dict[str, torch.Tensor] = {}
    if embed and q8_table:
        # Lookups read rows straight from the Q8_0 blocks (see agent/quantized_embedding.py).
        weights["embed.q8_0"] = torch.from_numpy(np.array(gguf_file.raw("token_embd.weight"), copy=True))
    if (embed and not q8_table) or head_needs_table:
        wanted["token_embd.weight"] = "embed.weight"
    if head:
        wanted["output_norm.weight"] = "norm.weight"
        if not arch.tie_embeddings:
            wanted["output.weight"] = "lm_head.weight"

    for gguf_name, ours in wanted.items():
        if gguf_name not in gguf_file.tensors:
            raise KeyError(f"{path.name} has no tensor {gguf_name!r}")
        array = gguf_file.dequantize(gguf_name)
        # Only for llama does the converter permute Q/K rows (qwen2's keep transformers' order).
        if arch.family == "llama" and gguf_name.endswith("attn_q.weight"):
            array = unpermute_rope_rows(array, arch.n_heads)
        elif arch.family == "llama" and gguf_name.endswith("attn_k.weight"):
            array = unpermute_rope_rows(array, arch.n_kv_heads)
        weights[ours] = torch.from_numpy(np.array(array, copy=True)).to(dtype)
    return weights
