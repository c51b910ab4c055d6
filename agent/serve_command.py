"""`pipeshift serve`: start N local workers, split the model over them, serve the OpenAI API
(and, on this host, the admin API that reconfigures the deployment live)."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def add_engine_arguments(parser: argparse.ArgumentParser, default_devices: int | None = None) -> None:
    parser.add_argument(
        "--model",
        default="smollm2-135m",
        help="catalog name (smollm2-135m), a .gguf file, or a safetensors directory",
    )
    parser.add_argument(
        "--devices",
        type=int,
        default=default_devices,
        help="number of worker devices (local CPU worker processes); default: what --stages or "
        "--plan uses, else 1",
    )
    layout = parser.add_mutually_exclusive_group()
    layout.add_argument(
        "--stages",
        default=None,
        help="layer ranges of one pipeline, e.g. 0:10,10:20,20:30; "
        "default: split evenly over all devices; extra devices idle as spares",
    )
    layout.add_argument(
        "--plan",
        default=None,
        metavar="PLAN.json",
        help="start from a configuration: `pipeshift plan --json` output or "
        '{"pipelines": [{"stages": [{"device", "start", "end"}]}]}; its devices map to workers in order',
    )
    parser.add_argument(
        "--kv-cache-mb", type=int, default=256, help="most KV cache a worker holds (MiB)"
    )
    parser.add_argument(
        "--memory-budget",
        type=int,
        default=None,
        metavar="MIB",
        help="memory per worker for weights plus KV pool (MiB); a worker that gains layers shrinks "
        "its pool to stay inside it (default: an equal share of the memory this host has free)",
    )
    parser.add_argument("--block-size", type=int, default=16, help="KV cache block size (tokens)")
    parser.add_argument(
        "--threads-per-worker", type=int, default=1, help="torch threads per worker"
    )
    parser.add_argument(
        "--max-batch-size", type=int, default=32, help="requests per micro-batch, at most"
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, metavar="TOKENS",
        help="the most tokens (prompt and output) one request may have, as vLLM's option: a "
        "context shorter than the model's, so that requests reserve less KV (default: the model's)",
    )
    parser.add_argument(
        "--micro-batches",
        type=int,
        default=None,
        help="micro-batches in flight per pipeline (default: one per stage, at most one per free CPU core)",
    )
    parser.add_argument(
        "--max-overhead",
        type=float,
        default=0.05,
        help="share of serving time a live reconfiguration's background copies may take (default 0.05)",
    )


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve", help="serve a model split into pipeline stages (OpenAI API)"
    )
    add_engine_arguments(parser)
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        metavar="NAME",
        help="the model names the OpenAI API answers to, the first in every response (as vLLM's "
        "option); default: the model's own name, --model as given, and the catalog's aliases",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--admin-token",
        default=os.environ.get("PIPESHIFT_ADMIN_TOKEN"),
        help="let other hosts use the admin API with `Authorization: Bearer TOKEN` "
        "(default $PIPESHIFT_ADMIN_TOKEN; without one it answers this host only)",
    )
    parser.add_argument(
        "--max-devices",
        type=int,
        default=None,
        metavar="N",
        help="most devices (worker processes) `pipeshift device add` may grow this server to (default: no limit)",
    )
    parser.add_argument(
        "--planner-api",
        action="store_true",
        help="also serve the planner REST API (plans, applies, history over the store) under /planner; "
        "its mutations need PIPESHIFT_API_TOKEN unless it listens on this host only",
    )
    parser.add_argument(
        "--spec",
        default=None,
        metavar="SPEC.yaml",
        help="the spec the live controller plans from (its SLOs, cost model and `controller` mode); "
        "its devices stand for this server's workers. Default: the local CPU defaults",
    )
    parser.add_argument(
        "--controller",
        choices=("auto", "propose", "off"),
        default=None,
        help="follow the workload: auto applies re-plans that pay back, propose records them for "
        "`pipeshift apply`, off does neither (default: the spec's `controller`, else off)",
    )
    parser.add_argument("--controller-interval", type=float, default=15.0, metavar="SECONDS",
                        help="seconds between the controller's decisions (default 15)")
    parser.add_argument("--workload-window", type=float, default=60.0, metavar="SECONDS",
                        help="the workload monitor's sliding window (default 60 s)")
    parser.add_argument("--controller-dwell", type=float, default=None, metavar="SECONDS",
                        help="least time between applies (default: the decision rule's, 300 s)")
    parser.add_argument("--controller-horizon", type=float, default=None, metavar="SECONDS",
                        help="the payback horizon a change must repay within (default 600 s)")
    parser.add_argument("--controller-device-cost", type=float, default=None, metavar="RPS",
                        help="goodput (req/s) a device must add to be worth holding (default 0.5)")
    parser.add_argument("--controller-recompute", action="store_true",
                        help="let the controller's changes drop the KV of running requests that memory cannot "
                             "hold through them, to recompute it (default: only out of a configuration that loses "
                             "requests, below)")
    parser.add_argument("--controller-recompute-when-losing", type=float, default=None, metavar="SHARE",
                        help="where the serving configuration is predicted to lose more than this share of the "
                             "requests, the controller's changes may drop KV that does not fit (default 0.1; "
                             "1 never)")
    from planner.init_command import add_database_argument

    add_database_argument(parser)
    parser.set_defaults(func=run)


def controller_settings(args, spec):
    """Returns the controller's settings from the flags and the spec; raises ValueError."""
    from dataclasses import replace

    from agent.controller_runner import ControllerSettings
    from planner.controller import ControllerPolicy

    mode = args.controller or (spec.controller if spec is not None else "off")
    for flag in ("controller_interval", "workload_window", "controller_dwell", "controller_horizon"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be positive, got {value}")
    losing = getattr(args, "controller_recompute_when_losing", None)
    if losing is not None and not 0 <= losing <= 1:
        raise ValueError(f"--controller-recompute-when-losing is a share of the requests from 0 to 1 "
                         f"(1: never), got {losing}")
    changes = {"min_dwell_s": args.controller_dwell, "payback_horizon_s": args.controller_horizon,
               "device_cost_rps": args.controller_device_cost, "recompute_when_losing": losing}
    policy = replace(ControllerPolicy(), **{k: v for k, v in changes.items() if v is not None},
                     recompute_overflow=bool(getattr(args, "controller_recompute", False)))
    return ControllerSettings(mode=mode, interval_s=args.controller_interval, policy=policy)


def load_controller_spec(args):
    """Returns the --spec file's Spec (None without one); raises ValueError saying what is wrong."""
    if not args.spec:
        return None
    from planner.spec import SpecError, load_spec

    try:
        return load_spec(args.spec)
    except SpecError as exc:
        raise ValueError("\n".join(exc.lines)) from None
    except OSError as exc:
        raise ValueError(f"--spec {args.spec}: {exc.strerror}") from None


def start_controller(app, engine, args, spec, settings, store=None):
    """Sets the workload monitor's window and SLOs from the spec and starts the controller loop
    (agent/controller_runner.py) on the app; returns the runner."""
    from agent.controller_runner import ControllerRunner, default_spec
    from agent.workload_monitor import SloTargets
    from cost_models.model_catalog import get_model_arch

    monitor = app.state.workload_monitor
    if spec is None:
        model = None
        for name in (engine.model_name, args.model):
            try:
                model = get_model_arch(name).name
                break
            except KeyError:
                continue
        if model is not None:
            # the workers are this host's processes: they share its cores
            spec = default_spec(model, len(engine.worker_info), os.cpu_count() or 1,
                                args.threads_per_worker)
        elif settings.mode != "off":
            raise ValueError(
                f"--controller {settings.mode} plans with the model catalog, which has no "
                f"{engine.model_name!r}: give --spec naming a catalog model that stands for it, "
                "or serve with --controller off")
        # Otherwise (any GGUF or safetensors directory, controller off) nothing plans: the
        # monitor keeps its default SLOs, and the runner only answers GET /admin/v1/controller.
    if monitor is not None:
        monitor.window_s = args.workload_window
        if spec is not None:
            slo = spec.slo
            monitor.slo = SloTargets(None if slo.ttft_ms is None else slo.ttft_ms / 1000,
                                     None if slo.tpot_ms is None else slo.tpot_ms / 1000)
    runner = ControllerRunner(engine.reconfig, monitor, spec, settings, app.state.device_fleet, store)
    app.state.controller = runner
    metrics = getattr(app.state, "metrics", None)
    if metrics is not None and settings.mode != "off":
        metrics.watch_controller(runner)
    if settings.mode != "off":
        if monitor is None:
            raise ValueError("the controller needs the workload monitor, which this engine does not feed")
        runner.start()
        print(f"  controller: {settings.mode}, a decision every {settings.interval_s:g} s over a "
              f"{monitor.window_s:g} s window (GET /admin/v1/controller lists them)", flush=True)
    return runner


def load_plan_pipelines(path: str, n_devices: int | None) -> tuple[list[list[tuple[int, int, int]]], int]:
    """Returns the plan file's pipelines as (worker, start, end) stages and the devices it needs."""
    from planner.configuration import Configuration, read_json_file

    config = Configuration.from_json(read_json_file(path, f"--plan {path}"))
    n = len(config.devices())
    n_devices = n if n_devices is None else n_devices
    if n > n_devices:
        raise ValueError(f"--plan {path} uses {n} devices; --devices is {n_devices}")
    mapped = config.map_devices([f"worker-{i}" for i in range(n_devices)])
    return [[(int(s.device.removeprefix("worker-")), s.start, s.end) for s in p.stages] for p in mapped.pipelines], n_devices


def engine_config_from_args(args):
    """Returns an EngineConfig, or raises ValueError naming the bad argument."""
    from agent.engine import EngineConfig
    from agent.stage_layout import parse_stages

    devices = args.devices
    stages = pipelines = None
    if args.stages:
        stages = parse_stages(args.stages)
        devices = len(stages) if devices is None else devices
    elif getattr(args, "plan", None):
        pipelines, devices = load_plan_pipelines(args.plan, devices)
    devices = 1 if devices is None else devices
    if devices < 1:
        raise ValueError(f"--devices must be at least 1, got {devices}")
    max_devices = getattr(args, "max_devices", None)
    if max_devices is not None and max_devices < devices:
        raise ValueError(f"--max-devices {max_devices} is below the {devices} devices the server starts with")
    if args.micro_batches is not None and args.micro_batches < 1:
        raise ValueError(f"--micro-batches must be at least 1, got {args.micro_batches}")
    for option, value in (("--max-batch-size", args.max_batch_size), ("--block-size", args.block_size),
                          ("--threads-per-worker", args.threads_per_worker)):
        if value is not None and value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    if args.kv_cache_mb < 1:
        raise ValueError(f"--kv-cache-mb must be at least 1, got {args.kv_cache_mb}")
    if args.memory_budget is not None and args.memory_budget < 1:
        raise ValueError(f"--memory-budget must be at least 1 MiB, got {args.memory_budget}")
    if not 0 < args.max_overhead <= 1:
        raise ValueError(f"--max-overhead must be in (0, 1], got {args.max_overhead}")
    return EngineConfig(
        model=args.model,
        n_devices=devices,
        stages=stages,
        pipelines=pipelines,
        kv_cache_bytes=args.kv_cache_mb << 20,
        memory_budget_bytes=None if args.memory_budget is None else args.memory_budget << 20,
        block_size=args.block_size,
        threads_per_worker=args.threads_per_worker,
        max_batch_size=args.max_batch_size,
        max_model_len=getattr(args, "max_model_len", None),
        micro_batches=args.micro_batches,
        max_overhead=args.max_overhead,
    )


def start_engine(args):
    """Returns a started PipelineEngine; prints what it serves where."""
    from agent.engine import PipelineEngine

    engine = PipelineEngine(engine_config_from_args(args)).start()
    print_deployment(engine)
    return engine


def print_deployment(engine) -> None:
    serving = engine.serving_pipelines()
    used = {s.worker_id for p in serving for s in p.stages}
    spares = len(engine.worker_info) - len(used)
    print(f"pipeshift: {engine.model_name}, epoch {engine.epoch}: {len(serving)} pipeline(s), "
          f"{len(used)} stage(s)" + (f", {spares} spare device(s)" if spares else ""), flush=True)
    for i, p in enumerate(serving):
        for s in p.stages:
            info = engine.worker_info[s.worker_id]
            print(f"  pipeline {i}: worker-{s.worker_id} layers {s.start}-{s.end - 1}: "
                  f"{info.weight_bytes / 2**20:.0f} MiB weights, {info.num_blocks} KV blocks of "
                  f"{engine.config.block_size} tokens", flush=True)


def model_aliases(engine, requested: str) -> list[str]:
    from cost_models.model_catalog import load_model_catalog

    arch = load_model_catalog().get(engine.model_name.lower())
    return [requested, *(arch.aliases if arch else ())]


def run(args) -> int:
    from agent.launcher import start_fork_server

    # The workers' fork server imports torch while this process imports the gateway and
    # starts the engine, rather than after.
    start_fork_server(args.threads_per_worker)
    from agent.gateway.server import listening_socket

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        spec = load_controller_spec(args)
        settings = controller_settings(args, spec)
        # Bound before any worker starts: a port another process holds is said at once.
        sock = listening_socket(args.host, args.port)
    except ValueError as exc:
        print(f"pipeshift serve: error: {exc}", file=sys.stderr)
        return 2
    try:
        args.port = sock.getsockname()[1]  # the port chosen, with --port 0
        return serve(args, spec, settings, sock)
    finally:
        sock.close()


def serve(args, spec, settings, sock) -> int:
    from agent.gateway.app import create_app
    from agent.gateway.server import run_server
    from planner.configuration import ConfigurationError

    store = None
    if args.planner_api:
        store = open_planner_store(args)
        if store is None:
            return 2
    try:
        engine = start_engine(args)
    except (ValueError, KeyError, FileNotFoundError, ConfigurationError) as exc:
        print(f"pipeshift serve: error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        # a worker refused its stage (ControlError: e.g. a --memory-budget below its weights)
        # or exited while starting; the engine has stopped the others
        print(f"pipeshift serve: error: the workers could not start: {exc}", file=sys.stderr)
        return 1
    try:
        print(f"  OpenAI-compatible API at http://{args.host}:{args.port}/v1; admin API at "
              f"http://{args.host}:{args.port}/admin/v1"
              + ("" if args.admin_token else " (this host only)"), flush=True)
        app = create_app(engine, aliases=model_aliases(engine, args.model), admin_token=args.admin_token,
                         served_names=args.served_model_name or ())
        if getattr(app.state, "device_fleet", None) is not None:
            app.state.device_fleet.max_devices = args.max_devices
        if store is not None:
            mount_planner_api(app, store, args)
        try:
            runner = start_controller(app, engine, args, spec, settings, store)
        except ValueError as exc:
            print(f"pipeshift serve: error: {exc}", file=sys.stderr)
            return 2
        try:
            run_server(app, args.host, args.port, sock=sock)
        except ValueError as exc:  # another server started on the port meanwhile
            print(f"pipeshift serve: error: {exc}", file=sys.stderr)
            return 2
        finally:
            runner.stop()
    finally:
        engine.stop()
        if store is not None:
            store.close()
    return 0


def open_planner_store(args):
    """Returns the store for --planner-api, or None after saying why it cannot serve."""
    from planner.api.app import TOKEN_VARIABLE
    from planner.init_command import open_store_or_say
    from planner.planner_command import check_exposure

    refusal = check_exposure(args.host, os.environ.get(TOKEN_VARIABLE), "the planner API (--planner-api)")
    if refusal:
        print(f"pipeshift serve: error: {refusal}", file=sys.stderr)
        return None
    return open_store_or_say("serve", args.database_url)


def mount_planner_api(app, store, args) -> None:
    """Mounts the planner REST API at /planner, changing this very deployment."""
    from agent.gateway.server import is_loopback
    from planner.api import create_planner_app
    from planner.api.app import TOKEN_VARIABLE

    host = "127.0.0.1" if args.host in ("0.0.0.0", "::") or is_loopback(args.host) else args.host
    planner = create_planner_app(store, f"http://{host}:{args.port}", args.admin_token,
                                 os.environ.get(TOKEN_VARIABLE) or None)
    app.mount("/planner", planner)
    print(f"  planner API at http://{args.host}:{args.port}/planner/v1 (OpenAPI at /planner/openapi.json)",
          flush=True)
