"""Load one stage's weights from a Hugging Face safetensors directory (memory-mapped)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from cost_models.model_catalog import ModelArch

# HF name (after "model.layers.{i}.") -> ours (after "layers.{i}.").
BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.o_proj": "attn.o_proj",
    "post_attention_layernorm": "mlp_norm",
    "mlp.gate_proj": "mlp.gate_proj",
    "mlp.up_proj": "mlp.up_proj",
    "mlp.down_proj": "mlp.down_proj",
}


def bias_names(arch: ModelArch) -> list[str]:
    """The biased projections of a block (HF names after "model.layers.{i}."), as `arch` has them."""
    names = [f"self_attn.{n}_proj" for n in "qkv"] if arch.qkv_bias else []
    return names + (["self_attn.o_proj"] if arch.o_bias else [])


def _tensor_files(directory: Path) -> dict[str, Path]:
    """Maps every tensor name to the shard that holds it."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: directory / shard for name, shard in weight_map.items()}
    files: dict[str, Path] = {}
    for shard in sorted(directory.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            files.update({name: shard for name in f.keys()})
    if not files:
        raise FileNotFoundError(f"{directory} holds no *.safetensors files")
    return files


def load_safetensors_weights(
    directory: Path, arch: ModelArch, layers: range, embed: bool, head: bool,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Returns the tensors of `layers` (plus embedding and norm/head when asked), reading
    nothing else from the shards."""
    wanted: dict[str, str] = {}
    for layer in layers:
        for hf_suffix, ours in BLOCK_NAMES.items():
            wanted[f"model.layers.{layer}.{hf_suffix}.weight"] = f"layers.{layer}.{ours}.weight"
        for hf_suffix in bias_names(arch):
            wanted[f"model.layers.{layer}.{hf_suffix}.bias"] = f"layers.{layer}.{BLOCK_NAMES[hf_suffix]}.bias"
    if embed or (head and arch.tie_embeddings):
        wanted["model.embed_tokens.weight"] = "embed.weight"
    if head:
        wanted["model.norm.weight"] = "norm.weight"
        if not arch.tie_embeddings:
            wanted["lm_head.weight"] = "lm_head.weight"

    files = _tensor_files(directory)
    by_shard: dict[Path, list[str]] = {}
    for hf_name in wanted:
        if hf_name not in files:
            raise KeyError(f"{directory} has no tensor {hf_name!r}")
        by_shard.setdefault(files[hf_name], []).append(hf_name)
    weights: dict[str, torch.Tensor] = {}
    for shard, names in by_shard.items():
        with safe_open(str(shard), framework="pt") as f:
            for hf_name in names:
                weights[wanted[hf_name]] = f.get_tensor(hf_name).to(dtype).contiguous()
    return weights
