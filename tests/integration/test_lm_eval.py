"""A client no one here wrote: lm-evaluation-harness runs a loglikelihood task and a
generate-until task (local files, tests/data/lm_eval_tasks) with its `local-completions` model
against a real `pipeshift serve` on 2 stages, and with its `hf` model on transformers' float32
model of the same GGUF. `local-completions` sends token ids; it asks for loglikelihoods as
`{"echo": true, "logprobs": 1, "max_tokens": 1}` and reads them from the prompt's logprobs.
Scores, each document's choice and lm-eval's is-greedy flags must be equal, the
loglikelihoods within 1e-4 per token. bench/lm_eval_parity.py prints the same comparison as a table.
"""

from __future__ import annotations

import pytest

from bench.lm_eval_parity import (
    OFFLINE_ENVIRONMENT,
    TASKS,
    compare,
    document_choice,
    evaluate,
    hf_lm,
    loglikelihoods,
    served_lm,
)
from bench.serve_process import ServeProcess

pytestmark = pytest.mark.slow
pytest.importorskip("lm_eval")
TOLERANCE = 1e-4


@pytest.fixture(scope="module", autouse=True)
def _offline():
    """The tasks, the model and the tokenizer are local files: nothing may try the Hub."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in OFFLINE_ENVIRONMENT.items():
            patch.setenv(name, value)
        yield


@pytest.fixture(scope="module")
def hf_evaluation(hf_model, hf_tokenizer):
    return evaluate(hf_lm(hf_model, hf_tokenizer))


@pytest.fixture(scope="module")
def served_evaluation(hf_tokenizer, tmp_path_factory):
    tokenizer_dir = tmp_path_factory.mktemp("gguf-tokenizer")
    hf_tokenizer.save_pretrained(str(tokenizer_dir))
    with ServeProcess("--devices", "2") as server:
        # Batches of 4 prompts per request: lm-eval's batch path, answered in index order.
        return evaluate(served_lm(server.base_url, tokenizer_dir, batch_size=4))


def test_scores_are_equal(hf_evaluation, served_evaluation):
    rows = compare(hf_evaluation, served_evaluation)
    assert {(r.task, r.metric) for r in rows} == {
        ("pipeshift_facts", "acc"), ("pipeshift_facts", "acc_norm"),
        ("pipeshift_short_answers", "exact_match"),
    }
    for r in rows:
        assert 0 < r.hf < 1, f"{r.task} {r.metric} = {r.hf}: the task cannot tell models apart"
        assert r.pipeshift == r.hf, r


def test_every_document_chooses_the_same(hf_evaluation, served_evaluation):
    for task in TASKS:
        theirs = {s["doc_id"]: s for s in hf_evaluation.samples[task]}
        ours = {s["doc_id"]: s for s in served_evaluation.samples[task]}
        assert ours.keys() == theirs.keys() and len(ours) >= 8
        for doc_id, sample in theirs.items():
            assert document_choice(ours[doc_id]) == document_choice(sample), (task, doc_id)
            for metric in hf_evaluation.scores[task]:
                assert ours[doc_id][metric] == sample[metric], (task, doc_id, metric)


def test_loglikelihoods_and_greedy_flags_agree(hf_evaluation, served_evaluation, hf_tokenizer):
    theirs = {s["doc_id"]: s for s in hf_evaluation.samples["pipeshift_facts"]}
    ours = {s["doc_id"]: s for s in served_evaluation.samples["pipeshift_facts"]}
    greedy = 0
    for doc_id, sample in theirs.items():
        expected, got = loglikelihoods(sample), loglikelihoods(ours[doc_id])
        assert len(got) == len(expected) == 4
        # A choice's loglikelihood sums its tokens' logprobs, each within TOLERANCE.
        question, choices = sample["doc"]["question"], sample["doc"]["choices"]
        lengths = [len(hf_tokenizer(f"{question} {c}").input_ids) - len(hf_tokenizer(question).input_ids)
                   for c in choices]
        for a, b, n in zip(expected, got, lengths, strict=True):
            assert abs(a - b) <= TOLERANCE * n, (doc_id, a, b, n)
        # is_greedy: whether every continuation token was the most likely one; the server's
        # comes from echo's top_logprobs, so a token's logprob must equal its top entry.
        flags = [bool(a[1]) for a in sample["filtered_resps"]]
        assert [bool(a[1]) for a in ours[doc_id]["filtered_resps"]] == flags, doc_id
        greedy += sum(flags)
    assert greedy > 0  # some continuations are greedy, so the flag is checked both ways
