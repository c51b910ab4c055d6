"""The data-plane loop of one wiring of a worker: receive a micro-batch, run its layers, pass it on.

A worker runs one loop per pipeline wiring it belongs to: normally one, two for a moment
while a reconfiguration switches (the old epoch's channels and the new one's). The loops
share the worker's weights, KV cache and sampler (`StageHost`) and take turns computing.

Messages (JSON header + tensors, see transport.py), all carrying the wiring's `epoch`:
  step   {mb, ids, start, n_new, sample: {id: params}} + [token ids | hidden states]
         optional: fork {id: [member ids]}  after this step, each member gets a copy of the
                                      request's KV (full blocks shared, agent/kv_cache.py)
                                      and its own token sampled from the request's last row;
                   prompt_logprobs {id: {k, skip, targets}}  the last stage returns the
                                      log-softmax of the request's rows skip, skip + 1, ...
                                      at the prompt tokens `targets` (and the k most likely)
  free   {ids}                        release these requests' KV blocks
  result {mb, tokens: {id: token}, logprobs: {id: [token, logprob, [[token, logprob], ...]]},
          prompt_logprobs: {id: [[token, logprob, [[token, logprob], ...]], ...]}}
                                      from the last stage back to the engine (logprobs only
                                      for the requests that asked for them)
  error  {mb, message}                a stage failed this micro-batch; passed on to the engine
  close  {}                           the wiring is retired: pass it on, then stop
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from agent.attention_metadata import build_attention_metadata
from agent.handoff import Handoffs
from agent.kv_cache import PagedKVCache
from agent.model import LlamaStage
from agent.sampler import Sampler
from agent.transport import Channel

log = logging.getLogger(__name__)

PROMPT_LOGPROBS_ROWS = 128  # prompt positions whose [rows, vocabulary] logits are held at once


class StageHost:
    """What a worker's loops share: the model parts it holds, its KV cache, its sampler."""

    def __init__(self, stage: LlamaStage, kv: PagedKVCache, worker_id: int = 0, xfer=None):
        self.stage, self.kv = stage, kv
        self.sampler = Sampler()
        self.handoffs = Handoffs(worker_id, kv, self.sampler, xfer or (lambda name: None))
        self.compute_lock = threading.Lock()
        self.busy_s = 0.0
        self.busy_since: float | None = None
        self._busy_clock: tuple[int, float] | None = None  # (thread CPU clock, its reading at start)
        self.steps = 0

    @contextmanager
    def computing(self) -> Iterator[None]:
        with self.compute_lock:
            if hasattr(time, "pthread_getcpuclockid"):  # not on every platform
                clock = time.pthread_getcpuclockid(threading.get_ident())
                self._busy_clock = (clock, time.clock_gettime(clock))
            self.busy_since = time.monotonic()
            try:
                yield
            finally:
                self.busy_s += time.monotonic() - self.busy_since
                self.busy_since = None
                self._busy_clock = None

    def busy_cpu_s(self) -> float | None:
        """CPU seconds the step running now has used on its thread (None when idle): a step
        that is slow because the host is loaded keeps using CPU, a stuck one does not."""
        busy = self._busy_clock
        if busy is None:
            return None
        try:
            return time.clock_gettime(busy[0]) - busy[1]
        except OSError:  # the step ended (and its thread with it) between the two reads
            return None


