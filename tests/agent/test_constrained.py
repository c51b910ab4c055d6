"""Constrained decoding on the last stage: JSON schemas as llguidance grammars over SmolLM2's
real tokenizer, masks applied by the sampler, matchers rebuilt from a request's tokens."""

from __future__ import annotations

import json

import pytest
import torch

from agent.constrained import (
    ANY_OBJECT,
    GrammarMatchers,
    InvalidSchema,
    json_schema_grammar,
)
from agent.sampler import Sampler
from agent.tokenizer import Tokenizer

jsonschema_rs = pytest.importorskip("jsonschema_rs")

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "role", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def tokenizer(gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf_path)


@pytest.fixture(scope="module")
def grammars(tokenizer) -> GrammarMatchers:
    """One worker's matchers with the tokenizer built once (the slow part, about 1 s)."""
    matchers = GrammarMatchers()
    matchers.use_tokenizer(tokenizer)
    return matchers


def _sampler(grammars: GrammarMatchers) -> Sampler:
    """A fresh sampler sharing the tokenizer (as a second worker would build its own)."""
    fresh = GrammarMatchers()
    fresh._tokenizer, fresh._eos = grammars._tokenizer, grammars._eos  # noqa: SLF001
    return Sampler(fresh)


def _generate(sampler: Sampler, rid: str, params: dict, vocab: int, eos: int, seed: int,
              max_steps: int = 200) -> list[int]:
    """Returns the tokens chosen under `params` for random logits, until EOS."""
    gen = torch.Generator().manual_seed(seed)
    out: list[int] = []
    for _ in range(max_steps):
        logits = torch.randn(1, vocab, generator=gen) * 3
        token = sampler.choose(logits, [rid], [{**params, "output_ids": list(out)}])[0].token
        out.append(token)
        if token == eos:
            return out
    raise AssertionError(f"no EOS after {max_steps} tokens: {out}")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_random_logits_under_a_schema_always_give_valid_json(tokenizer, grammars, temperature):
    """Whatever the model prefers, the masked answer parses and validates, and ends with EOS
    only once the document is complete."""
    sampler = _sampler(grammars)
    grammar = json_schema_grammar(PERSON)
    validator = jsonschema_rs.validator_for(PERSON)
    eos = tokenizer.eos_token_id
    for seed in range(4):
        params = {"temperature": temperature, "top_p": 1.0, "seed": seed, "grammar": grammar}
        ids = _generate(sampler, f"r{seed}", params, tokenizer.vocab_size, eos, seed)
        assert ids[-1] == eos and eos not in ids[:-1]
        document = json.loads(tokenizer.decode(ids[:-1]))
        validator.validate(document)
        assert tokenizer.decode(ids[:-1]) == json.dumps(document, ensure_ascii=False)  # its layout


def test_json_object_gives_an_object(tokenizer, grammars):
    sampler = _sampler(grammars)
    params = {"temperature": 0.0, "grammar": json_schema_grammar(ANY_OBJECT)}
    gen = torch.Generator().manual_seed(0)
    # random logits, with the tokens that can close an object nudged up after a few steps
    closing = [tokenizer.encode(t, add_special_tokens=False)[0] for t in ('"', '":', " ", "1", "}")]
    out: list[int] = []
    for step in range(60):
        logits = torch.randn(1, tokenizer.vocab_size, generator=gen)
        if step > 5:
            logits[0, [*closing, tokenizer.eos_token_id]] += 50.0
        token = sampler.choose(logits, ["obj"], [{**params, "output_ids": list(out)}])[0].token
        out.append(token)
        if token == tokenizer.eos_token_id:
            break
    assert out[-1] == tokenizer.eos_token_id, tokenizer.decode(out)
    assert isinstance(json.loads(tokenizer.decode(out[:-1])), dict)


