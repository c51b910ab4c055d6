"""`pipeshift calibrate`: time real decoder layers, fit the roofline's efficiency factors.

Builds a stage of `--layers` real layers (agent/model.py) with the model's weights where they
are at hand (random ones otherwise: timing does not depend on the values), reserves a paged KV
cache holding `context` positions for each of `batch` sequences, times decode steps (and
prefills) over the grid (agent/profiling.py), fits `Efficiency` for the device kind
(cost_models/calibration.py), prints predicted against measured with the MAPE, and writes
  --out X.json: the JSON that `cost_models.latency.load_efficiencies` reads (fitted factors);
  --out X.yaml: a profile (cost_models/profile.py) - host, fitted factors, the measured
      per-layer grid and head times - that a spec's `profiles:` list references. On a CPU it
      also measures how much slower a worker steps while cores // threads workers step at
      once (host `shared_workers`, `shared_slowdown`) and, with the model's weights at hand,
      times greedy streams through real pipelines: 1 and 2 stages for what a step costs
      beyond its layers and head (`step`), and one stream on each of cores // threads
      one-stage pipelines at once for the slowdown (without weights: decode layers at once).
"""

from __future__ import annotations

import argparse
from typing import Any

DEFAULT_BATCHES = "1,2,4,8,16"
DEFAULT_CONTEXTS = "128,512,1024,2048,4096"
DEFAULT_PREFILLS = "32,128,512"


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
    p.add_argument("--prefill-batches", default="1", help="prompts per prefill, comma-separated")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median kept)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    p.add_argument("--kind", default=None, help="device kind (default: cpu, or what NVML finds)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (one per worker)")
    p.add_argument("--random-weights", action="store_true", help="skip loading the weights")
    p.add_argument(
        "--skip-pipeline",
        action="store_true",
        help="CPU: do not time a real 1- and 2-stage pipeline for the step's overheads",
    )
    p.add_argument(
        "--pipeline-tries",
        type=int,
        default=3,
        help="CPU: timed streams per real-pipeline figure; the fastest is kept",
    )
    p.add_argument(
        "--shared-workers",
        type=int,
        default=None,
        help="CPU: workers stepping at once to measure how they slow each other (at most 4 "
        "with a real pipeline; default: cores // threads; 0 or 1 skips)",
    )
    p.add_argument(
        "--fit-overhead",
        action="store_true",
        help="fit the per-layer overhead instead of measuring it on tiny layers",
    )
    p.add_argument(
        "--out",
        default="calibration.json",
        help="X.json: fitted factors; X.yaml / X.yml: a profile with the measured grid",
    )
    p.set_defaults(func=run)


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


def _with_pipeline_overheads(profile: Any, args: argparse.Namespace, arch: Any, workers: int) -> Any:
    """Returns the profile with a real pipeline's step overheads (`step`), its own tables
    giving the layers and head they are measured beyond (agent/profiling.py)."""
    import dataclasses

    from agent import profiling

    context = profiling.PIPELINE_PROMPT_TOKENS + profiling.PIPELINE_OUTPUT_TOKENS // 2
    layer_s = profile.decode.at(1, context)[0]
    head_s = profile.head.at(1, 1)[0]
    got = profiling.measure_pipeline_overheads(
        args.model, arch.n_layers, layer_s, head_s, threads=args.threads,
        replicas=min(workers, 4), tries=args.pipeline_tries,
    )
    print(
        f"real pipeline, one greedy stream: {got.tpot_s[0] * 1e3:.1f} ms/token on 1 stage, "
        f"{got.tpot_s[1] * 1e3:.1f} on 2; beyond layers and head: {got.return_s * 1e3:.2f} ms "
        f"per step, {got.hop_s * 1e3:.2f} ms per further stage"
    )
    host = dict(profile.host)
    if got.shared_slowdown is not None:
        host.update(shared_workers=got.replicas, shared_slowdown=round(got.shared_slowdown, 4))
        print(
            f"{got.replicas} one-stage pipelines streaming at once: each "
            f"{got.shared_slowdown:.3f}x slower (memory bus, engine waiting for a core)"
        )
    step = {
        "return_s": got.return_s,
        "hop_s": got.hop_s,
        "tpot_1_stage_s": got.tpot_s[0],
        "tpot_2_stages_s": got.tpot_s[1],
        "context": float(got.context),
    }
    return dataclasses.replace(profile, host=host, step=step)


def run(args: argparse.Namespace) -> int:
    import torch

    from agent import profiling
    from cost_models.calibration import fit_efficiency, predict_s, save_calibration
    from cost_models.device_catalog import get_device_kind
    from cost_models.memory import dtype_bytes_of

    setup = profiling.setup_from_args(args)
    torch.set_num_threads(args.threads)
    dtype_bytes = dtype_bytes_of(args.dtype)
    kind = get_device_kind(args.kind or _default_kind(args.device))
    stage, arch, origin = profiling.build_stage(setup)
    print(
        f"calibrating {kind.name}: {arch.name} layers [{stage.start}, {stage.end}), "
        f"{args.dtype}, {args.threads} thread(s), {origin}"
    )
    points = profiling.measure_grid(
        stage,
        arch,
        kind.name,
        _ints(args.batches),
        _ints(args.contexts),
        _ints(args.prefill_batches) if args.prefill_tokens.strip() else [],
        _ints(args.prefill_tokens),
        setup,
    )

    overhead_s = None
    if not args.fit_overhead:
        overhead_s = profiling.measure_overhead_s(setup)
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
    if args.out.endswith((".yaml", ".yml")):
        from cost_models.profile import profile_of_points, save_profile

        head = profiling.measure_head_s(arch, sorted(set(_ints(args.batches)) | {1}), setup)
        memory = profiling.device_memory_bytes(args.device)
        host = profiling.host_description(args.device, args.threads)
        workers = args.shared_workers
        if workers is None:
            import os

            workers = max(1, (os.cpu_count() or 1) // args.threads) if args.device == "cpu" else 1
        pipeline = args.device == "cpu" and origin.startswith("weights") and not args.skip_pipeline
        if workers > 1 and not pipeline:  # no real pipeline to time: decode layers at once
            slowdown = profiling.measure_shared_slowdown(setup, workers)
            host.update(shared_workers=workers, shared_slowdown=round(slowdown, 4))
            print(f"{workers} workers stepping at once: each {slowdown:.3f}x slower (memory bus)")
        profile = profile_of_points(
            kind=kind.name,
            model=arch.name,
            dtype=args.dtype,
            host=host,
            points=points,
            fit=fit,
            head_s=head,
            memory_bytes=memory,
            path=args.out,
            measured_overhead_s=overhead_s,
        )
        if pipeline:
            profile = _with_pipeline_overheads(profile, args, arch, workers)
        save_profile(args.out, profile)
        print(f"wrote profile {args.out} (decode and prefill per layer, head by rows)")
    else:
        save_calibration(args.out, arch, {kind.name: fit}, dtype_bytes, points)
        print(f"wrote {args.out}")
    return 0
