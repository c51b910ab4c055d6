"""Sliding-window attention served over the whole context, as transformers computes it: a query
at position i attends the keys at positions j with i - window < j <= i (transformers'
`sliding_window_overlay`: kv_idx > q_idx - sliding_window), in every layer of a Mistral and in
the layers a Qwen2's config names.

Tiny random models saved by transformers, prompts several windows long, split over 1, 2 and
3 stages: one fresh prefill, a prefill in chunks (each over a past), token-by-token decode, and
requests of different lengths decoded together. Each model's logits are also computed with
the window ignored (and, for Qwen2, with every layer sliding), which transformers' differ from:
the comparisons can fail.

No downloads: the models are built from transformers' config classes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from agent.attention_metadata import build_attention_metadata
from agent.kv_cache import KVCacheSpec, PagedKVCache
from agent.loaders import load_stage_weights, resolve_model
from agent.model import LlamaStage
from tests.agent.stage_runner import InProcessPipeline
from tests.tiny_llama import THREE_LAYER_SPLITS, THREE_LAYERS

transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4  # as tests/agent/test_model_parity.py
WINDOW = 8
N_TOKENS = 30  # several windows
SHAPE, SPLITS = THREE_LAYERS, THREE_LAYER_SPLITS
# kind -> (transformers config, the layers that slide)
MODELS = {
    "mistral": (lambda: transformers.MistralConfig(**SHAPE, sliding_window=WINDOW), (0, 1, 2)),
    # layer 0 full, 1 and 2 sliding; config.json without layer_types: derived from max_window_layers
    "qwen2": (lambda: transformers.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=WINDOW,
                                               max_window_layers=1), (1, 2)),
    # layer_types as the config names them, not a prefix of full layers
    "qwen2-layer-types": (lambda: transformers.Qwen2Config(
        **SHAPE, use_sliding_window=True, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"]), (0, 2)),
}


def save_model(directory: Path, kind: str):
    """Saves a tiny random `kind` of MODELS into `directory`; returns transformers' model."""
    torch.manual_seed(0)
    config = MODELS[kind][0]()
    model_class = transformers.MistralForCausalLM if kind == "mistral" else transformers.Qwen2ForCausalLM
    model = model_class(config).float().eval()
    with torch.no_grad():  # transformers starts biases at zero, where a lost one would not show
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0.0, 0.5)
    model.save_pretrained(str(directory))
    if kind == "qwen2":  # leave the sliding layers to max_window_layers, as older configs do
        path = directory / "config.json"
        saved = json.loads(path.read_text())
        del saved["layer_types"]
        path.write_text(json.dumps(saved))
    return model


def reference_logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids.unsqueeze(0)).logits[0].float()


