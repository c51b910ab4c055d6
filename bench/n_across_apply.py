"""n > 1 across live applies: `pipeshift serve` on 3 CPU workers (SmolLM2-135M), one greedy
and one seeded sampled completion of n=2 streamed through the official `openai` client while
the deployment goes 3 -> 2 -> 3 stages. Each member's text must equal the same request's text
before any apply: the members' forked KV (shared prompt blocks) moves with them.

    python -m bench.n_across_apply [--max-tokens 150]

Prints each check and writes JSON to bench/out/n_across_apply.json; exits 1 on a mismatch.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import openai

from bench.serve_process import ServeProcess
from planner.admin_client import AdminClient

PROMPT = "Write a long story about a cat who travels the world, visiting many cities and"
TARGETS = ("0:15,15:30", "0:10,10:20,20:30")
KINDS = {"greedy": {"temperature": 0.0}, "sampled": {"temperature": 1.0, "seed": 5}}


def stream_members(client: openai.OpenAI, max_tokens: int, **sampling: float) -> list[str]:
    """Returns the two members' texts of one streamed n=2 completion, by choice index."""
    texts = ["", ""]
    for chunk in client.completions.create(model="smollm2-135m", prompt=PROMPT, n=2, max_tokens=max_tokens,
                                           stream=True, extra_body={"ignore_eos": True}, **sampling):
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    return texts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=150)
    args = parser.parse_args()
    with ServeProcess("--devices", "3", "--kv-cache-mb", "128") as server:
        client = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0, timeout=900)
        reference = {kind: stream_members(client, args.max_tokens, **s) for kind, s in KINDS.items()}
        moved: dict[str, list[str]] = {}
        threads = [threading.Thread(target=lambda k=kind, s=s: moved.__setitem__(k, stream_members(
            client, args.max_tokens, **s))) for kind, s in KINDS.items()]
        for thread in threads:
            thread.start()
        time.sleep(3.0)  # both requests are decoding
        admin = AdminClient(server.base_url)
        applies = []
        for stages in TARGETS:
            record = admin.wait(admin.apply({"stages": stages}, max_overhead=0.5)["id"])
            applies.append({"stages": stages, "outcome": record["outcome"],
                            "requests_moved": record["measured"]["requests_moved"]})  # 4: both members of both
        for thread in threads:
            thread.join()
    result = {
        "applies": applies,
        "greedy_members_equal": reference["greedy"][0] == reference["greedy"][1],
        "sampled_members_differ": reference["sampled"][0] != reference["sampled"][1],
        **{f"{kind}_unchanged": moved[kind] == reference[kind] for kind in KINDS},
    }
    for key, value in result.items():
        print(f"{key}: {value}")
    out = Path("bench/out")
    out.mkdir(exist_ok=True)
    (out / "n_across_apply.json").write_text(json.dumps(result, indent=2))
    ok = all(a["outcome"] == "applied" and a["requests_moved"] == 4 for a in applies) and all(
        v for k, v in result.items() if k != "applies")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
