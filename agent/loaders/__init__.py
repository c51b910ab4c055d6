"""Weight loaders: each returns the tensors of one stage `[start, end)` under our names.

Names are global and the same on every stage (see `agent/model.py`):
  embed.weight, norm.weight, lm_head.weight (untied models only),
  layers.{i}.attn_norm.weight, layers.{i}.attn.{q,k,v,o}_proj.weight,
  layers.{i}.mlp_norm.weight, layers.{i}.mlp.{gate,up,down}_proj.weight
"""

from __future__ import annotations

from pathlib import Path

import torch

from agent.loaders.model_source import ModelSource, resolve_model


def stage_needs_embedding(source: ModelSource, start: int, end: int) -> bool:
    """The first stage embeds; the last needs the embedding too when the head is tied to it."""
    arch = source.arch
    return start == 0 or (end == arch.n_layers and arch.tie_embeddings)


def load_stage_weights(
    source: ModelSource, start: int, end: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Returns the stage's tensors, reading only those of its layers from the file."""
    if source.format == "gguf":
        from agent.loaders.gguf_loader import load_gguf_stage

        return load_gguf_stage(Path(source.path), source.arch, start, end, dtype)
    from agent.loaders.safetensors_loader import load_safetensors_stage

    return load_safetensors_stage(Path(source.path), source.arch, start, end, dtype)


__all__ = ["ModelSource", "resolve_model", "load_stage_weights", "stage_needs_embedding"]
