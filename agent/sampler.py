"""Token sampling on the last stage: greedy at temperature 0, else temperature + top-p.

Each request with a seed gets its own generator, so its tokens do not depend on which other
requests share its micro-batch, nor on how the model is split.
"""

from __future__ import annotations

from typing import Any

import torch


class Sampler:
    def __init__(self) -> None:
        self._generators: dict[str, torch.Generator] = {}

    def _generator(self, request_id: str, seed: int | None) -> torch.Generator:
        gen = self._generators.get(request_id)
        if gen is None:
            gen = torch.Generator()
            gen.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
            self._generators[request_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, request_ids: list[str], params: list[dict[str, Any]]) -> list[int]:
        """Returns one token id per row of `logits` [N, V] (float32)."""
        tokens = torch.argmax(logits, dim=-1).tolist()
        for row, (rid, p) in enumerate(zip(request_ids, params, strict=True)):
            temperature = float(p.get("temperature", 0.0))
            if temperature <= 0.0:
                continue
            probs = torch.softmax(logits[row] / temperature, dim=-1)
            top_p = float(p.get("top_p", 1.0))
            if top_p < 1.0:
                sorted_probs, order = torch.sort(probs, descending=True)
                # keep the smallest prefix whose mass reaches top_p (always at least one token)
                drop = sorted_probs.cumsum(0) - sorted_probs >= top_p
                sorted_probs[drop] = 0.0
                probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
            tokens[row] = int(torch.multinomial(probs, 1, generator=self._generator(rid, p.get("seed"))))
        return tokens

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
