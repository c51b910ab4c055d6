"""`pipeshift calibrate`: time real decoder layers, fit the roofline's efficiency factors.

Builds a stage of `--layers` real layers (agent/model.py) with the model's weights where they
are at hand (random ones otherwise: timing does not depend on the values), reserves a paged KV
cache holding `context` positions for each of `batch` sequences, times decode steps (and
prefills) over the grid, fits `Efficiency` for the device kind, prints predicted against
measured with the MAPE, and writes the JSON that `cost_models.latency.load_efficiencies` reads.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

DEFAULT_BATCHES = "1,2,4,8,16"
DEFAULT_CONTEXTS = "128,512,1024,2048,4096"
DEFAULT_PREFILLS = "32,128,512"
BLOCK_SIZE = 16


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "calibrate",
        help="time real layers on this device and fit the latency model's efficiency factors",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("--model", default="smollm2-135m", help="catalog name, .gguf file or HF dir")
    p.add_argument("--layers", type=int, default=4, help="decoder layers in the timed stage")
    p.add_argument("--batches", default=DEFAULT_BATCHES, help="decode batch sizes, comma-separated")
    p.add_argument("--contexts", default=DEFAULT_CONTEXTS, help="cached tokens per sequence")
    p.add_argument("--prefill-tokens", default=DEFAULT_PREFILLS, help="prompt lengths ('' skips)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median kept)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    p.add_argument("--kind", default=None, help="device kind (default: cpu, or what NVML finds)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one per worker)")
    p.add_argument("--random-weights", action="store_true", help="skip loading the weights")
    p.add_argument(
        "--fit-overhead",
        action="store_true",
        help="fit the per-layer overhead instead of measuring it on tiny layers",
    )
    p.add_argument("--out", default="calibration.json")
    p.set_defaults(func=run)


def _build_stage(args: argparse.Namespace, dtype: Any) -> tuple[Any, Any, str]:
    """Returns (stage, arch, where the weights came from) for layers [1, 1 + --layers)."""
    import torch

    from agent.model import LlamaStage
    from cost_models.model_catalog import get_model_arch

    source = None
    if not args.random_weights:
        from agent.loaders import load_stage_weights, resolve_model

        try:
            source = resolve_model(args.model)
        except (ValueError, FileNotFoundError):
            source = None  # a catalog-only model: time the same shapes with random weights
    arch = source.arch if source else get_model_arch(args.model)
    # Start at layer 1 so the stage neither embeds nor owns the head: layers only.
    start = 1 if arch.n_layers > args.layers + 1 else 0
    end = min(arch.n_layers - 1, start + args.layers) if start else args.layers
    if source is not None:
        weights = load_stage_weights(source, start, end, dtype)
        stage = LlamaStage.from_weights(arch, start, end, weights, args.device)
        origin = f"weights of {source.path}"
    else:
        torch.manual_seed(0)
        stage = LlamaStage(arch, start, end).to(device=args.device, dtype=dtype).eval()
        stage.settle_weights()  # the layout the engine runs on
        origin = "random weights (timing does not depend on the values)"
    return stage, arch, origin


def _time_step(stage: Any, arch: Any, batch: int, start_pos: int, n_new: int, args: Any) -> float:
    """Returns the median seconds of one forward of the stage's layers over a fresh cache."""
    import torch

    from agent.attention_metadata import build_attention_metadata
    from agent.kv_cache import KVCacheSpec, PagedKVCache

    dtype = next(stage.parameters()).dtype
    spec = KVCacheSpec(BLOCK_SIZE, arch.n_kv_heads, arch.head_dim, dtype)
    blocks = batch * spec.blocks_for_tokens(start_pos + n_new)
    kv = PagedKVCache(spec, stage.layer_range, blocks, args.device)
    # Fill the cache: untouched zero pages all map to one physical page, which would make
    # reading a "full" cache look as cheap as reading the same few kilobytes again.
    for layer in stage.layer_range:
        kv.k[layer].fill_(0.01)
        kv.v[layer].fill_(0.01)
    rids = [f"r{i}" for i in range(batch)]
    meta = build_attention_metadata(kv, rids, [start_pos] * batch, [n_new] * batch)
    if args.device != "cpu":
        meta = _to_device(meta, args.device)
    hidden = torch.randn(batch * n_new, arch.hidden_size, dtype=dtype, device=args.device)
    sync = torch.cuda.synchronize if str(args.device).startswith("cuda") else (lambda: None)
    times = []
    for i in range(args.repeats + 1):  # the first run warms caches and allocators
        sync()
        t0 = time.perf_counter()
        stage(hidden, meta, kv)
        sync()
        if i:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _to_device(meta: Any, device: str) -> Any:
    import dataclasses

    import torch

    def move(x: Any) -> Any:
        return x.to(device) if isinstance(x, torch.Tensor) else x

    spans = [
        dataclasses.replace(s, **{f: move(getattr(s, f)) for f in ("context_slots", "mask")})
        for s in meta.prefills
    ]
    fields = {
        f.name: move(getattr(meta, f.name))
        for f in dataclasses.fields(meta)
        if f.name != "prefills"
    }
    return dataclasses.replace(meta, prefills=spans, **fields)


