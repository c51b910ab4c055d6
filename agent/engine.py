"""The local pipeline engine: worker processes, one per device, driven by one scheduler thread.

Threads of the engine process:
  scheduler  owns all request state; reacts to events (new request, abort, result, failure)
             and keeps up to one micro-batch per stage in flight;
  receiver   reads results from the last stage and posts them as events;
  monitor    checks every worker's process and answers to pings; a dead or hung stage fails
             the affected requests with an error and marks the engine unhealthy.
The gateway talks to it only through `agent.engine_api.Engine`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from agent.control import ControlError, ControlServer, WorkerConnection
from agent.engine_api import EngineError, SamplingParams, TokenEvent
from agent.launcher import Launcher, LocalLauncher
from agent.loaders import resolve_model
from agent.scheduler import MicroBatch, Scheduler
from agent.sequence import Sequence, SequenceStatus
from agent.stage_layout import check_stages, even_split
from agent.tokenizer import load_tokenizer
from agent.transport import Channel, ChannelStore

log = logging.getLogger("pipeshift.engine")


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    n_devices: int = 1
    stages: list[tuple[int, int]] | None = None  # None: split evenly over all devices
    kv_cache_bytes: int = 256 << 20  # per stage
    block_size: int = 16
    threads_per_worker: int = 1
    device: str = "cpu"  # worker device type (local mode runs CPU workers)
    max_batch_size: int = 32
    max_prefill_tokens: int = 512
    micro_batches: int | None = None  # in flight at once; None: see PipelineEngine.micro_batches
    host: str = "127.0.0.1"
    startup_timeout_s: float = 180.0
    ping_interval_s: float = 1.0
    hang_timeout_s: float = 10.0  # a stage busy (or silent) this long is declared hung


@dataclass
class StageInfo:
    index: int
    worker_id: int
    start: int
    end: int
    num_blocks: int = 0
    weight_bytes: int = 0
    rss_bytes: int = 0
    busy_s: float = 0.0

    def describe(self) -> str:
        return f"stage {self.index} (worker {self.worker_id}, layers {self.start}-{self.end - 1})"


class PipelineEngine:
    def __init__(self, config: EngineConfig, launcher: Launcher | None = None):
        self.config = config
        self.launcher = launcher or LocalLauncher(config.threads_per_worker)
        self.source = resolve_model(config.model)
        self.arch = self.source.arch
        self.model_name = self.source.name
        self.max_context = self.arch.max_context
        self.tokenizer = load_tokenizer(self.source.format, self.source.path)
        layout = config.stages or even_split(self.arch.n_layers, config.n_devices)
        check_stages(layout, self.arch.n_layers, config.n_devices)
        self.stages = [StageInfo(i, i, s, e) for i, (s, e) in enumerate(layout)]
        self.epoch = 1
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.failure: str | None = None
        self.tokens_generated = 0
        self.workers: dict[int, WorkerConnection] = {}
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, Any] = {}
        self._stopping = threading.Event()
        self.scheduler: Scheduler | None = None

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> PipelineEngine:
        cfg = self.config
        self._control = ControlServer(cfg.host)
        self._store = ChannelStore(cfg.host)
        self.launcher.start(cfg.n_devices, f"{self._control.host}:{self._control.port}")
        try:
            self._accept_workers()
            self._configure_stages()
            self._connect_pipeline()
        except Exception:
            self.stop()
            raise
        capacity = min(s.num_blocks for s in self.stages)
        self.scheduler = Scheduler(
            capacity, cfg.block_size, self.max_context, max_inflight=self.micro_batches(),
            max_batch_size=cfg.max_batch_size, max_prefill_tokens=cfg.max_prefill_tokens,
        )
        self._threads = [
            threading.Thread(target=target, name=name, daemon=True)
            for target, name in ((self._run_scheduler, "scheduler"), (self._run_receiver, "receiver"),
                                 (self._run_monitor, "monitor"))
        ]
        for thread in self._threads:
            thread.start()
        return self

    def micro_batches(self) -> int:
        """Returns how many micro-batches to keep in flight: one per stage, so every stage
        works while the others do; but CPU workers share the machine's cores, and more
        micro-batches than can run at once only make every stage re-read its weights."""
        if self.config.micro_batches:
            return self.config.micro_batches
        if self.config.device == "cpu":
            runnable = max(1, (os.cpu_count() or 1) // self.config.threads_per_worker)
            return min(len(self.stages), runnable)
        return len(self.stages)

    def _accept_workers(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        while len(self.workers) < self.config.n_devices:
            dead = {w: c for w, c in self.launcher.exit_codes().items() if c is not None}
            if dead:
                raise RuntimeError(f"workers exited during start-up (worker: exit code): {dead}")
            try:
                conn = self._control.accept(timeout_s=min(5.0, max(0.1, deadline - time.monotonic())))
            except ControlError:
                if time.monotonic() > deadline:
                    raise
                continue
            self.workers[conn.worker_id] = conn

    def _configure_stages(self) -> None:
        cfg = self.config

        def configure(stage: StageInfo) -> None:
            reply = self.workers[stage.worker_id].call(
                "configure", timeout_s=cfg.startup_timeout_s, epoch=self.epoch, model=cfg.model,
                start=stage.start, end=stage.end, kv_budget_bytes=cfg.kv_cache_bytes,
                block_size=cfg.block_size, dtype="float32",
            )
            stage.num_blocks, stage.weight_bytes = reply["num_blocks"], reply["weight_bytes"]
            stage.rss_bytes = reply["rss_bytes"]
            if stage.num_blocks < 1:
                raise RuntimeError(f"{stage.describe()}: the KV budget holds no block; raise --kv-cache-mb")

        with ThreadPoolExecutor(len(self.stages)) as pool:
            list(pool.map(configure, self.stages))

    def _connect_pipeline(self) -> None:
        """Opens engine -> stage 0 -> ... -> stage N-1 -> engine, one channel per hop."""
        n = len(self.stages)
        names = [f"epoch{self.epoch}/hop{i}" for i in range(n + 1)]
        timeout = self.config.startup_timeout_s
        with ThreadPoolExecutor(n + 2) as pool:
            inbound = pool.submit(Channel, self._store.spec(names[0]), True, "cpu", timeout)
            outbound = pool.submit(Channel, self._store.spec(names[n]), False, "cpu", timeout)
            calls = [
                pool.submit(
                    self.workers[s.worker_id].call, "connect", timeout_s=timeout, epoch=self.epoch,
                    inbound=self._store.spec(names[i]).to_json(),
                    outbound=self._store.spec(names[i + 1]).to_json(),
                )
                for i, s in enumerate(self.stages)
            ]
            for c in calls:
                c.result()
            self._to_first, self._from_last = inbound.result(), outbound.result()

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.events.put(("stop", None))
        for conn in self.workers.values():
            try:
                conn.call("shutdown", timeout_s=2.0)
            except ControlError:
                pass
            conn.close()
        self.launcher.stop()
        # The receiver's recv fails once the last stage is gone; let the threads end before
        # the channels are torn down (a thread still inside gloo at exit aborts the process).
        for thread in getattr(self, "_threads", []):
            thread.join(timeout=5.0)
        if hasattr(self, "_control"):
            self._control.close()

    # ---- Engine protocol (called from the gateway's event loop) -------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.tokenizer.encode_chat(messages)

    def health(self) -> tuple[bool, str]:
        if self.failure:
            return False, self.failure
        return True, f"serving epoch {self.epoch} on {len(self.stages)} stages"

    def stats(self) -> dict[str, float]:
        sched = self.scheduler
        out: dict[str, float] = {
            "queue_length": float(len(sched.waiting)) if sched else 0.0,
            "running": float(len(sched.running)) if sched else 0.0,
            "tokens_generated": float(self.tokens_generated),
            "kv_blocks_used": float(sched.used_blocks) if sched else 0.0,
            "kv_blocks_capacity": float(sched.capacity_blocks) if sched else 0.0,
        }
        for s in self.stages:
            out[f"stage_busy_s.{s.index}"] = s.busy_s
        return out

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises EngineError (400/503) when the request can never be served as asked."""
        if self.failure:
            raise EngineError(f"the pipeline is down: {self.failure}", status=503)
        if not prompt_ids:
            raise EngineError("the prompt is empty; send at least one token", param="prompt")
        bad = [t for t in prompt_ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the vocabulary [0, {self.arch.vocab_size})", param="prompt")
        n = len(prompt_ids)
        if n + params.max_tokens > self.max_context:
            raise EngineError(
                f"prompt has {n} tokens and max_tokens is {params.max_tokens}; the model's context is "
                f"{self.max_context} tokens: shorten the prompt or lower max_tokens",
                param="max_tokens" if n < self.max_context else "prompt",
            )
        sched = self.scheduler
        need = sched.blocks_needed(n, params.max_tokens)
        if need > sched.capacity_blocks:
            raise EngineError(
                f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) needs {need * sched.block_size} "
                f"tokens of KV cache; each stage holds {sched.capacity_blocks * sched.block_size}: lower "
                "max_tokens or start the server with a larger --kv-cache-mb",
                param="max_tokens",
            )

    async def generate(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[TokenEvent, None]:
        self.check_request(prompt_ids, params)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        seq = Sequence(request_id, list(prompt_ids), params, emit=lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        self.events.put(("add", seq))
        finished = False
        try:
            while not finished:
                event = await events.get()
                finished = event.finish_reason is not None
                yield event
        finally:
            if not finished:
                self.events.put(("abort", request_id))

    # ---- scheduler thread ---------------------------------------------------------------
    def _run_scheduler(self) -> None:
        torch.set_num_threads(1)
        while True:
            kind, payload = self.events.get()
            if self._stopping.is_set():
                return
            try:
                self._handle(kind, payload)
                while True:  # take everything pending before scheduling again
                    try:
                        kind, payload = self.events.get_nowait()
                    except queue.Empty:
                        break
                    if self._stopping.is_set():
                        return
                    self._handle(kind, payload)
                self._schedule()
            except Exception:  # never let the scheduler die silently
                log.exception("scheduler error")
                self._fail_pipeline("internal scheduler error (see the server log)")

    def _handle(self, kind: str, payload: Any) -> None:
        if kind == "add":
            seq: Sequence = payload
            if self.failure:
                seq.emit(TokenEvent(finish_reason="error", error=f"the pipeline is down: {self.failure}"))
                return
            self._seqs[seq.request_id] = seq
            self._detok[seq.request_id] = self.tokenizer.detokenize_stream()
            self.scheduler.add(seq)
        elif kind == "abort":
            seq = self._seqs.get(payload)
            if seq is not None:
                seq.aborted = True
                if not seq.inflight:
                    self._release(seq)
        elif kind == "message":
            self._on_message(payload)
        elif kind == "failure":
            self._fail_pipeline(payload)

    def _schedule(self) -> None:
        if self.failure:
            return
        self.scheduler.admit()
        while (mb := self.scheduler.next_micro_batch()) is not None:
            self._send_step(mb)

    def _send_step(self, mb: MicroBatch) -> None:
        sample = {}
        for seq, start, chunk in zip(mb.seqs, mb.start_pos, mb.tokens, strict=True):
            if start + len(chunk) == seq.num_tokens:  # this step yields the request's next token
                p = seq.params
                sample[seq.request_id] = {"temperature": p.temperature, "top_p": p.top_p, "seed": p.seed}
        header = {
            "op": "step", "epoch": self.epoch, "mb": mb.mb_id,
            "ids": [s.request_id for s in mb.seqs], "start": mb.start_pos, "n_new": mb.num_new,
            "sample": sample,
        }
        flat = torch.tensor([t for chunk in mb.tokens for t in chunk], dtype=torch.int64)
        self._to_first.send(header, [flat])

    def _on_message(self, header: dict[str, Any]) -> None:
        op = header.get("op")
        mb_id = header.get("mb")
        if mb_id not in self.scheduler.inflight:
            log.warning("dropping a %s for unknown micro-batch %s", op, mb_id)
            return
        if op == "error":
            mb = self.scheduler.fail(mb_id)
            for seq in mb.seqs:
                self._finish(seq, "error", error=header.get("message", "stage error"))
            return
        mb = self.scheduler.complete(mb_id)
        tokens: dict[str, int] = header["tokens"]
        for seq in mb.seqs:
            if seq.aborted:
                self._release(seq)
            elif seq.request_id in tokens:
                self._on_token(seq, int(tokens[seq.request_id]))

    def _on_token(self, seq: Sequence, token: int) -> None:
        p = seq.params
        seq.output_ids.append(token)
        self.tokens_generated += 1
        detok = self._detok[seq.request_id]
        finish = None
        if token == self.tokenizer.eos_token_id and not p.ignore_eos:
            finish = "stop"
            seq.text += detok.flush()
        else:
            seq.text += detok.push(token)
        if finish is None and p.stop:
            cut = _find_stop(seq.text, p.stop, max(0, seq.emitted_chars - max(map(len, p.stop))))
            if cut is not None:
                seq.text, finish = seq.text[:cut], "stop"
        if finish is None and (len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.max_context):
            finish = "length"
            seq.text += detok.flush()
        # Hold back a tail that could still grow into a stop string.
        hold = 0 if finish or not p.stop else max(map(len, p.stop)) - 1
        upto = max(seq.emitted_chars, len(seq.text) - hold)
        delta, seq.emitted_chars = seq.text[seq.emitted_chars : upto], upto
        seq.emit(TokenEvent(
            token_ids=[token], text=delta, finish_reason=finish,
            prompt_tokens=len(seq.prompt_ids), completion_tokens=len(seq.output_ids),
        ))
        if finish:
            self._release(seq)

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if not seq.aborted:
            seq.emit(TokenEvent(finish_reason=reason, error=error, prompt_tokens=len(seq.prompt_ids),
                                completion_tokens=len(seq.output_ids)))
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Forgets a request and frees its KV blocks on every stage."""
        had_blocks = seq.status is SequenceStatus.RUNNING
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)
        self._detok.pop(seq.request_id, None)
        if had_blocks and not self.failure:
            self._to_first.send({"op": "free", "epoch": self.epoch, "ids": [seq.request_id]})

    def _fail_pipeline(self, reason: str) -> None:
        if self.failure:
            return
        self.failure = reason
        log.error("pipeline down: %s", reason)
        for seq in list(self._seqs.values()):
            seq.inflight = False
            self._finish(seq, "error", error=f"the pipeline is down: {reason}")
        self.scheduler.inflight.clear()

    # ---- receiver and monitor threads ---------------------------------------------------
    def _run_receiver(self) -> None:
        while not self._stopping.is_set():
            try:
                header, _ = self._from_last.recv()
            except Exception as exc:
                if not self._stopping.is_set():
                    self.events.put(("failure", f"lost the connection from the last stage: {exc}"))
                return
            self.events.put(("message", header))

    def _run_monitor(self) -> None:
        cfg = self.config
        by_worker = {s.worker_id: s for s in self.stages}
        while not self._stopping.wait(cfg.ping_interval_s):
            if self.failure:
                return
            for worker_id, code in self.launcher.exit_codes().items():
                if code is not None and worker_id in by_worker:
                    self.events.put(("failure", f"{by_worker[worker_id].describe()} died (exit code {code})"))
                    return
            for stage in self.stages:
                try:
                    reply = self.workers[stage.worker_id].call("ping", timeout_s=cfg.hang_timeout_s)
                except ControlError as exc:
                    if not self._stopping.is_set():
                        self.events.put(("failure", f"{stage.describe()} is not answering: {exc}"))
                    return
                stage.busy_s, stage.rss_bytes = reply["busy_s"], reply["rss_bytes"]
                if reply["busy_for_s"] > cfg.hang_timeout_s:
                    self.events.put(("failure", f"{stage.describe()} is hung: one step has run "
                                                f"{reply['busy_for_s']:.0f} s"))
                    return


def _find_stop(text: str, stops: tuple[str, ...], search_from: int) -> int | None:
    """Returns where the earliest stop string starts in `text`, or None."""
    hits = [i for s in stops if s and (i := text.find(s, search_from)) >= 0]
    return min(hits) if hits else None
