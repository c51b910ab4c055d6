"""The timeline of one real apply, drawn from the store: `pipeshift serve` on 3 CPU workers
(SmolLM2-135M split 0:15,15:30), 6 clients streaming through the official `openai` client,
`pipeshift apply --stages 0:10,10:20,20:30` while they stream, then
`pipeshift show APPLY_ID --plot FILE` (the figure in the README and docs/results.md).

    python bench/apply_timeline.py [--out docs/apply-timeline.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

from bench.serve_process import ServeProcess
from bench.streaming_load import prompt_token_ids, stream_completions

PROMPT_TOKENS = (64, 128, 200, 256, 320, 400)
MAX_TOKENS = 220


def pipeshift(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "planner.cli", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"pipeshift {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}")
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/apply-timeline.png")
    parser.add_argument("--max-overhead", type=float, default=0.25)
    args = parser.parse_args()
    from agent.loaders import resolve_model
    from agent.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(resolve_model("smollm2-135m").path)
    prompts = [prompt_token_ids(tokenizer, n, seed=i) for i, n in enumerate(PROMPT_TOKENS)]
    with tempfile.TemporaryDirectory() as tmp, \
            mock.patch.dict(os.environ, {"PIPESHIFT_DATABASE_URL": f"sqlite:///{Path(tmp) / 'store.db'}"}):
        pipeshift("init")
        with ServeProcess("--devices", "3", "--stages", "0:15,15:30") as server:
            streams: list = []

            def stream() -> None:
                streams.extend(asyncio.run(stream_completions(server.base_url, prompts, MAX_TOKENS)))

            clients = threading.Thread(target=stream)
            clients.start()
            time.sleep(8.0)  # every client is decoding when the apply begins
            applied = pipeshift("apply", "--stages", "0:10,10:20,20:30", "--server", server.base_url,
                                "--auto-approve", "--max-overhead", str(args.max_overhead))
            print(applied.stdout)
            clients.join()
        failed = [s for s in streams if s.error or s.completion_tokens != MAX_TOKENS]
        print(f"{len(streams)} streams, {len(failed)} failed")
        (last,) = [e for e in json.loads(pipeshift("history", "--json").stdout) if e["type"] == "apply"]
        print(pipeshift("show", last["id"]).stdout)
        print(pipeshift("show", last["id"], "--plot", args.out).stdout)


if __name__ == "__main__":
    main()