def _measure_overhead_s(args: argparse.Namespace, dtype: Any) -> float:
    """Returns the seconds per layer of a decode step through layers too small to cost
    anything but dispatch: the fixed per-layer overhead of this engine on this device."""
    import torch

    from agent.model import LlamaStage
    from cost_models.model_catalog import ModelArch

    tiny = ModelArch(
        "overhead-probe",
        n_layers=args.layers + 2,
        hidden_size=64,
        ffn_size=64,
        n_heads=1,
        n_kv_heads=1,
        vocab_size=16,
        max_context=64,
    )
    stage = LlamaStage(tiny, 1, args.layers + 1).to(device=args.device, dtype=dtype).eval()
    probe = argparse.Namespace(**{**vars(args), "repeats": max(5, args.repeats)})
    with torch.inference_mode():
        return _time_step(stage, tiny, 1, 16, 1, probe) / args.layers


def _default_kind(device: str) -> str:
    """Returns the catalog kind of a torch device: cpu, or the GPU matched by its name.

    torch reports the same name NVML does, so pynvml is not needed here.
    """
    if device == "cpu":
        return "cpu"
    import torch

    from cost_models.discovery import match_nvml_name

    props = torch.cuda.get_device_properties(torch.device(device))
    kind, match = match_nvml_name(props.name, props.total_memory)
    if match == "assumed":
        print(f"{props.name} is not in the device catalog; calibrating it as {kind.name}")
    return kind.name


def run(args: argparse.Namespace) -> int:
    import torch

    from cost_models.calibration import Measurement, fit_efficiency, predict_s, save_calibration
    from cost_models.device_catalog import get_device_kind
    from cost_models.memory import dtype_bytes_of

    torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    dtype_bytes = dtype_bytes_of(args.dtype)
    kind = get_device_kind(args.kind or _default_kind(args.device))
    stage, arch, origin = _build_stage(args, dtype)
    n_layers = len(stage.layer_range)
    print(
        f"calibrating {kind.name}: {arch.name} layers [{stage.start}, {stage.end}), "
        f"{args.dtype}, {args.threads} thread(s), {origin}"
    )

    points = []
    for batch in _ints(args.batches):
        for context in _ints(args.contexts):
            s = _time_step(stage, arch, batch, context, 1, args)
            points.append(Measurement(kind.name, "decode", batch, context, n_layers, s))
    for n in _ints(args.prefill_tokens):
        s = _time_step(stage, arch, 1, 0, n, args)
        points.append(Measurement(kind.name, "prefill", 1, n, n_layers, s))

    overhead_s = None
    if not args.fit_overhead:
        overhead_s = _measure_overhead_s(args, dtype)
        print(f"per-layer overhead (tiny layers, batch 1): {overhead_s * 1e6:.0f} us")
    fit = fit_efficiency(arch, kind, points, dtype_bytes, overhead_s=overhead_s)
    print(
        f"{'phase':8} {'batch':>5} {'context':>7} {'measured ms':>12} {'predicted ms':>12} {'error':>7}"
    )
    for p in points:
        pred = predict_s(arch, kind, p, dtype_bytes, fit.efficiency)
        err = (pred - p.measured_s) / p.measured_s * 100
        print(
            f"{p.phase:8} {p.batch:5d} {p.context:7d} {p.measured_s * 1e3:12.3f} "
            f"{pred * 1e3:12.3f} {err:+6.1f}%"
        )
    eff = fit.efficiency
    print(
        f"fit: compute {eff.compute:.3f}, memory {eff.memory:.3f}, overhead "
        f"{eff.overhead_s * 1e6:.0f} us/layer; MAPE {fit.mape:.1f}% (max {fit.max_error_pct:.1f}%) "
        f"over {fit.n_points} points"
    )
    save_calibration(args.out, arch, {kind.name: fit}, dtype_bytes, points)
    print(f"wrote {args.out}")
    return 0