def test_eos_is_allowed_only_where_the_document_is_complete(tokenizer, grammars):
    grammar = json_schema_grammar({"type": "object", "properties": {"a": {"type": "integer"}},
                                   "required": ["a"], "additionalProperties": False})
    ids = tokenizer.encode('{"a": 42}', add_special_tokens=False)
    eos = tokenizer.eos_token_id
    for k in range(len(ids) + 1):
        allowed = grammars.allowed("eos", grammar, ids[:k], tokenizer.vocab_size)
        assert bool(allowed[eos]) == (k == len(ids)), k
        if k < len(ids):
            assert allowed[ids[k]], k
    assert grammars.allowed("eos", grammar, ids, tokenizer.vocab_size).sum() == 1  # EOS alone


def test_a_moved_last_stage_rebuilds_the_matcher_from_the_output(tokenizer, grammars):
    """Worker B, which never saw the request, continues it exactly as worker A would: its
    matcher is rebuilt by replaying the tokens so far; a cache out of step is rebuilt too."""
    grammar = json_schema_grammar(PERSON)
    params = {"temperature": 1.0, "top_p": 1.0, "seed": 3, "grammar": grammar}
    a, b = _sampler(grammars), _sampler(grammars)
    whole = _generate(a, "moving", params, tokenizer.vocab_size, tokenizer.eos_token_id, seed=3)
    a.forget(["moving"])
    for k in (0, 5, len(whole) - 1):
        prefix = whole[:k]
        expected = grammars.allowed(f"ref{k}", grammar, prefix, tokenizer.vocab_size)
        assert torch.equal(b.grammars.allowed("moving", grammar, prefix, tokenizer.vocab_size), expected)
    # the prefixes went 0 -> 5 (in step) -> len - 1 (in step); now back to 3: out of step
    assert b.grammars.rebuilds == 0
    three = b.grammars.allowed("moving", grammar, whole[:3], tokenizer.vocab_size)
    assert b.grammars.rebuilds == 1
    assert torch.equal(three, grammars.allowed("ref3", grammar, whole[:3], tokenizer.vocab_size))
    c = _sampler(grammars)
    c.grammars.allowed("moving", grammar, whole[:7], tokenizer.vocab_size)  # mid-answer, new worker
    assert c.grammars.rebuilds == 1


def test_each_distinct_schema_is_compiled_once(tokenizer, grammars):
    matchers = _sampler(grammars).grammars
    first, second = json_schema_grammar(PERSON), json_schema_grammar(ANY_OBJECT)
    for rid in ("a", "b", "c"):
        matchers.allowed(rid, first, [], tokenizer.vocab_size)
    matchers.allowed("d", second, [], tokenizer.vocab_size)
    assert matchers.compiled_grammars == 2


def test_logprobs_under_a_grammar_list_only_allowed_tokens(tokenizer, grammars):
    sampler = _sampler(grammars)
    grammar = json_schema_grammar({"enum": ["yes", "no"]})
    logits = torch.randn(1, tokenizer.vocab_size, generator=torch.Generator().manual_seed(1))
    sampled = sampler.choose(logits, ["lp"], [{"temperature": 0.0, "grammar": grammar,
                                               "output_ids": [], "logprobs": 5}])[0]
    allowed = grammars.allowed("lp-ref", grammar, [], tokenizer.vocab_size)
    assert allowed[sampled.token]
    assert sampled.top and all(allowed[t] for t, _ in sampled.top)
    assert sampled.logprob == sampled.top[0][1]
    assert len(sampled.top) == min(5, int(allowed.sum()))  # no -inf entries


@pytest.mark.parametrize(
    ("schema", "reason"),
    [
        ({"type": "strin"}, "Invalid type: strin"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "/$defs/missing"),
        ({"anyOf": []}, "anyOf is empty"),
    ],
)
def test_a_schema_the_library_cannot_use_is_refused_with_its_reason(schema, reason):
    with pytest.raises(InvalidSchema, match=reason.replace("$", r"\$").replace("(", r"\(").replace(")", r"\)")):
        json_schema_grammar(schema)
