"""Token sampling on the last stage: a JSON grammar's mask, logit bias and penalties, then greedy
at temperature 0, else temperature + top-p; and the log-probabilities a request asks for.

Each request with a seed gets its own generator, so its tokens do not depend on which other
requests share its micro-batch, nor on how the model is split.

The logits of a row are processed in float32, in vLLM's order:
  0. `grammar` (a `response_format` JSON schema, agent/constrained.py): `logits[t] = -inf` for
     every token t the grammar does not allow after the output so far; EOS is allowed only where
     the JSON document is complete. vLLM applies its grammar bitmask before the sampler's bias
     and penalties too; as they only add to, scale or subtract from a logit, -inf stays -inf;
  1. `logit_bias`: `logits[t] += bias[t]`;
  2. `repetition_penalty` r (vLLM's extension), for every token t seen in the prompt or the
     output so far: `logits[t] /= r` where it is positive, `logits[t] *= r` otherwise;
  3. `frequency_penalty` f and `presence_penalty` p, by the output's token counts c[t]:
     `logits[t] -= f * c[t] + p * (c[t] > 0)`.
Greedy decoding takes the argmax of these logits; sampling divides them by the temperature,
then (vLLM's order) keeps the tokens at least `min_p` times as likely as the most likely one,
the `top_k` most likely, and the top-p nucleus of what is left. Log-probabilities are `log_softmax` of the processed logits,
before temperature and top-p (so they equal the model's own when no bias or penalty is set),
and a token's logprob and its entry among the top ones are the same float32 number. Under a
grammar they are those of the masked logits (a disallowed token's is -inf, and is not listed
among the top ones).

A request's parameters are a dict (JSON from the engine): temperature, top_p, seed, and only
when set: top_k, min_p, logit_bias [[token, bias], ...], presence_penalty, frequency_penalty,
repetition_penalty, output_ids (the tokens generated so far, for the penalties and the grammar),
prompt_ids (for the repetition penalty), logprobs (how many top alternatives to list; 0: only the
chosen token's logprob), grammar (the grammar text of a JSON schema). The grammar matcher of a
request is a per-worker cache, rebuilt from output_ids when the last stage moved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from agent.constrained import GrammarMatchers


@dataclass
class Sampled:
    """The token chosen for one request, with its logprob and the top ones when asked for."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None  # (token, logprob), most likely first

    def to_json(self) -> list[Any]:
        """Returns [token, logprob, [[token, logprob], ...]] (what travels to the engine)."""
        return [self.token, self.logprob, [list(t) for t in self.top or []]]


def process_logits(
    logits: torch.Tensor, params: dict[str, Any], allowed: torch.Tensor | None = None
) -> torch.Tensor:
    """Returns a float32 copy of one row of logits [V] with the grammar's mask (`allowed`, bool
    [V]), logit bias and penalties applied."""
    out = logits.detach().to(torch.float32).clone()
    if allowed is not None:
        out.masked_fill_(~allowed, float("-inf"))
    bias = params.get("logit_bias")
    if bias:
        ids = torch.tensor([int(t) for t, _ in bias], dtype=torch.int64)
        out.index_add_(0, ids, torch.tensor([float(b) for _, b in bias], dtype=torch.float32))
    repetition = float(params.get("repetition_penalty", 1.0))
    output_ids = params.get("output_ids") or []
    if repetition != 1.0:
        seen = torch.zeros_like(out, dtype=torch.bool)
        seen_ids = [*(params.get("prompt_ids") or []), *output_ids]
        if seen_ids:
            seen[torch.tensor(seen_ids, dtype=torch.int64)] = True
        penalised = torch.where(out > 0, out / repetition, out * repetition)
        out = torch.where(seen, penalised, out)
    frequency = float(params.get("frequency_penalty", 0.0))
    presence = float(params.get("presence_penalty", 0.0))
    if output_ids and (frequency or presence):
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.int64), minlength=out.shape[0])
        counts = counts[: out.shape[0]].to(torch.float32)
        out -= frequency * counts + presence * (counts > 0).to(torch.float32)
    return out


def needs_processing(params: dict[str, Any]) -> bool:
    return bool(
        params.get("grammar")
        or params.get("logit_bias")
        or float(params.get("repetition_penalty", 1.0)) != 1.0
        or float(params.get("frequency_penalty", 0.0))
        or float(params.get("presence_penalty", 0.0))
    )


class Sampler:
    def __init__(self, grammars: GrammarMatchers | None = None) -> None:
        self._generators: dict[str, torch.Generator] = {}
        # The worker gives it a loader of the model's tokenizer (agent/worker.py).
        self.grammars = grammars or GrammarMatchers()

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator()
            gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self._generators[request_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[dict[str, Any]]) -> list[int]:
        """Returns one token id per row of `logits` [N, V] (float32)."""
        return [s.token for s in self.choose(logits, request_ids, params)]

    def choose(self, logits: torch.Tensor, request_ids: list[str], params: list[dict[str, Any]]) -> list[Sampled]:
        """Returns the token of each row of `logits` [N, V], with logprobs where asked for."""
        logits = logits.to(torch.float32)
        greedy = torch.argmax(logits, dim=-1).tolist()  # one pass for the plain greedy rows
        out = []
        for i, (rid, p) in enumerate(zip(request_ids, params, strict=True)):
            processed = needs_processing(p)
            allowed = None
            if p.get("grammar"):
                allowed = self.grammars.allowed(rid, p["grammar"], p.get("output_ids") or [], logits.shape[-1])
            row = process_logits(logits[i], p, allowed) if processed else logits[i]
            sampling = float(p.get("temperature", 0.0)) > 0.0
            token = self._pick(row, rid, p) if processed or sampling else greedy[i]
            sampled = Sampled(token)
            if p.get("logprobs") is not None:
                logprobs = torch.log_softmax(row, dim=-1)
                sampled.logprob = float(logprobs[token])
                k = int(p["logprobs"])
                if k > 0:
                    values, ids = torch.topk(logprobs, k)
                    sampled.top = [(t, v) for t, v in zip(ids.tolist(), values.tolist(), strict=True)
                                   if v != float("-inf")]
            out.append(sampled)
        return out

    def _pick(self, row: torch.Tensor, request_id: str, p: dict[str, Any]) -> int:
        temperature = float(p.get("temperature", 0.0))
        if temperature <= 0.0:
            return int(torch.argmax(row))
        probs = torch.softmax(row / temperature, dim=-1)
        min_p = float(p.get("min_p", 0.0))
        if min_p > 0.0:
            probs = torch.where(probs >= min_p * probs.max(), probs, 0.0)
        top_k = int(p.get("top_k", 0))
        if 0 < top_k < probs.shape[0]:
            probs = torch.where(probs >= torch.topk(probs, top_k).values[-1], probs, 0.0)
        if min_p > 0.0 or top_k > 0:
            probs = probs / probs.sum()  # top-p's mass is that of what is left
        top_p = float(p.get("top_p", 1.0))
        if top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        return int(torch.multinomial(probs, 1, generator=self._generator(request_id, p.get("seed"))))

    def export_states(self, request_ids: list[str]) -> dict[str, torch.Tensor]:
        """Returns the generator state of each request that has one (a seeded or sampled
        request whose last stage moves takes its random stream along)."""
        return {rid: self._generators[rid].get_state() for rid in request_ids if rid in self._generators}

    def import_state(self, request_id: str, state: torch.Tensor) -> None:
        gen = torch.Generator()
        gen.set_state(state)
        self._generators[request_id] = gen

    def forget(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._generators.pop(rid, None)
        self.grammars.forget(request_ids)
