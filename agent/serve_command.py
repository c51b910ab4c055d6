"""`pipeshift serve`: start N local workers, split the model over them, serve the OpenAI API."""

from __future__ import annotations

import argparse
import logging
import sys


def add_engine_arguments(parser: argparse.ArgumentParser, default_devices: int = 1) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="catalog name (smollm2-135m), a .gguf file, or a safetensors directory",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=default_devices,
        help="number of worker devices (local CPU worker processes)",
    )
    parser.add_argument(
        "--stages",
        default=None,
        help="layer ranges of the first pipeline, e.g. 0:10,10:20,20:30; "
        "default: split evenly over all devices; extra devices idle as spares",
    )
    parser.add_argument(
        "--kv-cache-mb", type=int, default=256, help="KV cache budget per stage (MiB)"
    )
    parser.add_argument("--block-size", type=int, default=16, help="KV cache block size (tokens)")
    parser.add_argument(
        "--threads-per-worker", type=int, default=1, help="torch threads per worker"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=32, help="requests per micro-batch, at most"
    )
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="micro-batches in flight (default: one per stage, at most one per free CPU core)",
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model split into pipeline stages (OpenAI API)"
    )
    add_engine_arguments(parser)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.set_defaults(func=run)


def engine_config_from_args(args):
    """Returns an EngineConfig, or raises ValueError naming the bad argument."""
    from agent.engine import EngineConfig
    from agent.stage_layout import parse_stages

    if args.devices < 1:
        raise ValueError(f"--devices must be at least 1, got {args.devices}")
    if args.micro_batches is not None and args.micro_batches < 1:
        raise ValueError(f"--micro-batches must be at least 1, got {args.micro_batches}")
    if args.kv_cache_mb < 1:
        raise ValueError(f"--kv-cache-mb must be at least 1, got {args.kv_cache_mb}")
    return EngineConfig(
        model=args.model,
        n_devices=args.devices,
        stages=parse_stages(args.stages) if args.stages else None,
        kv_cache_bytes=args.kv_cache_mb << 20,
        block_size=args.block_size,
        threads_per_worker=args.threads_per_worker,
        max_batch_size=args.max_batch_size,
    )


def start_engine(args):
    """Returns a started PipelineEngine; prints what it serves where."""
    from agent.engine import PipelineEngine

    engine = PipelineEngine(engine_config_from_args(args)).start()
    spares = args.devices - len(engine.stages)
    print(f"pipeshift: {engine.model_name} on {len(engine.stages)} stage(s)"
          + (f", {spares} spare device(s)" if spares else ""), flush=True)
    for s in engine.stages:
        print(f"  {s.describe()}: {s.weight_bytes / 2**20:.0f} MiB weights, "
              f"{s.num_blocks} KV blocks of {args.block_size} tokens", flush=True)
    return engine


def model_aliases(engine, requested: str) -> list[str]:
    from cost_models.model_catalog import load_model_catalog

    arch = load_model_catalog().get(engine.model_name.lower())
    return [requested, *(arch.aliases if arch else ())]


def run(args) -> int:
    from agent.gateway.app import create_app
    from agent.gateway.server import run_server

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        engine = start_engine(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"pipeshift serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        print(f"  OpenAI-compatible API at http://{args.host}:{args.port}/v1", flush=True)
        run_server(create_app(engine, aliases=model_aliases(engine, args.model)), args.host, args.port)
    finally:
        engine.stop()
    return 0