def prompt(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, SHAPE["vocab_size"], (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=list(MODELS))
def saved(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = save_model(directory, request.param)
    ids = prompt(N_TOKENS, 3)
    return request.param, resolve_model(str(directory)), model, ids, reference_logits(model, ids)


def max_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    assert ours.shape == reference.shape
    return (ours - reference).abs().max().item()


# ---- what the model description says --------------------------------------------------------
def test_the_architecture_has_the_window_and_the_layers_transformers_slides(saved):
    kind, source, model, _, _ = saved
    arch = source.arch
    assert arch.sliding_window == WINDOW
    assert arch.sliding_layers == MODELS[kind][1]
    assert arch.max_context == SHAPE["max_position_embeddings"]  # the whole context, not the window
    theirs = model.config
    if kind != "mistral":  # Mistral slides everywhere; Qwen2 where its layer_types say
        sliding = tuple(i for i, t in enumerate(theirs.layer_types) if t == "sliding_attention")
        assert arch.sliding_layers == sliding


# ---- logits: fresh prefill, chunked prefill, decode ------------------------------------------
@pytest.mark.parametrize("splits", list(SPLITS.values()), ids=list(SPLITS))
def test_one_prefill_matches_transformers(saved, splits):
    _, source, _, ids, reference = saved
    pipe = InProcessPipeline(source, splits, block_size=4)
    assert max_error(pipe.step(["r"], [0], [len(ids)], ids, all_rows=True), reference) <= TOLERANCE


@pytest.mark.parametrize("splits", list(SPLITS.values()), ids=list(SPLITS))
def test_a_prefill_in_chunks_matches_transformers(saved, splits):
    """Chunks over a past: one inside the first window, one reaching past it, one whose every
    query's window starts after position 0."""
    _, source, _, ids, reference = saved
    pipe = InProcessPipeline(source, splits, block_size=4)
    for start, end in [(0, 5), (5, 17), (17, N_TOKENS)]:
        logits = pipe.step(["r"], [start], [end - start], ids[start:end], all_rows=True)
        assert max_error(logits, reference[start:end]) <= TOLERANCE, (start, end)


@pytest.mark.parametrize("splits", list(SPLITS.values()), ids=list(SPLITS))
def test_decode_past_the_window_matches_transformers(saved, splits):
    _, source, _, ids, reference = saved
    pipe = InProcessPipeline(source, splits, block_size=4)
    head = 3
    for pos, logits in enumerate(pipe.decoded(ids, head), start=head):
        assert max_error(logits, reference[pos]) <= TOLERANCE, pos


@pytest.mark.parametrize("splits", list(SPLITS.values()), ids=list(SPLITS))
def test_requests_of_different_lengths_decode_together_as_transformers(saved, splits):
    """Three requests prefilled together, then decoded in one batch while their lengths
    straddle the window; a fourth, prefilled alone, joins at step 5 with its second chunk (a
    prefill over a past) in the same micro-batch as the others' decode, then decodes too."""
    _, source, model, _, _ = saved
    pipe = InProcessPipeline(source, splits, block_size=4)
    seqs = {rid: prompt(26, seed) for seed, rid in enumerate("abcd", start=10)}
    refs = {rid: reference_logits(model, ids) for rid, ids in seqs.items()}
    pos = {"a": 0, "b": 0, "c": 0, "d": 0}

    def step(new: dict[str, int]) -> None:
        """Feeds each request `new[rid]` more tokens in one micro-batch; checks the logits of
        each one's last."""
        batch = list(new)
        starts, counts = [pos[r] for r in batch], [new[r] for r in batch]
        tokens = torch.cat([seqs[r][s : s + n] for r, s, n in zip(batch, starts, counts, strict=True)])
        logits = pipe.step(batch, starts, counts, tokens)
        for row, rid in enumerate(batch):
            pos[rid] += new[rid]
            assert max_error(logits[row], refs[rid][pos[rid] - 1]) <= TOLERANCE, (rid, pos[rid] - 1)

    step({"a": 3, "b": 7, "c": 12})
    step({"d": 4})
    for i in range(14):
        step({"a": 1, "b": 1, "c": 1} | ({"d": 11} if i == 5 else {"d": 1} if i > 5 else {}))
    assert pos == {"a": 17, "b": 21, "c": 26, "d": 23}


# ---- the comparisons can fail ------------------------------------------------------------------
def logits_with(source, arch, ids: torch.Tensor) -> torch.Tensor:
    pipe = InProcessPipeline(dataclasses.replace(source, arch=arch), SPLITS["2-stage"], block_size=4)
    return pipe.step(["r"], [0], [len(ids)], ids, all_rows=True)


def test_ignoring_the_window_differs_from_transformers_past_it(saved):
    _, source, _, ids, reference = saved
    full = dataclasses.replace(source.arch, sliding_window=None, sliding_layers=())
    logits = logits_with(source, full, ids)
    # Up to the window's length the window hides nothing; after it, full attention sees more.
    assert max_error(logits[:WINDOW], reference[:WINDOW]) <= TOLERANCE
    assert max_error(logits[WINDOW:], reference[WINDOW:]) > 1e-2


def test_sliding_the_wrong_layers_differs_from_transformers(saved):
    # The other layers slide, these do not: for a Mistral, none slides.
    _, source, _, ids, reference = saved
    others = tuple(i for i in range(SHAPE["num_hidden_layers"]) if i not in source.arch.sliding_layers)
    window = source.arch.sliding_window if others else None
    wrong = dataclasses.replace(source.arch, sliding_window=window, sliding_layers=others)
    assert max_error(logits_with(source, wrong, ids), reference) > 1e-2


# ---- the masks ---------------------------------------------------------------------------------
def kv_cache(layers: range = range(0, 1)) -> PagedKVCache:
    return PagedKVCache(KVCacheSpec(4, 1, 8), layers, 32)


def test_a_query_attends_the_window_positions_up_to_itself():
    """window 3: position i attends i-2, i-1 and i (i - j < 3), not i-3."""
    meta = build_attention_metadata(kv_cache(), ["r"], [0], [6], window=3)
    mask = meta.prefills[0].window_mask
    i, j = torch.arange(6).unsqueeze(1), torch.arange(6).unsqueeze(0)
    assert torch.equal(mask, (j <= i) & (i - j < 3))
    assert mask.sum(dim=1).tolist() == [1, 2, 3, 3, 3, 3]


def test_a_chunk_over_a_past_gathers_only_what_its_window_reaches():
    kv = kv_cache()
    build_attention_metadata(kv, ["r"], [0], [10], window=3)
    span = build_attention_metadata(kv, ["r"], [10], [4], window=3).prefills[0]
    # queries 10..13 reach back to position 8
    assert torch.equal(span.window_slots, kv.slots("r", torch.arange(8, 14)))
    q, k = torch.arange(10, 14).unsqueeze(1), torch.arange(8, 14).unsqueeze(0)
    assert torch.equal(span.window_mask, (k <= q) & (q - k < 3))


def test_decode_gathers_each_requests_last_window():
    kv = kv_cache()
    build_attention_metadata(kv, ["long", "short"], [0, 0], [9, 2], window=4)
    meta = build_attention_metadata(kv, ["long", "short"], [9, 2], [1, 1], window=4)
    assert torch.equal(meta.window_decode_slots[0], kv.slots("long", torch.arange(6, 10)))
    assert torch.equal(meta.window_decode_slots[1, :3], kv.slots("short", torch.arange(0, 3)))
    assert meta.window_decode_bias[0, :, 0].tolist() == [[0, 0, 0, 0], [0, 0, 0, float("-inf")]]


def test_nothing_extra_is_built_without_a_window_or_where_it_does_not_bind():
    kv = kv_cache()
    for window in (None, 16):
        meta = build_attention_metadata(kv, [f"p{window}", f"q{window}"], [0, 0], [10, 1], window=window)
        assert meta.window_decode_slots is None and meta.window_decode_bias is None
        assert meta.prefills[0].window_mask is None and meta.prefills[0].window_slots is None


def test_a_sliding_layer_refuses_metadata_built_without_its_window(saved):
    _, source, _, ids, _ = saved
    arch = source.arch
    layer = arch.sliding_layers[0]
    stage = LlamaStage.from_weights(arch, 0, arch.n_layers, load_stage_weights(source, 0, arch.n_layers))
    kv = PagedKVCache(KVCacheSpec(4, arch.n_kv_heads, arch.head_dim), stage.layer_range, 16)
    meta = build_attention_metadata(kv, ["r"], [0], [len(ids)])
    with pytest.raises(RuntimeError, match=f"layer {layer} attends a sliding window"):
        stage(ids, meta, kv)


# ---- reading configs as transformers does ------------------------------------------------------
BASE = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
    "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128, "hidden_act": "silu",
}


def write_config(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(b"")
    return directory


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "mistral", "sliding_window": 16},
        {"model_type": "mistral", "sliding_window": None},
        {"model_type": "mistral"},  # MistralConfig's 4096: longer than the context
        {"model_type": "mistral", "sliding_window": 16, "layer_types": ["full_attention"] * 4},  # ignored
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 2},
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16},  # max_window_layers 28
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0},
        {"model_type": "qwen2", "use_sliding_window": False, "sliding_window": 16, "max_window_layers": 0},
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 16, "max_window_layers": 0,
         "layer_types": ["full_attention", "sliding_attention", "attention", "sliding_attention"]},
        {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 128, "max_window_layers": 0},
        {"model_type": "llama", "sliding_window": 16},  # LlamaConfig has no window
    ],
    ids=["mistral", "mistral-no-window", "mistral-default-window", "mistral-layer-types",
         "qwen2-max-window-layers", "qwen2-default-max-window-layers", "qwen2-all-layers",
         "qwen2-window-off", "qwen2-layer-types", "qwen2-window-of-the-context", "llama"],
)
def test_the_window_and_its_layers_are_read_as_transformers_reads_them(tmp_path, config):
    directory = write_config(tmp_path / "model", {**BASE, **config})
    arch = resolve_model(str(directory)).arch
    theirs = transformers.AutoConfig.from_pretrained(directory)
    window = getattr(theirs, "sliding_window", None)
    if config["model_type"] == "mistral":
        sliding = tuple(range(BASE["num_hidden_layers"])) if window is not None else ()
    else:
        types = getattr(theirs, "layer_types", None) or ["full_attention"] * BASE["num_hidden_layers"]
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    if window is None or not sliding or window >= BASE["max_position_embeddings"]:
        # no layer slides, or no query within the context reaches past the window: full attention
        window, sliding = None, ()
    assert (arch.sliding_window, arch.sliding_layers) == (window, sliding)
    assert arch.max_context == BASE["max_position_embeddings"]


