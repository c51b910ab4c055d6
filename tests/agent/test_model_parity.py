"""The stage-split model against transformers on the same GGUF (fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.agent.stage_runner import InProcessPipeline

PROMPT = "The capital of France is Paris. The capital of Germany is"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def prompt_ids(hf_tokenizer) -> list[int]:
    return hf_tokenizer(PROMPT)["input_ids"]


@pytest.fixture(scope="module")
def reference_logits(hf_model, prompt_ids) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(torch.tensor([prompt_ids])).logits[0].float()


@pytest.mark.parametrize(
    "splits",
    [
        [(0, 30)],
        [(0, 15), (15, 30)],
        [(0, 7), (7, 20), (20, 30)],
        [(0, 6), (6, 12), (12, 18), (18, 24), (24, 30)],
    ],
    ids=["1-stage", "2-stage", "3-stage", "5-stage"],
)
def test_logits_match_transformers(model_source, prompt_ids, reference_logits, splits):
    pipe = InProcessPipeline(model_source, splits)
    n = len(prompt_ids)
    logits = pipe.step(["r"], [0], [n], torch.tensor(prompt_ids), all_rows=True)
    assert logits.shape == reference_logits.shape
    assert (logits - reference_logits).abs().max().item() <= TOLERANCE


def test_decode_with_paged_cache_matches_full_forward(model_source, prompt_ids, reference_logits):
    """Prefill most of the prompt, then feed the rest one token at a time through the cache."""
    pipe = InProcessPipeline(model_source, [(0, 12), (12, 30)], block_size=4)
    head = len(prompt_ids) - 3
    for pos, logits in enumerate(pipe.decoded(torch.tensor(prompt_ids), head), start=head):
        assert (logits - reference_logits[pos]).abs().max().item() <= TOLERANCE


def test_mixed_batch_of_prefill_and_decode(model_source, prompt_ids, reference_logits):
    """Requests of different lengths and phases share one micro-batch without crosstalk."""
    pipe = InProcessPipeline(model_source, [(0, 30)], block_size=4)
    n = len(prompt_ids)
    pipe.step(["a"], [0], [n - 1], torch.tensor(prompt_ids[:-1]))
    pipe.step(["b"], [0], [n - 4], torch.tensor(prompt_ids[: n - 4]))
    tokens = torch.tensor([prompt_ids[-1], *prompt_ids[n - 4 :], prompt_ids[0]])
    logits = pipe.step(["a", "b", "c"], [n - 1, n - 4, 0], [1, 4, 1], tokens)
    assert (logits[0] - reference_logits[n - 1]).abs().max().item() <= TOLERANCE
    assert (logits[1] - reference_logits[n - 1]).abs().max().item() <= TOLERANCE
    assert (logits[2] - reference_logits[0]).abs().max().item() <= TOLERANCE


def test_kv_export_import_round_trip_gives_identical_logits(model_source, prompt_ids):
    """A stage's cache, exported and imported into another stage's cache, serves the same next token."""
    n = len(prompt_ids)
    src = InProcessPipeline(model_source, [(0, 10), (10, 30)], block_size=4)
    src.step(["r"], [0], [n - 1], torch.tensor(prompt_ids[:-1]))
    dst = InProcessPipeline(model_source, [(0, 10), (10, 30)], block_size=4)
    # Fill dst with an unrelated request first so the imported blocks land at other slots.
    dst.step(["other"], [0], [5], torch.tensor(prompt_ids[:5]))
    for stage, src_kv, dst_kv in zip(src.stages, src.caches, dst.caches, strict=True):
        exported = src_kv.export("r", stage.layer_range, range(0, n - 1))
        dst_kv.import_("moved", stage.layer_range, range(0, n - 1), exported)
        assert dst_kv.block_tables["moved"] != src_kv.block_tables["r"]
    expected = src.step(["r"], [n - 1], [1], torch.tensor([prompt_ids[-1]]))
    got = dst.step(["moved"], [n - 1], [1], torch.tensor([prompt_ids[-1]]))
    assert torch.equal(expected, got)
