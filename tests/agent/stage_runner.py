"""Test helper: run a list of in-process stages over one micro-batch (no processes)."""

from __future__ import annotations

import torch

from agent.attention_metadata import build_attention_metadata
from agent.kv_cache import KVCacheSpec, PagedKVCache
from agent.loaders import load_stage_weights
from agent.model import LlamaStage


class InProcessPipeline:
    def __init__(self, source, splits: list[tuple[int, int]], num_blocks: int = 64, block_size: int = 16):
        arch = source.arch
        spec = KVCacheSpec(block_size, arch.n_kv_heads, arch.head_dim)
        self.stages = [
            LlamaStage.from_weights(arch, s, e, load_stage_weights(source, s, e)) for s, e in splits
        ]
        self.caches = [PagedKVCache(spec, range(s, e), num_blocks) for s, e in splits]

    def step(self, request_ids, start_pos, num_new, tokens: torch.Tensor, all_rows: bool = False):
        """Returns logits of each request's last token (or of every token with all_rows)."""
        h = tokens
        for stage, kv in zip(self.stages, self.caches, strict=True):
            window = stage.arch.window_of(stage.layer_range)
            meta = build_attention_metadata(kv, request_ids, start_pos, num_new, window)
            h = stage(h, meta, kv)
        return self.stages[-1].logits(h if all_rows else h[meta.last_rows])

    def decoded(self, ids: torch.Tensor, head: int) -> list[torch.Tensor]:
        """Prefills `ids[:head]` as one request, then feeds the rest one token at a time through
        the cache; returns the logits of each token fed so (positions head..len(ids)-1)."""
        self.step(["r"], [0], [head], ids[:head])
        return [self.step(["r"], [pos], [1], ids[pos : pos + 1])[0] for pos in range(head, len(ids))]