class StageLoop:
    def __init__(self, host: StageHost, wiring: str, epoch: int, layers: range, is_last: bool,
                 inbound: Channel, outbound: Channel):
        self.host = host
        self.wiring, self.epoch, self.layers, self.is_last = wiring, epoch, layers, is_last
        self.inbound, self.outbound = inbound, outbound
        self.closed = threading.Event()

    def run(self) -> None:
        """Serves until `close` arrives or a channel fails (a peer died, or shutdown)."""
        try:
            while True:
                header, tensors = self.inbound.recv()
                if header["op"] == "close":
                    self.outbound.send(header)
                    return
                out = self.handle(header, tensors)
                if out is not None:
                    self.outbound.send(*out)
                if header["op"] == "step":  # replicate these positions where a reconfiguration wants them
                    ids = list(header["ids"])
                    ends = [s + n for s, n in zip(header["start"], header["n_new"], strict=True)]
                    for rid, members in (header.get("fork") or {}).items():
                        end = ends[ids.index(rid)]
                        ids += members
                        ends += [end] * len(members)
                    self.host.handoffs.wrote(self.epoch, ids, ends)
        finally:
            self.closed.set()

    def handle(self, header: dict, tensors: list[torch.Tensor]) -> tuple | None:
        """Returns the (header, tensors) to pass on, or None."""
        op = header["op"]
        if op == "step":
            if header["epoch"] != self.epoch:
                return self._error(header, f"wiring {self.wiring} serves epoch {self.epoch}, got a step of epoch {header['epoch']}")
            try:
                # A request just moved here may still lack KV its old owner is sending.
                self.host.handoffs.wait_for(self.epoch, header["ids"], header["start"])
                with self.host.computing():
                    out = self.step(header, tensors[0])
                    self.host.steps += 1
            except Exception as exc:  # report, keep serving: the engine fails this micro-batch
                log.error("step failed: %s", traceback.format_exc())
                return self._error(header, f"stage [{self.layers.start}, {self.layers.stop}): {exc}")
            if self.is_last:
                sampled, prompt = out
                return {"op": "result", "epoch": self.epoch, "mb": header["mb"],
                        "tokens": {rid: s.token for rid, s in sampled.items()},
                        "logprobs": {rid: s.to_json() for rid, s in sampled.items() if s.logprob is not None},
                        "prompt_logprobs": prompt}, []
            return header, [out]
        if op == "free":
            with self.host.computing():
                for rid in header["ids"]:
                    self.host.kv.free(rid)
            self.host.handoffs.forget(header["ids"])
            if self.is_last:
                self.host.sampler.forget(header["ids"])
                return None
            return header, []
        if op == "error":
            return header, []
        return self._error(header, f"unknown op {op!r}")

    def step(self, header: dict, inputs: torch.Tensor):
        ids, start, n_new = header["ids"], header["start"], header["n_new"]
        kv, stage = self.host.kv, self.host.stage
        meta = build_attention_metadata(kv, ids, start, n_new, stage.arch.window_of(self.layers))
        hidden = stage(inputs, meta, kv, self.layers)
        forks = header.get("fork") or {}
        for rid, members in forks.items():
            i = ids.index(rid)
            for member in members:
                kv.fork(rid, member, start[i] + n_new[i])
        if not self.is_last:
            return hidden
        prompt = self._prompt_logprobs(header, hidden)
        sample = header["sample"]  # only requests whose next token is wanted now
        rows = [i for i, rid in enumerate(ids) if rid in sample]
        chosen = [ids[i] for i in rows]
        for rid, members in forks.items():  # a member's first token comes from its leader's row
            rows += [ids.index(rid)] * len(members)
            chosen += members
        if not rows:
            return {}, prompt
        logits = stage.logits(hidden[meta.last_rows[rows]])
        sampled = self.host.sampler.choose(logits, chosen, [sample[rid] for rid in chosen])
        return dict(zip(chosen, sampled, strict=True)), prompt

    def _prompt_logprobs(self, header: dict, hidden: torch.Tensor) -> dict[str, list]:
        """Returns, per request that asked, [token, logprob, [[token, logprob], ...]] of each
        target prompt token under the float32 log-softmax of the row before it."""
        wanted = header.get("prompt_logprobs") or {}
        if not wanted:
            return {}
        offsets = dict(zip(header["ids"], itertools.accumulate([0, *header["n_new"]]), strict=False))
        out: dict[str, list] = {}
        for rid, ask in wanted.items():
            first = offsets[rid] + int(ask["skip"])
            targets = [int(t) for t in ask["targets"]]
            k = int(ask["k"])
            entries = out.setdefault(rid, [])
            for a in range(0, len(targets), PROMPT_LOGPROBS_ROWS):  # bounds the [rows, V] logits
                part = targets[a:a + PROMPT_LOGPROBS_ROWS]
                logprobs = torch.log_softmax(self.host.stage.logits(hidden[first + a:first + a + len(part)]), dim=-1)
                chosen = logprobs.gather(1, torch.tensor(part).unsqueeze(1)).squeeze(1).tolist()
                top_values, top_ids = torch.topk(logprobs, k) if k else (logprobs[:, :0], logprobs[:, :0].long())
                for j, token in enumerate(part):
                    entries.append([token, chosen[j], [list(t) for t in zip(top_ids[j].tolist(),
                                                                          top_values[j].tolist(), strict=True)]])
        return out

    def _error(self, header: dict, message: str) -> tuple:
        return {"op": "error", "epoch": header.get("epoch"), "mb": header.get("mb"), "message": message}, []
