"""Measuring on this machine: the real decoder layers and head timed over a grid of batch x
context, the host described, the device's memory read. Fitting and predicting live in
cost_models/ (calibration.py, profile.py), which never import the runtime.

Contract (agent/calibrate_command.py and bench/profile_fit.py call these):
    ProfilingSetup(model, layers, dtype, device, threads, repeats, random_weights)
    build_stage(setup)                      -> (stage, arch, where the weights came from)
    time_forward(stage, arch, batch, start_pos, n_new, setup) -> median seconds of one forward
    measure_grid(stage, arch, kind, batches, contexts, prefill_batches, prefill_tokens, setup)
                                            -> list[Measurement] (times of the whole stage)
    measure_overhead_s(setup)               -> seconds per layer of dispatch (tiny layers)
    measure_head_s(arch, rows, setup)       -> {rows: seconds of final norm + logits + pick}
    measure_shared_slowdown(setup, workers) -> float: a decode step with `workers` busy at once,
                                               over one alone
    measure_pipeline_overheads(model, n_layers, decode_layer_s, head_s)
                                            -> PipelineOverheads: a real 1- and 2-stage pipeline's
                                               step beyond layers and head (return_s, hop_s)
    host_description(device, threads)       -> dict: CPU model, vector extensions, accelerator
    device_memory_bytes(device)             -> int | None (GPU memory; None on CPU)
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from dataclasses import dataclass, replace
from typing import Any

from cost_models.calibration import Measurement
from cost_models.model_catalog import ModelArch

BLOCK_SIZE = 16
# Extensions that decide CPU matmul speed, as /proc/cpuinfo names them.
VECTOR_FLAGS = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512_bf16", "avx512_vnni",
                "amx_bf16", "amx_int8", "amx_tile", "asimd", "sve")  # fmt: skip


@dataclass(frozen=True)
class ProfilingSetup:
    model: str = "smollm2-135m"  # catalog name, .gguf file or HF dir
    layers: int = 4
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "cpu"  # torch device
    threads: int = 1
    repeats: int = 3
    random_weights: bool = False

    @property
    def torch_dtype(self) -> Any:
        import torch

        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.dtype]


def build_stage(setup: ProfilingSetup) -> tuple[Any, ModelArch, str]:
    """Returns (stage, arch, where the weights came from) for layers [1, 1 + setup.layers)."""
    import torch

    from agent.model import LlamaStage
    from cost_models.model_catalog import get_model_arch

    dtype = setup.torch_dtype
    source = None
    if not setup.random_weights:
        from agent.loaders import resolve_model

        try:
            source = resolve_model(setup.model)
        except (ValueError, FileNotFoundError):
            source = None  # a catalog-only model: time the same shapes with random weights
    arch = source.arch if source else get_model_arch(setup.model)
    # Start at layer 1 so the stage neither embeds nor owns the head: layers only.
    start = 1 if arch.n_layers > setup.layers + 1 else 0
    end = min(arch.n_layers - 1, start + setup.layers) if start else setup.layers
    if source is not None:
        from agent.loaders import load_stage_weights

        weights = load_stage_weights(source, start, end, dtype)
        stage = LlamaStage.from_weights(arch, start, end, weights, setup.device)
        origin = f"weights of {source.path}"
    else:
        torch.manual_seed(0)
        stage = LlamaStage(arch, start, end).to(device=setup.device, dtype=dtype).eval()
        stage.settle_weights()  # the layout the engine runs on
        origin = "random weights (timing does not depend on the values)"
    return stage, arch, origin


def _sync(device: str) -> Any:
    import torch

    return torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)


def _median_s(fn: Any, setup: ProfilingSetup) -> float:
    """Returns the median seconds of fn() over setup.repeats runs after one warm-up run."""
    sync = _sync(setup.device)
    times = []
    for i in range(setup.repeats + 1):  # the first run warms caches and allocators
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_forward(
    stage: Any, arch: ModelArch, batch: int, start_pos: int, n_new: int, setup: ProfilingSetup
) -> float:
    """Returns the median seconds of one forward of the stage's layers over a filled cache:
    `batch` sequences with `start_pos` cached tokens each and `n_new` new ones."""
    import torch

    from agent.attention_metadata import build_attention_metadata
    from agent.kv_cache import KVCacheSpec, PagedKVCache

    dtype = next(stage.parameters()).dtype
    spec = KVCacheSpec(BLOCK_SIZE, arch.n_kv_heads, arch.head_dim, dtype)
    blocks = batch * spec.blocks_for_tokens(start_pos + n_new)
    kv = PagedKVCache(spec, stage.layer_range, blocks, setup.device)
    # Fill the cache: untouched zero pages all map to one physical page, which would make
    # reading a "full" cache look as cheap as reading the same few kilobytes again.
    for layer in stage.layer_range:
        kv.k[layer].fill_(0.01)
        kv.v[layer].fill_(0.01)
    rids = [f"r{i}" for i in range(batch)]
    meta = build_attention_metadata(kv, rids, [start_pos] * batch, [n_new] * batch,
                                    arch.window_of(stage.layer_range))
    hidden = torch.randn(batch * n_new, arch.hidden_size, dtype=dtype, device=setup.device)
    with torch.inference_mode():
        return _median_s(lambda: stage(hidden, meta, kv), setup)


def measure_grid(
    stage: Any,
    arch: ModelArch,
    kind: str,
    batches: list[int],
    contexts: list[int],
    prefill_batches: list[int],
    prefill_tokens: list[int],
    setup: ProfilingSetup,
) -> list[Measurement]:
    """Returns decode steps timed over batches x contexts and prefills over
    prefill_batches x prefill_tokens (seconds of all the stage's layers)."""
    n_layers = len(stage.layer_range)
    points = []
    for batch in batches:
        for context in contexts:
            s = time_forward(stage, arch, batch, context, 1, setup)
            points.append(Measurement(kind, "decode", batch, context, n_layers, s))
    for batch in prefill_batches:
        for n in prefill_tokens:
            s = time_forward(stage, arch, batch, 0, n, setup)
            points.append(Measurement(kind, "prefill", batch, n, n_layers, s))
    return points


def measure_overhead_s(setup: ProfilingSetup) -> float:
    """Returns the seconds per layer of a decode step through layers too small to cost
    anything but dispatch: the fixed per-layer overhead of this engine on this device."""
    from agent.model import LlamaStage

    tiny = ModelArch(
        "overhead-probe",
        n_layers=setup.layers + 2,
        hidden_size=64,
        ffn_size=64,
        n_heads=1,
        n_kv_heads=1,
        vocab_size=16,
        max_context=64,
    )
    stage = LlamaStage(tiny, 1, setup.layers + 1).to(device=setup.device, dtype=setup.torch_dtype)
    probe = dataclasses.replace(setup, repeats=max(5, setup.repeats))
    return time_forward(stage.eval(), tiny, 1, 16, 1, probe) / setup.layers


def measure_head_s(arch: ModelArch, rows: list[int], setup: ProfilingSetup) -> dict[int, float]:
    """Returns the seconds of the last stage's step beyond its layers for each row count: the
    final RMS norm, the logits in the layout the engine runs (agent/model.py, oneDNN-packed on
    CPU) and the greedy pick over them (random weights of the head's shape: timing does not
    depend on the values). A plain `x @ W` over an unpacked matrix is up to 3x slower at 4-16
    rows than what a worker runs."""
    import torch

    from agent.model import LlamaStage

    last = arch.n_layers
    torch.manual_seed(0)
    stage = LlamaStage(arch, last - 1, last).to(device=setup.device, dtype=setup.torch_dtype)
    stage.eval().settle_weights()
    out = {}
    with torch.inference_mode():
        for n in rows:
            x = torch.randn(n, arch.hidden_size, dtype=setup.torch_dtype, device=setup.device)

            def head(x: Any = x) -> Any:
                return torch.argmax(stage.logits(x), dim=-1)

            out[n] = _median_s(head, setup)
    return out


def _shared_worker(setup: ProfilingSetup, barrier: Any, results: Any, index: int) -> None:
    """One process of measure_shared_slowdown: times decode steps alone, then with the others."""
    import torch

    torch.set_num_threads(setup.threads)
    stage, arch, _ = build_stage(setup)
    barrier.wait()  # every stage built: the host is quiet
    alone = time_forward(stage, arch, 1, SHARED_CONTEXT, 1, setup) if index == 0 else None
    barrier.wait()  # the others wait (blocked, not computing) while the first times alone
    together = time_forward(stage, arch, 1, SHARED_CONTEXT, 1, setup)
    results.put((index, alone, together))


SHARED_CONTEXT = 512  # a decode step's weights and KV: the memory traffic that workers share
SHARED_STAGE_BYTES = 1 << 30


def measure_shared_slowdown(setup: ProfilingSetup, workers: int) -> float:
    """Returns how much slower a worker's decode step runs while `workers` workers step at
    once on this host (one process each, `setup.threads` threads): median together / alone.

    With no more busy threads than cores only the memory bus is shared; the planner turns this
    factor into the host's bandwidth (cost_models/host_sharing.py, bandwidth_from_slowdown).
    """
    import multiprocessing as mp

    if workers < 2:
        return 1.0
    from cost_models.memory import dtype_bytes_of, layer_weight_bytes
    from cost_models.model_catalog import get_model_arch

    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(workers), ctx.Queue()
    # Stream as many layers as a worker does (caches hold a few layers, not a stage), up to
    # SHARED_STAGE_BYTES of weights per process.
    try:
        arch = get_model_arch(setup.model)
    except KeyError:
        arch = build_stage(dataclasses.replace(setup, layers=1))[1]
    per_layer = layer_weight_bytes(arch, dtype_bytes_of(setup.dtype))
    layers = max(setup.layers, min(arch.n_layers - 2, int(SHARED_STAGE_BYTES // per_layer)))
    probe = dataclasses.replace(setup, layers=layers, random_weights=True, repeats=max(setup.repeats, 30))
    procs = [ctx.Process(target=_shared_worker, args=(probe, barrier, results, i)) for i in range(workers)]
    for p in procs:
        p.start()
    got = [results.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
    alone = next(a for i, a, _ in got if i == 0)
    together = statistics.median(t for _, _, t in got)
    return max(1.0, together / alone)


PIPELINE_PROMPT_TOKENS = 128
PIPELINE_OUTPUT_TOKENS = 48
PIPELINE_TRIES = 3  # timed runs per configuration; the fastest is kept


@dataclass(frozen=True)
class PipelineOverheads:
    """What a real pipeline's decode step costs beyond its layers and head, on this host."""

    return_s: float  # one stage: a step's receive, bookkeeping, result back to the engine
    hop_s: float  # each further stage: its receive, bookkeeping and the hop to it
    tpot_s: tuple[float, ...]  # measured time per output token with 1 and 2 stages
    context: int  # mean context of the timed steps
    shared_slowdown: float | None = None  # `replicas` streams at once over one alone
    replicas: int = 1


def _stream_tpot_s(
    model: str,
    pipelines: list[list[tuple[int, int, int]]],
    threads: int,
    streams: int = 1,
    tries: int = PIPELINE_TRIES,
) -> float:
    """Returns the median gap between the tokens of `streams` greedy streams at once through a
    real engine (agent/engine.py) of `pipelines` ((worker, start, end) stages) on CPU workers
    (the median over the streams of each one's median gap; the fastest of PIPELINE_TRIES)."""
    import asyncio

    from agent.engine import EngineConfig, PipelineEngine
    from agent.engine_api import SamplingParams

    n_workers = sum(len(p) for p in pipelines)
    engine = PipelineEngine(
        EngineConfig(model=model, n_devices=n_workers, pipelines=pipelines, threads_per_worker=threads)
    ).start()
    try:
        prompt = [1 + (7 * i) % 1000 for i in range(PIPELINE_PROMPT_TOKENS)]
        params = SamplingParams(max_tokens=PIPELINE_OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)

        async def stream(rid: str, params: SamplingParams) -> list[float]:
            times = []
            async for _ in engine.generate(rid, prompt, params):
                times.append(time.perf_counter())
            return times

        async def together(n: int, params: SamplingParams) -> list[list[float]]:
            return list(await asyncio.gather(*(stream(f"s{k}", params) for k in range(n))))

        asyncio.run(together(len(pipelines), replace(params, max_tokens=4)))  # warm every worker
        timed = [asyncio.run(together(streams, params)) for _ in range(max(1, tries))]
    finally:
        engine.stop()

    def gap_s(runs: list[list[float]]) -> float:  # decode steps only: from the second token on
        return statistics.median(
            statistics.median(b - a for a, b in zip(t[1:], t[2:], strict=False)) for t in runs
        )

    # other work on the host only ever slows a try down: the fastest is the engine's own
    return min(gap_s(runs) for runs in timed)


def measure_pipeline_overheads(
    model: str, n_layers: int, decode_layer_s: float, head_s: float, threads: int = 1,
    replicas: int = 1, tries: int = PIPELINE_TRIES,
) -> PipelineOverheads:
    """Returns the step overheads of a real pipeline serving `model` on CPU workers.

    One greedy stream (PIPELINE_PROMPT_TOKENS in, PIPELINE_OUTPUT_TOKENS out) through one stage
    and through two; with L = n_layers * decode_layer_s and H = head_s (this profile's own
    tables at batch 1 and the stream's mean context):

        return_s = TPOT(1 stage) - L - H       (the ring: engine -> stage -> engine)
        hop_s    = TPOT(2 stages) - TPOT(1)    (a stage more: one more receive and send)

    and, with `replicas` > 1, one stream on each of that many one-stage pipelines at once:
    shared_slowdown = their TPOT / TPOT(1 stage) (the memory bus, and the engine's own work
    waiting for a core, as serving meets them).
    """
    half = n_layers // 2
    one = _stream_tpot_s(model, [[(0, 0, n_layers)]], threads, tries=tries)
    two = _stream_tpot_s(model, [[(0, 0, half), (1, half, n_layers)]], threads, tries=tries)
    shared = None
    if replicas > 1:  # one stream on each of `replicas` one-stage pipelines at once
        pipes = [[(w, 0, n_layers)] for w in range(replicas)]
        together = _stream_tpot_s(model, pipes, threads, replicas, tries)
        shared = max(1.0, together / one)
    return PipelineOverheads(
        return_s=max(0.0, one - n_layers * decode_layer_s - head_s),
        hop_s=max(0.0, two - one),
        tpot_s=(one, two),
        context=PIPELINE_PROMPT_TOKENS + PIPELINE_OUTPUT_TOKENS // 2,
        shared_slowdown=shared,
        replicas=replicas,
    )


def _cpu_model_and_flags() -> tuple[str, list[str]]:
    """Returns (CPU model name, its vector extensions) from /proc/cpuinfo where there is one."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    name = value.strip()
                elif key in ("flags", "Features"):
                    flags |= set(value.split())
                if key == "" and name and flags:
                    break  # the first processor is enough
    except OSError:
        pass
    return name, [f for f in VECTOR_FLAGS if f in flags]


def host_description(device: str, threads: int) -> dict[str, Any]:
    """Returns what the figures were measured on: CPU model and vector extensions, threads,
    accelerator, torch version, total host memory."""
    import os

    import torch

    cpu, flags = _cpu_model_and_flags()
    accelerator = None
    if str(device).startswith("cuda"):
        accelerator = torch.cuda.get_device_name(torch.device(device))
    try:
        host_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        host_memory = None
    return {
        "cpu": cpu,
        "vector_extensions": flags,
        "cpus": os.cpu_count(),
        "threads": threads,
        "accelerator": accelerator,
        "torch": torch.__version__.split("+")[0],
        "host_memory_bytes": host_memory,
        "measured_at": time.strftime("%Y-%m-%d"),
    }


def device_memory_bytes(device: str) -> int | None:
    """Returns the accelerator's total memory, or None for a CPU worker (its share of host
    memory is a deployment choice, the catalog's figure, not something to measure)."""
    if not str(device).startswith("cuda"):
        return None
    import torch

    return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)


def setup_from_args(args: argparse.Namespace) -> ProfilingSetup:
    """Returns the setup of `pipeshift calibrate`'s arguments."""
    return ProfilingSetup(
        model=args.model,
        layers=args.layers,
        dtype=args.dtype,
        device=args.device,
        threads=args.threads,
        repeats=args.repeats,
        random_weights=args.random_weights,
    )
