"""agent.model: a stage gains and loses layers, the embedding and the head in place, from a
peer's export or from the checkpoint, and then computes exactly what a stage built whole does."""

from __future__ import annotations

import pytest
import torch

from agent.attention_metadata import build_attention_metadata
from agent.kv_cache import KVCacheSpec, PagedKVCache
from agent.loaders import load_stage_weights, load_weights
from agent.model import LlamaStage

IDS = torch.tensor([1, 504, 3458, 314, 260, 2010, 282, 4054, 28])


@pytest.fixture(scope="module")
def arch(model_source):
    return model_source.arch


def _logits(stage: LlamaStage, arch, layers: range) -> torch.Tensor:
    kv = PagedKVCache(KVCacheSpec(16, arch.n_kv_heads, arch.head_dim), layers, 4)
    meta = build_attention_metadata(kv, ["r"], [0], [len(IDS)])
    return stage.logits(stage(IDS, meta, kv, layers))


@pytest.fixture(scope="module")
def whole(model_source, arch):
    return LlamaStage.from_weights(arch, 0, arch.n_layers, load_stage_weights(model_source, 0, arch.n_layers))


def test_a_stage_that_gains_layers_and_the_head_from_a_peer_computes_like_one_built_whole(model_source, arch, whole):
    first = LlamaStage.from_weights(arch, 0, 10, load_stage_weights(model_source, 0, 10))
    peer = LlamaStage.from_weights(arch, 10, arch.n_layers, load_stage_weights(model_source, 10, arch.n_layers))
    sent = peer.export(range(10, arch.n_layers), head=True)
    assert set(sent) >= {"layers.10.attn.q_proj.weight", "norm.weight", "embed.weight"}  # tied head
    first.install(sent, range(10, arch.n_layers), head=True)
    assert first.held_layers == list(range(arch.n_layers)) and first.has_head
    assert torch.equal(_logits(first, arch, range(0, arch.n_layers)), _logits(whole, arch, range(0, arch.n_layers)))


def test_a_spare_gains_everything_from_disk(model_source, arch, whole):
    spare = LlamaStage(arch, 0, 0).eval()
    assert spare.held_layers == [] and not spare.has_embedding and not spare.has_head
    for i in range(arch.n_layers):  # a layer at a time, as a paced load does
        spare.install(load_weights(model_source, range(i, i + 1)), range(i, i + 1))
    spare.install(load_weights(model_source, range(0), embed=True), range(0), embed=True)
    spare.install(load_weights(model_source, range(0), head=True), range(0), head=True)
    assert torch.equal(_logits(spare, arch, range(0, arch.n_layers)), _logits(whole, arch, range(0, arch.n_layers)))


def test_export_gives_back_the_checkpoint_weights(model_source, arch, whole):
    loaded = load_weights(model_source, range(3, 4), head=True)
    exported = whole.export(range(3, 4), head=True)
    assert set(exported) == set(loaded)
    for name, tensor in loaded.items():
        assert torch.equal(exported[name], tensor), name


def test_removing_parts_frees_them_and_leaves_the_rest_serving(model_source, arch):
    stage = LlamaStage.from_weights(arch, 0, 12, load_stage_weights(model_source, 0, 12))
    full_bytes = stage.weight_bytes
    before = stage(IDS, build_attention_metadata(
        kv := PagedKVCache(KVCacheSpec(16, arch.n_kv_heads, arch.head_dim), range(0, 12), 4), ["r"], [0], [9]), kv,
        range(0, 8))
    stage.remove(range(8, 12))
    assert stage.held_layers == list(range(8))
    assert stage.weight_bytes == full_bytes - 4 * stage.part_bytes()["layer"]
    kv = PagedKVCache(KVCacheSpec(16, arch.n_kv_heads, arch.head_dim), range(0, 8), 4)
    after = stage(IDS, build_attention_metadata(kv, ["r"], [0], [9]), kv, range(0, 8))
    assert torch.equal(before, after)
    with pytest.raises(KeyError, match="does not hold layer 9"):
        stage.export(range(9, 10))