@pytest.mark.parametrize(
    "config,named",
    [
        ({"use_sliding_window": False, "layer_types": ["sliding_attention"] + ["full_attention"] * 3},
         "layer_types names sliding_attention layers but the window is off"),
        ({"use_sliding_window": True, "sliding_window": 16,
          "layer_types": ["chunked_attention"] + ["full_attention"] * 3}, "['chunked_attention']"),
        ({"use_sliding_window": True, "sliding_window": 16, "layer_types": ["full_attention"] * 3},
         "names 3 layers for num_hidden_layers 4"),
        ({"use_sliding_window": True, "sliding_window": 0, "max_window_layers": 0}, "sliding_window 0"),
    ],
    ids=["window-off-with-sliding-layers", "chunked-attention", "layer-count", "zero-window"],
)
def test_a_window_that_is_not_run_is_refused(tmp_path, config, named):
    directory = write_config(tmp_path / "model", {**BASE, "model_type": "qwen2", **config})
    with pytest.raises(ValueError, match="not supported|does not run") as refusal:
        resolve_model(str(directory))
    assert named in str(refusal.value)


def test_the_window_survives_the_catalog_round_trip(saved):
    from cost_models.model_catalog import arch_from_dict

    arch = saved[1].arch
    assert arch_from_dict(arch.to_dict()) == arch
