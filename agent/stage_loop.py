"""The data-plane loop of one stage: receive a micro-batch, run its layers, pass it on.

Messages (JSON header + tensors, see transport.py), all carrying the serving `epoch`:
  step   {mb, ids, start, n_new, sample: {id: params}} + [token ids | hidden states]
  free   {ids}                        release these requests' KV blocks
  result {mb, tokens: {id: token}}    from the last stage back to the engine
  error  {mb, message}                a stage failed this micro-batch; passed on to the engine
"""

from __future__ import annotations

import logging
import time
import traceback

import torch

from agent.attention_metadata import build_attention_metadata
from agent.kv_cache import PagedKVCache
from agent.model import LlamaStage
from agent.sampler import Sampler
from agent.transport import Channel

log = logging.getLogger(__name__)


class StageLoop:
    def __init__(self, stage: LlamaStage, kv: PagedKVCache, inbound: Channel, outbound: Channel, epoch: int):
        self.stage, self.kv = stage, kv
        self.inbound, self.outbound = inbound, outbound
        self.epoch = epoch
        self.sampler = Sampler() if stage.is_last else None
        self.busy_s = 0.0
        self.busy_since: float | None = None
        self.steps = 0

    def run(self) -> None:
        """Serves until a channel fails (a peer died, or the worker is shutting down)."""
        while True:
            header, tensors = self.inbound.recv()
            self.busy_since = time.monotonic()
            try:
                self.handle(header, tensors)
            finally:
                self.busy_s += time.monotonic() - self.busy_since
                self.busy_since = None

    def handle(self, header: dict, tensors: list[torch.Tensor]) -> None:
        op = header["op"]
        if op == "step":
            if header["epoch"] != self.epoch:
                self._pass_error(header, f"stage serves epoch {self.epoch}, got a step of epoch {header['epoch']}")
                return
            try:
                out = self.step(header, tensors[0])
            except Exception as exc:  # report, keep serving: the engine fails this micro-batch
                log.error("step failed: %s", traceback.format_exc())
                self._pass_error(header, f"stage [{self.stage.start}, {self.stage.end}): {exc}")
                return
            self.steps += 1
            if self.stage.is_last:
                self.outbound.send({"op": "result", "epoch": self.epoch, "mb": header["mb"], "tokens": out})
            else:
                self.outbound.send(header, [out])
        elif op == "free":
            for rid in header["ids"]:
                self.kv.free(rid)
            if self.sampler:
                self.sampler.forget(header["ids"])
            else:
                self.outbound.send(header)
        elif op == "error":
            self.outbound.send(header)
        else:
            self._pass_error(header, f"unknown op {op!r}")

    def step(self, header: dict, inputs: torch.Tensor):
        ids, start, n_new = header["ids"], header["start"], header["n_new"]
        meta = build_attention_metadata(self.kv, ids, start, n_new)
        hidden = self.stage(inputs, meta, self.kv)
        if not self.stage.is_last:
            return hidden
        sample = header["sample"]  # only requests whose next token is wanted now
        rows = [i for i, rid in enumerate(ids) if rid in sample]
        if not rows:
            return {}
        logits = self.stage.logits(hidden[meta.last_rows[rows]])
        chosen = [ids[i] for i in rows]
        tokens = self.sampler.sample(logits, chosen, [sample[rid] for rid in chosen])
        return dict(zip(chosen, tokens, strict=True))

    def _pass_error(self, header: dict, message: str) -> None:
        self.outbound.send({"op": "error", "epoch": header.get("epoch"), "mb": header.get("mb"), "message": message})
