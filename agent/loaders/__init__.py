"""Weight loaders: each returns the tensors of one stage `[start, end)` under our names.

Names are global and the same on every stage (see `agent/model.py`):
  embed.weight, norm.weight, lm_head.weight (untied models only),
  layers.{i}.attn_norm.weight, layers.{i}.attn.{q,k,v,o}_proj.weight,
  layers.{i}.mlp_norm.weight, layers.{i}.mlp.{gate,up,down}_proj.weight,
  layers.{i}.attn.{q,k,v}_proj.bias (ModelArch.qkv_bias), layers.{i}.attn.o_proj.bias (o_bias)
"""

from __future__ import annotations

from pathlib import Path

import torch

from agent.loaders.model_source import ModelSource, resolve_model


def stage_needs_embedding(source: ModelSource, start: int, end: int) -> bool:
    """The first stage embeds; the last needs the embedding too when the head is tied to it."""
    arch = source.arch
    return start == 0 or (end == arch.n_layers and arch.tie_embeddings)


def load_weights(
    source: ModelSource, layers: range, embed: bool = False, head: bool = False,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """Returns the tensors of `layers`, plus the embedding and the norm/head when asked,
    reading nothing else from the file."""
    if source.format == "gguf":
        from agent.loaders.gguf_loader import load_gguf_weights

        return load_gguf_weights(Path(source.path), source.arch, layers, embed, head, dtype)
    from agent.loaders.safetensors_loader import load_safetensors_weights

    return load_safetensors_weights(Path(source.path), source.arch, layers, embed, head, dtype)


def load_stage_weights(
    source: ModelSource, start: int, end: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Returns the stage's tensors: its layers, the embedding if first, norm/head if last."""
    return load_weights(source, range(start, end), start == 0, end == source.arch.n_layers, dtype)


__all__ = ["ModelSource", "resolve_model", "load_weights", "load_stage_weights", "stage_needs_embedding"]
