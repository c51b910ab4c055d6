"""The local pipeline engine: worker processes, one per device, driven by one scheduler thread.

A deployment is data: a configuration of pipelines (replicas), each an ordered list of stages
`(worker, start, end)`. Every pipeline has its own channels (engine -> first stage -> ... ->
last stage -> engine), named by the epoch they were opened in, and its own micro-batches in
flight; the scheduler routes each new request to the least loaded pipeline.

Threads of the engine process:
  scheduler  owns all request state; reacts to events (new request, abort, result, failure,
             a function to run for the reconfiguration executor) and keeps micro-batches in
             flight on every pipeline;
  receiver   one per pipeline: reads results from its last stage and posts them as events;
  monitor    checks every worker's process and answers to pings; a dead or hung stage fails
             the affected requests with an error and marks the engine unhealthy;
  executor   while a reconfiguration is applied (agent/executor.py).
The gateway talks to it only through `agent.engine_api.Engine`, the admin API through the
methods under "deployment".
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import jinja2
import torch

from agent.control import ControlError, ControlServer, WorkerConnection
from agent.engine_api import (
    EngineError,
    SamplingParams,
    TokenEvent,
    TokenLogprob,
    pipeline_down,
    prompt_batch,
)
from agent.launcher import Launcher, LocalLauncher
from agent.loaders import resolve_model
from agent.scheduler import MicroBatch, Scheduler
from agent.sequence import Sequence, SequenceStatus
from agent.stage_layout import check_stages, even_split
from agent.tokenizer import NoChatTemplate, load_tokenizer
from agent.transport import Channel, ChannelStore

log = logging.getLogger("pipeshift.engine")

StagePlacement = tuple[int, int, int]  # (worker, start, end)


@dataclass
class EngineConfig:
    model: str = "smollm2-135m"
    n_devices: int = 1
    stages: list[tuple[int, int]] | None = None  # one pipeline on workers 0..; None: even split
    pipelines: list[list[StagePlacement]] | None = None  # several pipelines; overrides `stages`
    kv_cache_bytes: int = 256 << 20  # most a worker's KV pool may take
    memory_budget_bytes: int | None = None  # per worker: weights + KV pool; None: what is free
    block_size: int = 16
    threads_per_worker: int = 1
    device: str = "cpu"  # worker device type (local mode runs CPU workers)
    max_batch_size: int = 32
    # the most tokens (prompt and output) a request may have; None: the model's context
    max_model_len: int | None = None
    max_prefill_tokens: int = 512
    micro_batches: int | None = None  # in flight per pipeline; None: see PipelineEngine.micro_batches
    max_overhead: float = 0.05  # how much a reconfiguration's background copies may slow serving
    host: str = "127.0.0.1"
    startup_timeout_s: float = 180.0
    ping_interval_s: float = 1.0
    hang_timeout_s: float = 10.0  # a stage silent, or stuck in one step without computing, this long is hung

    def initial_pipelines(self, n_layers: int) -> list[list[StagePlacement]]:
        """Returns the starting configuration as (worker, start, end) stages; raises ValueError."""
        if self.pipelines:
            used = [w for p in self.pipelines for w, _, _ in p]
            if len(used) != len(set(used)):
                raise ValueError("a worker runs at most one stage: the configuration uses one twice")
            for i, p in enumerate(self.pipelines):
                bad = [w for w, _, _ in p if not 0 <= w < self.n_devices]
                if bad:
                    raise ValueError(f"pipeline {i} uses worker {bad[0]}, but --devices is {self.n_devices}")
                check_stages([(s, e) for _, s, e in p], n_layers, self.n_devices)
            return [list(p) for p in self.pipelines]
        layout = self.stages or even_split(n_layers, self.n_devices)
        check_stages(layout, n_layers, self.n_devices)
        return [[(i, s, e) for i, (s, e) in enumerate(layout)]]


@dataclass
class StageInfo:
    index: int  # position in its pipeline
    worker_id: int
    start: int
    end: int
    pipeline_id: int = 0

    def describe(self) -> str:
        return (f"pipeline {self.pipeline_id} stage {self.index} "
                f"(worker {self.worker_id}, layers {self.start}-{self.end - 1})")


@dataclass
class WorkerInfo:
    """What the engine knows of a worker (its stages' figures are its figures)."""

    worker_id: int
    num_blocks: int = 0
    max_blocks: int = 0
    weight_bytes: int = 0
    rss_bytes: int = 0
    busy_s: float = 0.0
    layers: list[int] = field(default_factory=list)
    alive: bool = True

    @property
    def name(self) -> str:
        return f"worker-{self.worker_id}"


@dataclass
class PipelineRuntime:
    """One pipeline as the engine drives it: its stages and the channels of its wiring."""

    pipeline_id: int
    epoch: int  # the epoch its channels were opened in; its messages carry it
    stages: list[StageInfo]
    to_first: Channel | None = None
    from_last: Channel | None = None
    # serving: takes steps / standby: open but idle (a reconfiguration's old or not-yet-new
    # pipeline) / retired: closed, its channels carry nothing more
    state: str = "standby"
    broken: str | None = None  # why its channels failed; nothing more is sent on it

    @property
    def retired(self) -> bool:
        return self.state == "retired"

    @property
    def wiring(self) -> str:
        return f"e{self.epoch}/p{self.pipeline_id}"

    @property
    def workers(self) -> tuple[int, ...]:
        return tuple(s.worker_id for s in self.stages)


def worker_name(worker_id: int) -> str:
    return f"worker-{worker_id}"


def worker_id_of(name: str) -> int:
    """Returns N for "worker-N"; raises ValueError for other names."""
    prefix = "worker-"
    if not name.startswith(prefix) or not name[len(prefix):].isdigit():
        raise ValueError(f"unknown device {name!r}: this deployment's devices are named worker-0, worker-1, ...")
    return int(name[len(prefix):])


def default_memory_budget_bytes(n_workers: int) -> int:
    """Returns an equal share of this host's available memory for each CPU worker."""
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        available = 8 << 30
    return int(0.9 * available / max(1, n_workers))


class PipelineEngine:
    def __init__(self, config: EngineConfig, launcher: Launcher | None = None):
        self.config = config
        self.launcher = launcher or LocalLauncher(config.threads_per_worker)
        self.source = resolve_model(config.model)
        self.arch = self.source.arch
        self.model_name = self.source.name
        self.max_context = served_context(self.arch.max_context, config.max_model_len)
        self.tokenizer = load_tokenizer(self.source.format, self.source.path)
        self._initial = config.initial_pipelines(self.arch.n_layers)
        self.memory_budget_bytes = config.memory_budget_bytes or default_memory_budget_bytes(config.n_devices)
        self.epoch = 1
        self.pipelines: dict[int, PipelineRuntime] = {}
        self._pipeline_ids = itertools.count()
        self.worker_info = {w: WorkerInfo(w) for w in range(config.n_devices)}
        self.part_bytes: dict[str, int] = {}
        self.kv_bytes_per_token_per_layer = 0
        self.events: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.failure: str | None = None
        self.tokens_generated = 0
        self.prefill_tokens = 0  # prompt positions computed: once per prompt, whatever its n
        self.active_requests = 0  # streams open through `generate` (the event loop's count)
        self.workers: dict[int, WorkerConnection] = {}
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, Any] = {}
        self._stopping = threading.Event()
        self.scheduler: Scheduler | None = None
        self._receivers: list[threading.Thread] = []
        # Set by the executor during a switch: called on the scheduler thread with the
        # requests of each micro-batch that completes.
        self.step_hook: Callable[[list[Sequence]], None] | None = None
        self.worker_lost_hook: Callable[[int, str], bool] | None = None
        self.pipeline_broken_hook: Callable[[int], bool] | None = None
        # Called on the scheduler thread with ("admitted" | "finished", the request): the
        # gateway's workload monitor (agent/workload_monitor.py) reads the scheduler's state there.
        self.request_hook: Callable[[str, Sequence], None] | None = None
        self.reconfig: Any = None  # agent.executor.Reconfigurations, set by start()

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> PipelineEngine:
        cfg = self.config
        self._control = ControlServer(cfg.host)
        self._store = ChannelStore(cfg.host)
        self.launcher.start(cfg.n_devices, f"{self._control.host}:{self._control.port}")
        try:
            self._accept_workers()
            runtimes = [self._new_runtime(p, self.epoch) for p in self._initial]
            self._configure_workers(runtimes)
            self.scheduler = Scheduler(
                cfg.block_size, self.max_context, max_batch_size=cfg.max_batch_size,
                max_prefill_tokens=cfg.max_prefill_tokens,
            )
            for info in self.worker_info.values():
                self.scheduler.set_worker_capacity(info.worker_id, info.num_blocks if info.layers else 0)
            with ThreadPoolExecutor(len(runtimes)) as pool:
                list(pool.map(self.open_pipeline, runtimes))
            for runtime in runtimes:
                self.serve_pipeline(runtime)
        except Exception:
            self.stop()
            raise
        from agent.reconfigurations import Reconfigurations

        self.reconfig = Reconfigurations(self)
        self._threads = [
            threading.Thread(target=target, name=name, daemon=True)
            for target, name in ((self._run_scheduler, "scheduler"), (self._run_monitor, "monitor"))
        ]
        for thread in self._threads:
            thread.start()
        return self

    def micro_batches(self, n_stages: int | None = None) -> int:
        """Returns how many micro-batches a pipeline keeps in flight: one per stage, so every
        stage works while the others do; but CPU workers share the machine's cores, and more
        micro-batches than can run at once only make every stage re-read its weights."""
        if self.config.micro_batches:
            return self.config.micro_batches
        n_stages = n_stages if n_stages is not None else max((len(p.stages) for p in self.pipelines.values()), default=1)
        if self.config.device == "cpu":
            n_pipelines = max(1, len(self.serving_pipelines()))
            runnable = max(1, (os.cpu_count() or 1) // self.config.threads_per_worker // n_pipelines)
            return min(n_stages, runnable)
        return n_stages

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

    def _configure_workers(self, runtimes: list[PipelineRuntime]) -> None:
        """Loads every stage's layers; spare workers start empty, ready to gain layers."""
        ranges = {s.worker_id: (s.start, s.end) for r in runtimes for s in r.stages}

        def configure(worker_id: int) -> None:
            self._configure_worker(self.worker_info[worker_id], *ranges.get(worker_id, (0, 0)))

        with ThreadPoolExecutor(len(self.workers)) as pool:
            list(pool.map(configure, sorted(self.workers)))

    def _configure_worker(self, info: WorkerInfo, start: int, end: int) -> None:
        """Loads layers [start, end) on a worker (none for a spare) and sizes its KV pool."""
        cfg = self.config
        reply = self.workers[info.worker_id].call(
            "configure", timeout_s=cfg.startup_timeout_s, model=cfg.model, start=start, end=end,
            kv_cap_bytes=cfg.kv_cache_bytes, memory_budget_bytes=self.memory_budget_bytes,
            block_size=cfg.block_size, dtype="float32",
        )
        info.num_blocks, info.max_blocks = reply["num_blocks"], reply["max_blocks"]
        info.weight_bytes, info.rss_bytes = reply["weight_bytes"], reply["rss_bytes"]
        info.layers = list(range(start, end))
        for part, n in reply["part_bytes"].items():
            if n is not None:
                self.part_bytes[part] = n
        self.kv_bytes_per_token_per_layer = reply["kv_bytes_per_token_per_layer"]

    def add_worker(self, worker_id: int) -> WorkerInfo:
        """Starts one more worker process while serving (`pipeshift device add`), the way
        `start` starts them: a spare holding no layers, with the others' KV cap and memory
        budget, so that an apply can place layers on it. Returns its info once it answers;
        raises ValueError when the id is taken, RuntimeError when it does not come up (its
        process is then stopped). One at a time: it takes the next worker that connects."""
        if self._stopping.is_set() or self.scheduler is None:
            raise RuntimeError("the engine is not serving")
        if worker_id in self.worker_info or worker_id in self.workers:
            raise ValueError(f"worker {worker_id} exists already")
        self.launcher.launch(worker_id)
        info = WorkerInfo(worker_id)
        try:
            deadline = time.monotonic() + self.config.startup_timeout_s
            while worker_id not in self.workers:
                code = self.launcher.exit_codes().get(worker_id)
                if code is not None:
                    raise RuntimeError(f"worker {worker_id} exited during start-up with code {code}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"worker {worker_id} did not connect within "
                                       f"{self.config.startup_timeout_s:.0f} s")
                try:
                    conn = self._control.accept(timeout_s=min(5.0, max(0.1, deadline - time.monotonic())))
                except ControlError:
                    continue
                if conn.worker_id != worker_id:  # not ours: nothing else is starting
                    conn.close()
                    continue
                self.workers[worker_id] = conn
            self._configure_worker(info, 0, 0)
            self.on_scheduler(lambda: self.scheduler.set_worker_capacity(worker_id, 0))
        except Exception as exc:
            conn = self.workers.pop(worker_id, None)
            if conn is not None:
                conn.close()
            self.launcher.kill(worker_id)
            if isinstance(exc, ControlError):
                raise RuntimeError(str(exc)) from None
            raise
        self.worker_info[worker_id] = info  # last: the monitor watches it from now on
        log.info("worker %d added (pid %d), a spare", worker_id, self.workers[worker_id].pid)
        return info

    def _new_runtime(self, placements: list[StagePlacement], epoch: int) -> PipelineRuntime:
        pid = next(self._pipeline_ids)
        stages = [StageInfo(i, w, s, e, pid) for i, (w, s, e) in enumerate(placements)]
        return PipelineRuntime(pid, epoch, stages)

    def open_pipeline(self, runtime: PipelineRuntime) -> None:
        """Opens engine -> stage 0 -> ... -> stage N-1 -> engine, one channel per hop, and
        starts each worker's loop for this wiring."""
        n = len(runtime.stages)
        names = [f"{runtime.wiring}/hop{i}" for i in range(n + 1)]
        timeout = self.config.startup_timeout_s
        with ThreadPoolExecutor(n + 2) as pool:
            inbound = pool.submit(Channel, self._store.spec(names[0]), True, "cpu", timeout)
            outbound = pool.submit(Channel, self._store.spec(names[n]), False, "cpu", timeout)
            calls = [
                pool.submit(
                    self.workers[s.worker_id].call, "open_wiring", timeout_s=timeout,
                    wiring=runtime.wiring, epoch=runtime.epoch, start=s.start, end=s.end,
                    inbound=self._store.spec(names[i]).to_json(),
                    outbound=self._store.spec(names[i + 1]).to_json(),
                )
                for i, s in enumerate(runtime.stages)
            ]
            for c in calls:
                c.result()
            runtime.to_first, runtime.from_last = inbound.result(), outbound.result()
        # Read its last stage from now on, so that a `close` gets through even if it never serves.
        receiver = threading.Thread(target=self._run_receiver, args=(runtime,), name=f"receiver-{runtime.wiring}",
                                    daemon=True)
        self._receivers.append(receiver)
        receiver.start()

    def serve_pipeline(self, runtime: PipelineRuntime, admitting: bool = True) -> None:
        """Makes an opened pipeline take requests (call on the scheduler thread once running)."""
        runtime.state = "serving"
        self.pipelines[runtime.pipeline_id] = runtime
        self.scheduler.add_pipeline(runtime.pipeline_id, runtime.workers,
                                    self.micro_batches(len(runtime.stages)), admitting)
        for slot in self.scheduler.pipelines.values():  # CPU cores are shared among pipelines
            slot.max_inflight = self.micro_batches(len(self.pipelines[slot.pipeline_id].stages))

    def close_pipeline(self, runtime: PipelineRuntime) -> None:
        """Retires a pipeline: a `close` travels down its channels and every loop on it ends.
        Call on the scheduler thread (it owns the sending end)."""
        if runtime.retired:
            return
        runtime.state = "retired"
        try:
            runtime.to_first.send({"op": "close", "epoch": runtime.epoch})
        except Exception as exc:  # a stage on it died: its loops end on their own
            log.info("closing %s: %s", runtime.wiring, exc)

    def stop(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        self.events.put(("stop", None))
        for conn in list(self.workers.values()):
            try:
                conn.call("shutdown", timeout_s=2.0)
            except ControlError:
                pass
            conn.close()
        self.launcher.stop()
        # The receivers' recv fails once the last stages are gone; let the threads end before
        # the channels are torn down (a thread still inside gloo at exit aborts the process).
        for thread in [*getattr(self, "_threads", []), *self._receivers]:
            thread.join(timeout=5.0)
        if hasattr(self, "_control"):
            self._control.close()

    # ---- the serving configuration ------------------------------------------------------
    @property
    def stages(self) -> list[StageInfo]:
        """Every stage of every serving pipeline, pipeline by pipeline."""
        return [s for p in self.serving_pipelines() for s in p.stages]

    def serving_pipelines(self) -> list[PipelineRuntime]:
        return [p for p in sorted(self.pipelines.values(), key=lambda p: p.pipeline_id) if p.state == "serving"]

    def on_scheduler(self, fn: Callable[[], Any], timeout_s: float = 60.0) -> Any:
        """Runs `fn` on the scheduler thread (which owns all request state); returns its result."""
        future: Future = Future()
        self.events.put(("call", (fn, future)))
        return future.result(timeout=timeout_s)

    # ---- Engine protocol (called from the gateway's event loop) -------------------------
    def encode_prompt(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(prompt)

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Returns the prompt ids of a chat; raises EngineError (400) when the model cannot
        format it: no chat template (as vLLM: use /v1/completions), or the template refuses."""
        try:
            return self.tokenizer.encode_chat(messages)
        except NoChatTemplate:
            raise EngineError(
                f"the model {self.model_name} has no chat template, so chat messages cannot be turned into a "
                "prompt: send a plain prompt to /v1/completions instead (or serve a model whose tokenizer has a "
                "chat template)", param="messages",
            ) from None
        except jinja2.exceptions.TemplateError as exc:
            raise EngineError(f"the model's chat template refused these messages: {exc}", param="messages") from None

    def health(self) -> tuple[bool, str]:
        if self.failure:
            return False, self.failure
        serving = self.serving_pipelines()
        return True, (f"serving epoch {self.epoch} on {len(serving)} pipeline(s), "
                      f"{sum(len(p.stages) for p in serving)} stage(s)")

    def stats(self) -> dict[str, float]:
        sched = self.scheduler
        out: dict[str, float] = {
            "queue_length": float(len(sched.waiting)) if sched else 0.0,
            "running": float(len(sched.running)) if sched else 0.0,
            "tokens_generated": float(self.tokens_generated),
            "prefill_tokens": float(self.prefill_tokens),
            "kv_blocks_used": float(sched.used_blocks) if sched else 0.0,
            "kv_blocks_capacity": float(sched.capacity_blocks) if sched else 0.0,
            "epoch": float(self.epoch),
            "pipelines": float(len(self.serving_pipelines())),
        }
        for i, s in enumerate(self.stages):
            out[f"stage_busy_s.{i}"] = self.worker_info[s.worker_id].busy_s
        if self.reconfig is not None:
            out.update(self.reconfig.stats())
        return out

    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises EngineError (400/503) when the request can never be served as asked."""
        if self.failure:
            raise EngineError(pipeline_down(self.failure), status=503)
        if not prompt_ids:
            raise EngineError("the prompt is empty; send at least one token", param="prompt")
        bad = [t for t in prompt_ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise EngineError(f"token id {bad[0]} is outside the vocabulary [0, {self.arch.vocab_size})", param="prompt")
        bad = [t for t, _ in params.logit_bias if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise EngineError(f"logit_bias names token {bad[0]}, outside the vocabulary [0, {self.arch.vocab_size})",
                              param="logit_bias")
        n = len(prompt_ids)
        if n + params.max_tokens > self.max_context:
            raise EngineError(
                f"prompt has {n} tokens and max_tokens is {params.max_tokens}; the model's context is "
                f"{self.max_context} tokens: shorten the prompt or lower max_tokens",
                param="max_tokens" if n < self.max_context else "prompt",
            )
        sched = self.scheduler
        need = sched.blocks_needed(n, params.max_tokens)
        capacity = sched.capacity_blocks
        if need > capacity and not params.max_tokens_asked:  # the prompt alone fills the pool
            raise EngineError(
                f"prompt has {n} tokens; each stage's KV cache holds {capacity * sched.block_size} "
                "tokens and must also hold the answer: shorten the prompt or start the server "
                "with a larger --kv-cache-mb",
                param="prompt",
            )
        if need > capacity:
            raise EngineError(
                f"prompt ({n} tokens) plus max_tokens ({params.max_tokens}) needs {need * sched.block_size} "
                f"tokens of KV cache; each stage holds {capacity * sched.block_size}: lower "
                "max_tokens or start the server with a larger --kv-cache-mb",
                param="max_tokens",
            )
        if need * params.n > capacity:  # the members of a prompt are admitted together
            raise EngineError(
                f"n={params.n} sequences of prompt ({n} tokens) plus max_tokens ({params.max_tokens}) reserve "
                f"{need * params.n * sched.block_size} tokens of KV cache; each stage holds "
                f"{capacity * sched.block_size}: lower n or max_tokens, or start the server with a larger --kv-cache-mb",
                param="n",
            )

    @property
    def max_model_len(self) -> int:
        """The most tokens (prompt and output) one request can have now: the model's context,
        or fewer where the largest pipeline's KV pool holds fewer (it changes with applies)."""
        sched = self.scheduler
        return min(self.max_context, sched.capacity_blocks * sched.block_size)

    async def generate(self, request_id: str, prompt_ids: list[int] | list[list[int]],
                       params: SamplingParams) -> AsyncGenerator[TokenEvent, None]:
        prompts = prompt_batch(prompt_ids)
        sched = self.scheduler
        params = fit_default_output(params, [len(p) for p in prompts], sched.capacity_blocks, sched.block_size)
        for prompt in prompts:
            self.check_request(prompt, params)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()

        def emit(event: TokenEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        seqs = self.request_sequences(request_id, prompts, params, emit)
        self.events.put(("add", seqs))
        finished: set[int] = set()
        self.active_requests += 1
        try:
            while len(finished) < len(seqs):
                event = await events.get()
                if event.finish_reason is not None:
                    finished.add(event.index)
                yield event
        finally:
            self.active_requests -= 1
            if len(finished) < len(seqs):
                self.events.put(("abort", [s.request_id for s in seqs if s.index not in finished]))

    @staticmethod
    def request_sequences(request_id: str, prompts: list[list[int]], params: SamplingParams,
                          emit: Callable[[TokenEvent], None]) -> list[Sequence]:
        """Returns one sequence per choice: for each prompt a leader, and n - 1 members that
        fork from it once it has prefilled the prompt. With a seed, member m samples with seed
        + m (as vLLM does), so each member is reproducible and the members differ."""
        n = max(1, params.n)
        seqs: list[Sequence] = []
        for i, prompt in enumerate(prompts):
            leader = None
            for m in range(n):
                index = i * n + m
                rid = request_id if len(prompts) * n == 1 else f"{request_id}-{index}"
                own = params if params.seed is None or m == 0 else replace(params, seed=params.seed + m)
                seq = Sequence(rid, list(prompt), own, emit=emit, index=index)
                if leader is None:
                    leader = seq
                else:
                    seq.awaiting_fork = True
                    leader.forks.append(seq)
                seqs.append(seq)
        return seqs

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
            seqs: list[Sequence] = payload if isinstance(payload, list) else [payload]
            for seq in seqs:
                if self.failure:
                    seq.emit(TokenEvent(finish_reason="error", error=pipeline_down(self.failure),
                                        index=seq.index))
                    continue
                self._seqs[seq.request_id] = seq
                self._detok[seq.request_id] = self.tokenizer.detokenize_stream()
                if not seq.awaiting_fork:  # members come in with their leader
                    self.scheduler.add(seq)
                if self.request_hook is not None:
                    self.request_hook("admitted", seq)
        elif kind == "abort":
            for rid in payload if isinstance(payload, list) else [payload]:
                seq = self._seqs.get(rid)
                if seq is not None:
                    seq.aborted = True
                    if not seq.inflight:
                        self._release(seq)
        elif kind == "message":
            self._on_message(*payload)
        elif kind == "call":
            fn, future = payload
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)
        elif kind == "worker_lost":
            self._on_worker_lost(*payload)
        elif kind == "failure":
            self._fail_pipeline(payload)

    def _schedule(self) -> None:
        if self.failure:
            return
        self.scheduler.admit()
        for runtime in list(self.pipelines.values()):
            if runtime.retired or runtime.broken or runtime.pipeline_id not in self.scheduler.pipelines:
                continue
            while (mb := self.scheduler.next_micro_batch(runtime.pipeline_id)) is not None:
                try:
                    self._send_step(runtime, mb)
                except Exception as exc:  # its first stage is gone
                    self.scheduler.fail(mb.mb_id)
                    self._on_pipeline_broken(runtime, f"cannot reach its first stage: {exc}")
                    break

    def _send_step(self, runtime: PipelineRuntime, mb: MicroBatch) -> None:
        sample: dict[str, dict[str, Any]] = {}
        prompt_logprobs: dict[str, dict[str, Any]] = {}
        for seq, start, chunk in zip(mb.seqs, mb.start_pos, mb.tokens, strict=True):
            end, n_prompt = start + len(chunk), len(seq.prompt_ids)
            self.prefill_tokens += max(0, min(end, n_prompt) - start)
            wanted = seq.prompt_logprobs_wanted(start, end)
            if wanted is not None:
                prompt_logprobs[seq.request_id] = wanted
            if end == seq.num_tokens:  # this step yields the request's next token
                sample[seq.request_id] = self._sampling(seq)
                members = [m for m in seq.forks if m.awaiting_fork and m.status is SequenceStatus.RUNNING
                           and m.pipeline_id == mb.pipeline_id and not m.aborted]
                if members:
                    mb.forks[seq.request_id] = members
                    for m in members:
                        sample[m.request_id] = self._sampling(m)
        header = {
            "op": "step", "epoch": runtime.epoch, "mb": mb.mb_id,
            "ids": [s.request_id for s in mb.seqs], "start": mb.start_pos, "n_new": mb.num_new,
            "sample": sample,
        }
        if mb.forks:
            header["fork"] = {rid: [m.request_id for m in members] for rid, members in mb.forks.items()}
        if prompt_logprobs:
            header["prompt_logprobs"] = prompt_logprobs
        flat = torch.tensor([t for chunk in mb.tokens for t in chunk], dtype=torch.int64)
        runtime.to_first.send(header, [flat])

    @staticmethod
    def _sampling(seq: Sequence) -> dict[str, Any]:
        """Returns what the last stage needs to pick `seq`'s next token."""
        p = seq.params
        wanted = p.wire()
        # The penalties read the request's history: it travels with the step, so the
        # last stage keeps no state of it (a reconfiguration may move that stage).
        if p.penalises_output or p.grammar is not None:  # a grammar's matcher replays them when moved
            wanted["output_ids"] = seq.output_ids
        if p.repetition_penalty != 1.0:
            wanted["prompt_ids"] = seq.prompt_ids
        return wanted

    def _on_message(self, pipeline_id: int, header: dict[str, Any]) -> None:
        op = header.get("op")
        mb_id = header.get("mb")
        mb = self.scheduler.inflight.get(mb_id)
        if mb is None or mb.pipeline_id != pipeline_id:
            log.warning("dropping a %s for unknown micro-batch %s", op, mb_id)
            return
        if op == "error":
            mb = self.scheduler.fail(mb_id)
            for seq in [*mb.seqs, *(m for members in mb.forks.values() for m in members)]:
                if seq.request_id in self._seqs:
                    self._finish(seq, "error", error=header.get("message", "stage error"))
            return
        mb = self.scheduler.complete(mb_id)
        tokens: dict[str, int] = header["tokens"]
        logprobs: dict[str, list] = header.get("logprobs") or {}
        prompt_logprobs: dict[str, list] = header.get("prompt_logprobs") or {}
        for seq, start, n_new in zip(mb.seqs, mb.start_pos, mb.num_new, strict=True):
            seq.prompt_logprobs.extend(prompt_logprobs.get(seq.request_id, ()))
            members = mb.forks.get(seq.request_id, [])
            if seq.aborted:
                self._release(seq)
            elif seq.request_id in tokens:
                self._on_token(seq, int(tokens[seq.request_id]), logprobs.get(seq.request_id))
            for member in members:
                if member.request_id not in self._seqs or member.aborted:
                    continue  # released meanwhile; its blocks were freed after the fork
                member.awaiting_fork = False
                # Its KV is where the step ran; a member a reconfiguration moved meanwhile
                # computes its prompt again where it is now.
                if member.pipeline_id == mb.pipeline_id and member.num_computed == 0:
                    member.num_computed = start + n_new
                member.prompt_logprobs = list(seq.prompt_logprobs)
                if member.request_id in tokens:
                    self._on_token(member, int(tokens[member.request_id]), logprobs.get(member.request_id))
            if members:
                seq.forks = [m for m in seq.forks if m.awaiting_fork]
        if self.step_hook is not None:
            self.step_hook([*mb.seqs, *(m for members in mb.forks.values() for m in members)])

    def _token_logprob(self, sampled: list) -> TokenLogprob:
        """Returns a sampler's [token, logprob, [[token, logprob], ...]] with the tokens' texts."""
        token, logprob, top = sampled
        text = self.tokenizer.token_text
        return TokenLogprob(int(token), text(int(token)), float(logprob),
                            tuple((int(t), text(int(t)), float(lp)) for t, lp in top))

    def _on_token(self, seq: Sequence, token: int, sampled: list | None = None) -> None:
        p = seq.params
        seq.output_ids.append(token)
        if seq.first_token_s is None:
            seq.first_token_s = time.monotonic()
        self.tokens_generated += 1
        detok = self._detok[seq.request_id]
        finish = None
        if token in self.tokenizer.stop_token_ids and not p.ignore_eos:
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
            logprobs=[self._token_logprob(sampled)] if sampled is not None else None,
            index=seq.index,
            prompt_logprobs=self._prompt_logprobs(seq) if len(seq.output_ids) == 1 else None,
        ))
        if finish:
            self._release(seq)

    def _prompt_logprobs(self, seq: Sequence) -> list[TokenLogprob] | None:
        """Returns one entry per prompt token when the request asked: the first has no logprob."""
        if seq.params.prompt_logprobs is None:
            return None
        first = seq.prompt_ids[0]
        return [TokenLogprob(first, self.tokenizer.token_text(first), None),
                *(self._token_logprob(entry) for entry in seq.prompt_logprobs)]

    def _finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        if not seq.aborted:
            seq.emit(TokenEvent(finish_reason=reason, error=error, prompt_tokens=len(seq.prompt_ids),
                                completion_tokens=len(seq.output_ids), index=seq.index))
        self._release(seq)
        for member in [m for m in seq.forks if m.awaiting_fork and m.request_id in self._seqs]:
            self._finish(member, reason, error)  # nothing will fork them now

    def _release(self, seq: Sequence) -> None:
        """Forgets a request and frees its KV blocks on every stage of its pipeline (blocks a
        reconfiguration left elsewhere are freed by its cleanup)."""
        if self.request_hook is not None and seq.status is not SequenceStatus.FINISHED:
            self.request_hook("finished", seq)
        had_blocks = seq.status is SequenceStatus.RUNNING
        runtime = self.pipelines.get(seq.pipeline_id) if seq.pipeline_id is not None else None
        self.scheduler.finish(seq)
        self._seqs.pop(seq.request_id, None)
        self._detok.pop(seq.request_id, None)
        stopping = self._stopping.is_set()  # the workers are going: nothing to free on them
        if had_blocks and not self.failure and not stopping and runtime is not None and not runtime.retired:
            try:
                runtime.to_first.send({"op": "free", "epoch": runtime.epoch, "ids": [seq.request_id]})
            except Exception as exc:  # its first stage died: the failure path reports it
                log.warning("could not free %s on %s: %s", seq.request_id, runtime.wiring, exc)

    def _fail_pipeline(self, reason: str) -> None:
        if self.failure:
            return
        self.failure = reason
        log.error("pipeline down: %s", reason)
        for seq in list(self._seqs.values()):
            seq.inflight = False
            self._finish(seq, "error", error=pipeline_down(reason))
        self.scheduler.inflight.clear()
        for slot in self.scheduler.pipelines.values():
            slot.inflight.clear()

    def _on_pipeline_broken(self, runtime: PipelineRuntime, reason: str) -> None:
        """Stops scheduling on a pipeline whose channels failed. A reconfiguration that opened
        it falls back when it learns which worker is gone; otherwise the engine fails."""
        runtime.broken = reason
        log.warning("pipeline %s: %s", runtime.wiring, reason)
        if self.pipeline_broken_hook is not None and self.pipeline_broken_hook(runtime.pipeline_id):
            return
        self._fail_pipeline(f"pipeline {runtime.pipeline_id} {reason}")

    def _on_worker_lost(self, worker_id: int, reason: str) -> None:
        """A worker died or hung: a reconfiguration may absorb it (abort, fall back); a
        spare's loss costs nothing; a serving stage's fails the engine."""
        info = self.worker_info[worker_id]
        if not info.alive:
            return
        info.alive = False
        if self.worker_lost_hook is not None and self.worker_lost_hook(worker_id, reason):
            return
        serving = [s for p in self.serving_pipelines() for s in p.stages if s.worker_id == worker_id]
        if serving:
            self._fail_pipeline(f"{serving[0].describe()} {reason}")
        else:
            log.warning("spare worker %d %s; it is no longer available", worker_id, reason)

    # ---- receiver and monitor threads ---------------------------------------------------
    def _run_receiver(self, runtime: PipelineRuntime) -> None:
        while not self._stopping.is_set():
            try:
                header, _ = runtime.from_last.recv()
            except Exception as exc:
                if not self._stopping.is_set() and not runtime.retired:
                    log.warning("lost the connection from the last stage of %s: %s", runtime.wiring, exc)
                return
            op = header.get("op")
            if op == "close":
                return
            self.events.put(("message", (runtime.pipeline_id, header)))

    def _run_monitor(self) -> None:
        cfg = self.config
        while not self._stopping.wait(cfg.ping_interval_s):
            if self.failure:
                return
            codes = self.launcher.exit_codes()
            for worker_id, info in list(self.worker_info.items()):  # `add_worker` may add one
                if not info.alive:
                    continue
                if codes.get(worker_id) is not None:
                    self.events.put(("worker_lost", (worker_id, f"died (exit code {codes[worker_id]})")))
                    continue
                try:
                    reply = self.workers[worker_id].call("ping", timeout_s=cfg.hang_timeout_s)
                except ControlError as exc:
                    if not self._stopping.is_set():
                        self.events.put(("worker_lost", (worker_id, f"is not answering: {exc}")))
                    continue
                info.busy_s, info.rss_bytes = reply["busy_s"], reply["rss_bytes"]
                info.layers, info.num_blocks = reply["layers"], reply["num_blocks"]
                info.weight_bytes = reply["weight_bytes"]
                if is_hung(reply["busy_for_s"], reply.get("busy_cpu_s"), cfg.hang_timeout_s):
                    self.events.put(("worker_lost", (worker_id, f"is hung: one step has run "
                                                                f"{reply['busy_for_s']:.0f} s")))


HUNG_CPU_SHARE = 0.01  # a step using less than this share of a core is not computing
HUNG_HARD_LIMIT = 10  # a step longer than this many hang timeouts is hung however busy


def served_context(model_context: int, max_model_len: int | None) -> int:
    """Returns the context requests are served in: the model's, or a shorter `max_model_len`
    (a request then reserves KV for fewer tokens, and more of them fit side by side); raises
    ValueError for one the model cannot serve."""
    if max_model_len is None:
        return model_context
    if not 2 <= max_model_len <= model_context:
        raise ValueError(
            f"--max-model-len {max_model_len} is not served: the model's context is {model_context} "
            f"tokens; give 2 to {model_context}, or leave it out for the whole context"
        )
    return max_model_len


def fit_default_output(
    params: SamplingParams, prompt_lengths: list[int], capacity_blocks: int, block_size: int
) -> SamplingParams:
    """Returns `params` with a default max_tokens (the client set none) lowered to what a stage's
    KV pool of `capacity_blocks` holds beside the longest prompt, for its n sequences admitted
    together. A max_tokens the client asked for, a default that fits, or a prompt that alone
    fills the pool is left as it is (check_request refuses what cannot be served)."""
    if params.max_tokens_asked:
        return params
    room = capacity_blocks // max(1, params.n) * block_size - max(prompt_lengths, default=0)
    if 0 < room < params.max_tokens:
        return replace(params, max_tokens=room)
    return params


def is_hung(busy_for_s: float, busy_cpu_s: float | None, hang_timeout_s: float) -> bool:
    """A step is hung when it has run longer than the hang timeout without using the CPU
    (blocked, not slow: a loaded host slows a step but its thread still computes), or longer
    than HUNG_HARD_LIMIT timeouts in any case."""
    if busy_for_s <= hang_timeout_s:
        return False
    if busy_cpu_s is None or busy_for_s > HUNG_HARD_LIMIT * hang_timeout_s:
        return True
    return busy_cpu_s < HUNG_CPU_SHARE * busy_for_s


def _find_stop(text: str, stops: tuple[str, ...], search_from: int) -> int | None:
    """Returns where the earliest stop string starts in `text`, or None."""
    hits = [i for s in stops if s and (i := text.find(s, search_from)) >= 0]
    return min(hits) if hits else None
