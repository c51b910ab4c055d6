"""Checkpoints whose attention projections have biases, served as transformers computes them:
Qwen2 (biases on Q, K and V; none on the output projection) and Llama with `attention_bias`
(biases on all four). Tiny random models saved by transformers, split over 1, 2 and 3 stages;
a stage that gains layers from a peer's export (what a live move sends) gains their biases.

No downloads: the models are built from transformers' config classes, with random biases
(transformers initialises them to zero, which would hide a bias left out).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from agent.attention_metadata import build_attention_metadata
from agent.kv_cache import KVCacheSpec, PagedKVCache
from agent.loaders import load_stage_weights, load_weights, resolve_model
from agent.model import LlamaStage
from cost_models.layer_work import matmul_params_per_layer
from tests.agent.stage_runner import InProcessPipeline
from tests.tiny_llama import THREE_LAYER_SPLITS, THREE_LAYERS, randomize_biases

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # as tests/agent/test_model_parity.py
N_TOKENS = 24
SHAPE, SPLITS = THREE_LAYERS, THREE_LAYER_SPLITS


def save_model(directory: Path, kind: str, **overrides):
    """Saves a tiny random `kind` ("qwen2", "qwen2-tied" or "llama-bias") into `directory`;
    returns transformers' model."""
    torch.manual_seed(0)
    if kind.startswith("qwen2"):
        config = transformers.Qwen2Config(**SHAPE, tie_word_embeddings=kind == "qwen2-tied",
                                          rope_theta=1e6, **overrides)
        model = transformers.Qwen2ForCausalLM(config)
    else:
        config = transformers.LlamaConfig(**SHAPE, attention_bias=True, **overrides)
        model = transformers.LlamaForCausalLM(config)
    model = model.float().eval()
    randomize_biases(model)
    model.save_pretrained(str(directory))
    return model


@pytest.fixture(scope="module", params=["qwen2", "qwen2-tied", "llama-bias"])
def saved(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = save_model(directory, request.param)
    ids = torch.randint(0, SHAPE["vocab_size"], (N_TOKENS,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        reference = model(ids.unsqueeze(0)).logits[0].float()
    return request.param, resolve_model(str(directory)), ids, reference


def test_the_architecture_has_the_biases_transformers_builds(saved):
    kind, source, _, _ = saved
    arch = source.arch
    assert arch.qkv_bias
    assert arch.o_bias == (kind == "llama-bias")
    assert arch.tie_embeddings == (kind == "qwen2-tied")
    biases = (arch.q_size + 2 * arch.kv_size) + (arch.hidden_size if arch.o_bias else 0)
    assert arch.bias_params_per_layer == biases
    stage = LlamaStage.from_weights(arch, 0, arch.n_layers, load_stage_weights(source, 0, arch.n_layers),
                                    prepack=False)
    layer = stage.layers[0]
    held = sum(p.numel() for p in layer.parameters())
    assert held == arch.params_per_layer  # the cost model counts what a layer holds, biases included
    weights = sum(p.numel() for n, p in layer.named_parameters() if n.endswith("weight_t"))
    assert matmul_params_per_layer(arch) == weights  # the biases are no matmul's


@pytest.mark.parametrize("splits", list(SPLITS.values()), ids=list(SPLITS))
def test_logits_match_transformers(saved, splits):
    _, source, ids, reference = saved
    pipe = InProcessPipeline(source, splits, block_size=4)
    logits = pipe.step(["r"], [0], [len(ids)], ids, all_rows=True)
    assert logits.shape == reference.shape
    assert (logits - reference).abs().max().item() <= TOLERANCE


def test_logits_match_transformers_with_plain_layouts(saved):
    """Without oneDNN's packed layout (as on a GPU), the biases are added by addmm."""
    _, source, ids, reference = saved
    arch = source.arch
    stage = LlamaStage.from_weights(arch, 0, arch.n_layers, load_stage_weights(source, 0, arch.n_layers),
                                    prepack=False)
    assert stage.layers[0].attn.qkv._packed is None
    assert (_logits(stage, ids) - reference).abs().max().item() <= TOLERANCE


def test_decode_through_the_paged_cache_matches_transformers(saved):
    _, source, ids, reference = saved
    pipe = InProcessPipeline(source, SPLITS["2-stage"], block_size=4)
    head = len(ids) - 3
    for pos, logits in enumerate(pipe.decoded(ids, head), start=head):
        assert (logits - reference[pos]).abs().max().item() <= TOLERANCE


def _logits(stage: LlamaStage, ids: torch.Tensor) -> torch.Tensor:
    arch = stage.arch
    layers = range(0, arch.n_layers)
    kv = PagedKVCache(KVCacheSpec(4, arch.n_kv_heads, arch.head_dim), layers, 16)
    return stage.logits(stage(ids, build_attention_metadata(kv, ["r"], [0], [len(ids)]), kv, layers))


def test_layers_moved_from_a_peer_carry_their_biases(saved):
    """What a live move does: the peer exports layers 1-2 and the head, the first stage installs
    them; it then computes exactly what it computed as a whole model."""
    kind, source, ids, reference = saved
    arch = source.arch
    whole = LlamaStage.from_weights(arch, 0, arch.n_layers, load_stage_weights(source, 0, arch.n_layers))
    before = _logits(whole, ids)
    first = LlamaStage.from_weights(arch, 0, 1, load_stage_weights(source, 0, 1))
    peer = LlamaStage.from_weights(arch, 1, arch.n_layers, load_stage_weights(source, 1, arch.n_layers))
    sent = peer.export(range(1, arch.n_layers), head=True)
    biases = {n for n in sent if n.endswith(".bias")}
    expected = {f"layers.{i}.attn.{p}_proj.bias" for i in (1, 2) for p in ("qkvo" if arch.o_bias else "qkv")}
    assert biases == expected
    for name in biases:  # the checkpoint's values, not zeros
        assert sent[name].abs().sum() > 0
    first.install({n: t.contiguous() for n, t in sent.items()}, range(1, arch.n_layers), head=True)
    peer.remove(range(1, arch.n_layers), head=True)
    after = _logits(first, ids)
    assert torch.equal(after, before)
    assert (after - reference).abs().max().item() <= TOLERANCE


def test_export_gives_back_the_checkpoints_biases(saved):
    _, source, _, _ = saved
    arch = source.arch
    whole = LlamaStage.from_weights(arch, 0, arch.n_layers, load_stage_weights(source, 0, arch.n_layers))
    loaded = load_weights(source, range(2, 3), head=True)
    exported = whole.export(range(2, 3), head=True)
    assert set(exported) == set(loaded)
    for name, tensor in loaded.items():
        assert torch.equal(exported[name], tensor), name


def test_a_stage_without_a_bias_its_architecture_has_is_refused(saved):
    """A loader that left a bias out would not go unnoticed: the stage refuses to build."""
    _, source, _, _ = saved
    weights = load_stage_weights(source, 0, 1)
    del weights["layers.0.attn.k_proj.bias"]
    with pytest.raises((KeyError, RuntimeError)):
        LlamaStage.from_weights(source.arch, 0, 1, weights)
