"""What the gateway needs from an engine: submit a prompt, stream tokens back, abort.

The gateway (agent/gateway/) only speaks this interface, so the local pipeline engine and
any later one (cluster mode) serve the same OpenAI-compatible API.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens; temperature 0 means greedy."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # vLLM's extension: keep the k most likely tokens; 0 keeps all
    min_p: float = 0.0  # vLLM's extension: drop tokens below min_p x the most likely one's probability
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Applied on the last stage before sampling, in vLLM's order (agent/sampler.py).
    logit_bias: tuple[tuple[int, float], ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0  # vLLM's extension; 1 leaves the logits as they are
    # response_format: the grammar text of a JSON schema (agent/constrained.py), masked on the
    # last stage before the bias and penalties
    grammar: str | None = None
    logprobs: int | None = None  # None: none; k: each token's logprob and the k most likely
    n: int = 1  # sequences per prompt; they share the prompt's prefill and KV blocks
    # None: none; k: each prompt token's logprob (from the same float32 logits, unprocessed)
    # and the k most likely at its position
    prompt_logprobs: int | None = None
    # False: the client set no max_tokens and max_tokens is the server's default, which the
    # engine lowers to what its KV cache holds for the prompt (agent/engine.py fit_default_output)
    max_tokens_asked: bool = True

    def wire(self) -> dict[str, Any]:
        """Returns what the last stage's sampler needs, leaving out what is at its neutral value."""
        out: dict[str, Any] = {"temperature": self.temperature, "top_p": self.top_p, "seed": self.seed}
        if self.top_k:
            out["top_k"] = self.top_k
        if self.min_p:
            out["min_p"] = self.min_p
        if self.logit_bias:
            out["logit_bias"] = [list(b) for b in self.logit_bias]
        for name, neutral in (("presence_penalty", 0.0), ("frequency_penalty", 0.0), ("repetition_penalty", 1.0)):
            if getattr(self, name) != neutral:
                out[name] = getattr(self, name)
        if self.logprobs is not None:
            out["logprobs"] = self.logprobs
        if self.grammar is not None:
            out["grammar"] = self.grammar
        return out

    @property
    def penalises_output(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and, when asked for, the most likely tokens'."""

    token_id: int
    token: str  # the token's text alone
    logprob: float | None  # None only for a prompt's first token, which nothing predicts
    top: tuple[tuple[int, str, float], ...] = ()  # (token id, text, logprob), most likely first


@dataclass
class TokenEvent:
    """One step of a request's stream: new text, and why it ended when it did."""

    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # detokenised text added by these tokens (stop strings already cut)
    finish_reason: str | None = None  # "stop" | "length" | "error" | None while running
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0  # total so far
    logprobs: list[TokenLogprob] | None = None  # one per token id, when the request asked
    index: int = 0  # the choice: prompt position in the batch * n + member
    # With the first event of a choice whose request asked: one entry per prompt token.
    prompt_logprobs: list[TokenLogprob] | None = None


def prompt_batch(prompt_ids: list[int] | list[list[int]]) -> list[list[int]]:
    """Returns `prompt_ids` as a batch: a list of prompts."""
    if prompt_ids and isinstance(prompt_ids[0], list):
        return [list(p) for p in prompt_ids]  # type: ignore[arg-type]
    return [list(prompt_ids)]  # type: ignore[arg-type]


PIPELINE_DOWN = "the pipeline is down"


def pipeline_down(reason: str) -> str:
    """Returns what a request is told when the deployment has lost a stage outside an apply:
    nothing repairs that live, so a retry helps only after a restart."""
    return (f"{PIPELINE_DOWN}: {reason}; it does not recover by itself: retry once GET /health "
            "answers 200 (after its operator restarts `pipeshift serve`)")


class EngineError(Exception):
    """The engine refused or failed a request; `status` says whose fault it was."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param


class Engine(Protocol):
    model_name: str
    max_context: int

    @property
    def max_model_len(self) -> int:
        """The most tokens one request can have now (the context, or what the KV cache holds)."""
        ...

    def encode_prompt(self, prompt: str) -> list[int]: ...

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]: ...

    def decode(self, token_ids: list[int]) -> str: ...

    def generate(
        self, request_id: str, prompt_ids: list[int] | list[list[int]], params: SamplingParams
    ) -> AsyncGenerator[TokenEvent, None]:
        """Streams events until every choice has had one with `finish_reason`. `prompt_ids` is
        one prompt or a batch of prompts; each prompt gets `params.n` choices, and an event's
        `index` names its choice (prompt position * n + member). Closing the generator early
        (aclose, or a cancellation at one of its awaits) aborts the request and frees its KV
        blocks. Raises EngineError before the first event when the request can never be served
        (e.g. prompt + max_tokens exceed the context)."""
        ...

    def health(self) -> tuple[bool, str]: ...

    def stats(self) -> dict[str, float]:
        """Returns numbers for /metrics: `queue_length`, `running`, and `stage_busy_s.<i>`
        (cumulative seconds, only increasing); other keys are exposed as they are."""
        ...
