"""Imported once by the local launcher's fork server, before any worker is forked from it.

Besides importing torch and the worker, it runs one forward through a tiny random stage, so
that the memory torch and its kernels set up on first use is written once here and shared
by every worker (copy-on-write) rather than written again in each. Single-threaded, so
forking afterwards is safe.
"""

from __future__ import annotations

import gc

import torch

import agent.worker  # noqa: F401  (the point is to import it here)
from agent.attention_metadata import build_attention_metadata
from agent.kv_cache import KVCacheSpec, PagedKVCache
from agent.model import LlamaStage
from cost_models.model_catalog import ModelArch


def warm_up() -> None:
    torch.set_num_threads(1)
    arch = ModelArch("warm-up", n_layers=2, hidden_size=64, ffn_size=128, n_heads=2, n_kv_heads=1,
                     vocab_size=64, max_context=64)
    stage = LlamaStage(arch, 0, 2).eval()
    stage.settle_weights()
    kv = PagedKVCache(KVCacheSpec(16, arch.n_kv_heads, arch.head_dim), stage.layer_range, 4)
    meta = build_attention_metadata(kv, ["a", "b"], [0, 0], [8, 1])
    stage.logits(stage(torch.zeros(9, dtype=torch.long), meta, kv))
    with torch.device("meta"):
        LlamaStage(arch, 0, 2)


warm_up()
# Move everything allocated so far out of the collector's reach: a collection in a worker
# would otherwise write to (and so copy) every shared page that holds a tracked object.
gc.freeze()
