"""`pipeshift demo`: serve the real model on local workers, stream several requests through the
OpenAI-compatible API, re-split the pipeline live in the middle of them, and show what the
clients saw: the stall, and that every text equals the same request's text without a change."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request

from agent.stream_record import Stream

PROMPTS = [
    "What is pipeline parallelism? Answer in two sentences.",
    "Write a haiku about GPUs.",
    "Name three uses of a hash map.",
    "Why is the sky blue? One sentence.",
]


def register(subparsers) -> None:
    from agent.serve_command import add_engine_arguments

    parser = subparsers.add_parser(
        "demo", help="serve on local workers, stream requests and re-split the pipeline live"
    )
    add_engine_arguments(parser, default_devices=3)
    parser.add_argument("--to", default=None, metavar="STAGES",
                        help="the split to change to while the requests stream (default: the model's "
                             "layers in three even stages, 0:10,10:20,20:30 for SmolLM2)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.set_defaults(func=run)


def stream_chat(base_url: str, model: str, prompt: str, max_tokens: int):
    """Yields (text delta, finish_reason) from a streamed chat completion over HTTP."""
    body = json.dumps(
        {
            "model": model,
            "stream": True,
            "temperature": 0,
            "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": prompt}],
        }
    ).encode()
    request = urllib.request.Request(
        f"{base_url}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            choice = chunk["choices"][0]
            yield choice["delta"].get("content") or "", choice.get("finish_reason")


def stream_all(base_url: str, model: str, max_tokens: int, started: threading.Event | None = None) -> list[Stream]:
    records = [Stream(prompt_tokens=0) for _ in PROMPTS]

    def one(prompt: str, record: Stream) -> None:
        try:
            for delta, _ in stream_chat(base_url, model, prompt, max_tokens):
                if delta:
                    record.text += delta
                    record.times.append(time.monotonic())
                    if started is not None and all(len(r.times) >= 4 for r in records):
                        started.set()
        except Exception as exc:  # shown in the summary; the demo then fails
            record.error = str(exc)

    threads = [threading.Thread(target=one, args=(p, r)) for p, r in zip(PROMPTS, records, strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return records


def fill_default_splits(args) -> None:
    """Sets --stages and --to where they were left out, from the model's layer count: two even
    stages, then three (SmolLM2's 30 layers: 0:15,15:30, then 0:10,10:20,20:30). Raises
    ValueError for a model too shallow for three stages, naming the flags to give."""
    from agent.loaders import resolve_model
    from agent.stage_layout import even_split, format_stages

    if args.stages is not None and args.to is not None:
        return
    n_layers = resolve_model(args.model).arch.n_layers
    if n_layers < 3:
        raise ValueError(f"the model has {n_layers} layer(s), too few to change from 2 to 3 stages: "
                         "give --stages and --to yourself")
    if args.stages is None and args.plan is None:
        args.stages = format_stages(even_split(n_layers, 2))
    if args.to is None:
        args.to = format_stages(even_split(n_layers, 3))


def run(args) -> int:
    from agent.gateway.app import create_app
    from agent.gateway.server import ServerThread
    from agent.serve_command import model_aliases, start_engine
    from planner.admin_client import AdminClient
    from planner.apply_command import follow, summary
    from planner.configuration import ConfigurationError

    try:
        fill_default_splits(args)
        engine = start_engine(args)
    except (ValueError, KeyError, FileNotFoundError, ConfigurationError) as exc:
        print(f"pipeshift demo: error: {exc}", file=sys.stderr)
        return 2
    server = ServerThread(create_app(engine, aliases=model_aliases(engine, args.model))).start()
    admin = AdminClient(server.base_url)
    try:
        print(f"  OpenAI-compatible API at {server.base_url}/v1\n")
        print(f"Streaming {len(PROMPTS)} chat completions; once each has a few tokens, the split "
              f"changes to {args.to}.\n")
        started = threading.Event()
        result: list[Stream] = []
        streaming = threading.Thread(target=lambda: result.extend(
            stream_all(server.base_url, args.model, args.max_tokens, started)))
        streaming.start()
        if not started.wait(300):
            print("pipeshift demo: error: the requests did not start streaming", file=sys.stderr)
            return 1
        dry = admin.plan({"stages": args.to})
        print(dry["text"])
        begin = time.monotonic()
        record = follow(admin, admin.apply({"stages": args.to})["id"])
        end = time.monotonic()
        print(summary(record))
        streaming.join()
        if record["outcome"] != "applied" or any(r.error for r in result):
            print("pipeshift demo: error: " + (record["error"] or next(r.error for r in result if r.error)),
                  file=sys.stderr)
            return 1

        print("\nThe same requests again on the new split, with no change in the middle:")
        control = stream_all(server.base_url, args.model, args.max_tokens)
        print()
        same = 0
        for prompt, live, still in zip(PROMPTS, result, control, strict=True):
            equal = live.text == still.text
            same += equal
            stall = live.stall_s((begin, end))
            stall_text = "n/a" if stall is None else f"{1000 * stall:+.0f} ms"
            print(f"  {'=' if equal else '!'} {prompt[:40]:<40}  {len(live.times):>3} chunks, "
                  f"longest gap vs usual {stall_text}: {live.text[:40]!r}...")
        measured = record["measured"]
        print(f"\n{same}/{len(PROMPTS)} texts streamed through the change equal the run without it. "
              f"{measured['requests_moved']} request(s) were mid-stream at the switch and moved to the "
              f"new pipeline; the longest any waited there was {measured['stall_ms'] or 0:.1f} ms.")
        return 0 if same == len(PROMPTS) else 1
    finally:
        server.stop()
        engine.stop()
