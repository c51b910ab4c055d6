"""`pipeshift demo`: serve the real model on local workers and stream one completion through
the OpenAI-compatible API, as a client would see it."""

from __future__ import annotations

import json
import sys
import time
import urllib.request


def register(subparsers) -> None:
    from agent.serve_command import add_engine_arguments

    parser = subparsers.add_parser("demo", help="serve on local workers and stream one completion")
    add_engine_arguments(parser, default_devices=3)
    parser.add_argument(
        "--prompt", default="What is pipeline parallelism? Answer in two sentences."
    )
    parser.add_argument("--max-tokens", type=int, default=64)
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


def run(args) -> int:
    from agent.gateway.app import create_app
    from agent.gateway.server import ServerThread
    from agent.serve_command import model_aliases, start_engine

    try:
        engine = start_engine(args)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"pipeshift demo: error: {exc}", file=sys.stderr)
        return 2
    server = ServerThread(create_app(engine, aliases=model_aliases(engine, args.model))).start()
    try:
        print(f"  OpenAI-compatible API at {server.base_url}/v1\n\nuser: {args.prompt}\nassistant: ", end="", flush=True)
        t0 = time.monotonic()
        first = None
        n_chunks = 0
        finish = None
        for delta, finish_reason in stream_chat(server.base_url, args.model, args.prompt, args.max_tokens):
            if delta and first is None:
                first = time.monotonic() - t0
            n_chunks += bool(delta)
            finish = finish_reason or finish
            print(delta, end="", flush=True)
        total = time.monotonic() - t0
        print(f"\n\n[streamed {n_chunks} chunks; time to first token {1000 * (first or total):.0f} ms; "
              f"{total:.1f} s in all; finish_reason={finish}]")
    finally:
        server.stop()
        engine.stop()
    return 0
