"""Constrained decoding: `response_format` JSON schemas as grammars, and the token masks they allow.

The grammar library is llguidance (Rust, with a Python binding): it compiles a JSON Schema into a
grammar and, for a request's tokens so far, says which next tokens keep the output a prefix of a
valid document; EOS is allowed only where the document is complete.

Two halves, on the two sides of the pipeline:
  * the gateway turns a request's JSON schema into a grammar text (`json_schema_grammar`),
    refusing one the library cannot use with the library's own reason (a 400 there); the text
    travels to the last stage in the request's sampling parameters;
  * the last stage keeps one matcher per request (`GrammarMatchers`), in step with the tokens
    the request has generated, and masks the logits with it (agent/sampler.py). A matcher is
    only a cache: the engine sends the request's `output_ids` with every constrained step, and
    a matcher that is missing (the last stage moved to another worker in a reconfiguration) or
    out of step is rebuilt by replaying them, so nothing of a request lives only on one worker.

The grammar's tokenizer is the one the gateway uses (agent/tokenizer.py: the GGUF's byte-level
BPE, or a model directory's tokenizer.json), handed to llguidance as `tokenizers` JSON, so token
ids and their bytes agree on both sides. Each distinct grammar is compiled once per worker;
a request's matcher is a copy of the compiled one.

JSON is generated in one line with json.dumps' separators (", " and ": "): no free whitespace
between tokens, so a small model cannot spend its tokens on newlines and indentation.
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np
import torch

if TYPE_CHECKING:
    from agent.tokenizer import Tokenizer

log = logging.getLogger(__name__)

# How JSON is laid out: json.dumps' separators, no free whitespace (see the module docstring).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# The schema `{"type": "json_object"}` stands for: any JSON object.
ANY_OBJECT: dict[str, Any] = {"type": "object"}
MAX_COMPILED_GRAMMARS = 64  # distinct grammars a worker keeps compiled (least recently used go)


class InvalidSchema(ValueError):
    """The grammar library cannot constrain output to this JSON schema; the message says why."""


def json_schema_grammar(schema: dict[str, Any]) -> str:
    """Returns the grammar text of `schema` (what the last stage compiles); raises InvalidSchema
    with the library's reason when the schema is invalid or uses what it cannot enforce."""
    # Key order is kept: properties are generated in the schema's order.
    return _grammar_of(json.dumps(schema, separators=(",", ":")))


@lru_cache(maxsize=256)
def _grammar_of(schema_json: str) -> str:
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_json, overrides=JSON_LAYOUT)
    except ValueError as exc:
        raise InvalidSchema(str(exc)) from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidSchema(messages[0] if messages else "the schema cannot be compiled")
    return grammar


def grammar_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """Returns llguidance's view of `tokenizer`: the same `tokenizers` model, vocabulary and EOS."""
    return llguidance.LLTokenizer(
        tokenizer.backend.to_str(), n_vocab=tokenizer.vocab_size, eos_token=tokenizer.eos_token_id
    )


def allowed_tokens(matcher: llguidance.LLMatcher, vocab_size: int) -> torch.Tensor:
    """Returns a bool [vocab_size] mask of the tokens `matcher` allows next (ids beyond the
    grammar's vocabulary are never allowed)."""
    words = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
    # Bit i of 32-bit word w allows token 32 w + i; little-endian bytes keep that order.
    bits = np.unpackbits(words, bitorder="little")[:vocab_size]
    mask = np.zeros(vocab_size, dtype=bool)
    mask[: bits.shape[0]] = bits.astype(bool)
    return torch.from_numpy(mask)


@dataclass
class _RequestMatcher:
    grammar: str
    matcher: llguidance.LLMatcher
    consumed: list[int] = field(default_factory=list)  # the output tokens it has consumed


class GrammarMatchers:
    """One worker's grammar matchers, one per constrained request, kept in step with its tokens.

    `tokenizer_loader` builds the model's tokenizer on first use (a worker whose requests never
    ask for JSON never pays for it).
    """

    def __init__(self, tokenizer_loader: Callable[[], Tokenizer] | None = None) -> None:
        self._tokenizer_loader = tokenizer_loader
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._eos: int | None = None
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._requests: dict[str, _RequestMatcher] = {}
        self.rebuilds = 0  # matchers built by replaying a request's tokens (moved, or out of step)

    def use_tokenizer(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = grammar_tokenizer(tokenizer)
        self._eos = tokenizer.eos_token_id

    def allowed(self, request_id: str, grammar: str, output_ids: list[int], vocab_size: int) -> torch.Tensor:
        """Returns the bool [vocab_size] mask of the tokens that may follow `output_ids` (the
        request's tokens so far) under `grammar`. Where the grammar allows nothing (the output
        went off it, which a correct pipeline never does) only EOS is allowed, so the answer
        ends rather than continue unconstrained."""
        state = self._in_step(request_id, grammar, output_ids)
        if state.matcher.is_error():
            log.error("request %s left its grammar: %s", request_id, state.matcher.get_error())
            mask = torch.zeros(vocab_size, dtype=torch.bool)
        else:
            mask = allowed_tokens(state.matcher, vocab_size)
        if not bool(mask.any()) and self._eos is not None and self._eos < vocab_size:
            mask[self._eos] = True
        return mask

    def _in_step(self, request_id: str, grammar: str, output_ids: list[int]) -> _RequestMatcher:
        state = self._requests.get(request_id)
        n = len(state.consumed) if state is not None else 0
        if state is None or state.grammar != grammar or output_ids[:n] != state.consumed:
            if state is not None or output_ids:
                self.rebuilds += 1
            state = _RequestMatcher(grammar, self._compile(grammar).deep_copy())
            self._requests[request_id] = state
        new = output_ids[len(state.consumed):]
        if new:
            state.matcher.consume_tokens(list(new))
            state.consumed.extend(new)
        return state

    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        compiled = self._compiled.get(grammar)
        if compiled is not None:
            self._compiled.move_to_end(grammar)
            return compiled
        if self._tokenizer is None:
            if self._tokenizer_loader is None:
                raise RuntimeError("constrained decoding needs the model's tokenizer: none was given")
            self.use_tokenizer(self._tokenizer_loader())
        compiled = llguidance.LLMatcher(self._tokenizer, grammar)
        if compiled.is_error():
            raise InvalidSchema(compiled.get_error())
        self._compiled[grammar] = compiled
        while len(self._compiled) > MAX_COMPILED_GRAMMARS:
            self._compiled.popitem(last=False)
        return compiled

    @property
    def compiled_grammars(self) -> int:
        return len(self._compiled)

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._requests.pop(rid, None)
