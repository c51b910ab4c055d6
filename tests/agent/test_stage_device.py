"""A stage whose weights and cache are on a device other than the CPU (a GPU worker's) runs
with every tensor of its forward on that device.

The attention metadata is built on the CPU from the cache's block tables; a GPU stage's
rotary positions, KV slots and masks must follow its cache. PyTorch's `meta` device stands
in for a GPU here: it computes shapes only, and mixing its tensors with CPU ones raises as
mixing CUDA and CPU ones does, so this runs on a machine without a GPU.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from agent.attention_metadata import build_attention_metadata
from agent.kv_cache import KVCacheSpec, PagedKVCache
from agent.model import LlamaStage
from cost_models.model_catalog import ModelArch

ARCH = ModelArch(
    name="tiny", n_layers=2, hidden_size=64, ffn_size=128, n_heads=4, n_kv_heads=2,
    vocab_size=100, max_context=128, rope_theta=10000.0, rms_norm_eps=1e-6,
    tie_embeddings=True, head_dim=16,
)


@pytest.mark.parametrize("window", [None, 4], ids=["full", "sliding"])
def test_prefill_prefill_over_a_past_and_decode_stay_on_the_stage_device(window) -> None:
    arch = dataclasses.replace(ARCH, sliding_window=window, sliding_layers=(1,) if window else ())
    device = torch.device("meta")
    stage = LlamaStage(arch, 0, 2).to(device).eval()
    kv = PagedKVCache(KVCacheSpec(16, arch.n_kv_heads, arch.head_dim), range(0, 2), 16, device)
    steps = [  # (start positions, new tokens) of requests a and b
        ([0, 0], [8, 5]),  # two fresh prefills
        ([8, 5], [1, 3]),  # a decodes, b prefills over its past (past the window)
        ([9, 8], [1, 1]),  # both decode
    ]
    with torch.inference_mode():
        for start, n_new in steps:
            meta = build_attention_metadata(kv, ["a", "b"], start, n_new, arch.window_of(range(0, 2)))
            tensors = [v for v in vars(meta).values() if isinstance(v, torch.Tensor)]
            tensors += [v for span in meta.prefills for v in vars(span).values() if isinstance(v, torch.Tensor)]
            assert {t.device for t in tensors} == {device}
            hidden = stage(torch.zeros(sum(n_new), dtype=torch.long, device=device), meta, kv)
            logits = stage.logits(hidden[meta.last_rows])
            assert logits.shape == (2, arch.vocab_size) and logits.device == device


def test_on_the_cpu_the_metadata_is_not_copied() -> None:
    kv = PagedKVCache(KVCacheSpec(16, ARCH.n_kv_heads, ARCH.head_dim), range(0, 2), 4)
    meta = build_attention_metadata(kv, ["a"], [0], [3])
    assert meta.positions.device.type == "cpu"
    assert meta.to(torch.device("cpu")).positions is meta.positions  # .to of the same device
