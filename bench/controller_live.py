"""The live controller on the real CPU deployment: a trace segment whose mix shifts (short
prompts, then long ones, then a burst, then quiet again) replayed open-loop through the official `openai`
client against `pipeshift serve --controller auto`, and the same segment against the static
starting configuration (`--controller off`). Prints per phase and in all: requests, failures,
SLO goodput, TTFT/TPOT p50/p90, and the controller's decisions with their reasons; writes JSON.

    python -m bench.controller_live [--out bench/out/controller_live.json] [--scale 1.0] [--start-stages 0:15,15:30]

SmolLM2-135M on 3 CPU workers, starting from 0:15,15:30 with one spare (--start-stages). The SLOs are the
local example spec's (TTFT 5 s, TPOT 1 s); goodput counts the requests that met both, per
second of the segment.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from agent.stream_record import Stream
from bench.serve_process import ServeProcess
from bench.streaming_load import prompt_token_ids

TTFT_SLO_S, TPOT_SLO_S = 5.0, 1.0
# (name, seconds, requests per second, prompt tokens, output tokens)
PHASES = (
    ("short", 40.0, 0.4, 32, 32),
    ("long", 40.0, 0.25, 320, 32),
    ("burst", 40.0, 2.2, 48, 32),
    ("quiet", 40.0, 0.4, 32, 32),  # the burst is over: devices may go back
)
START_STAGES = "0:15,15:30"  # two of the three workers; --start-stages changes it
SERVE = ("--devices", "3", "--kv-cache-mb", "256", "--max-overhead", "0.25", "--max-batch-size", "8")
CONTROLLER = ("--controller-interval", "5", "--workload-window", "20", "--controller-dwell", "20",
              "--controller-horizon", "60")


@dataclass(kw_only=True)
class Request(Stream):
    """One request of the segment: when it is sent, and its stream (`started_s`: sent)."""

    phase: str
    at_s: float  # offset in the segment
    prompt: list[int]
    max_tokens: int

    @property
    def met_slo(self) -> bool:
        return (self.error is None and self.ttft_s is not None and self.ttft_s <= TTFT_SLO_S
                and (self.mean_tpot_s is None or self.mean_tpot_s <= TPOT_SLO_S))


def make_trace(tokenizer, scale: float, seed: int = 0) -> list[Request]:
    """Returns Poisson arrivals per phase, each phase's rate times `scale`."""
    rng = random.Random(seed)
    out, t0 = [], 0.0
    for name, seconds, rate, prompt, output in PHASES:
        t = t0
        while True:
            t += rng.expovariate(rate * scale)
            if t >= t0 + seconds:
                break
            n = max(8, int(rng.gauss(prompt, prompt * 0.1)))
            prompt_ids = prompt_token_ids(tokenizer, n, seed=len(out))
            out.append(Request(prompt_tokens=n, phase=name, at_s=t, prompt=prompt_ids, max_tokens=output))
        t0 += seconds
    return out


async def replay(base_url: str, trace: list[Request]) -> float:
    """Sends every request at its offset (open loop), streaming; returns the segment's start."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=1800)
    start = time.monotonic()

    async def one(r: Request) -> None:
        await asyncio.sleep(max(0.0, start + r.at_s - time.monotonic()))
        r.started_s = time.monotonic()
        try:
            stream = await client.completions.create(
                model="smollm2-135m", prompt=r.prompt, max_tokens=r.max_tokens, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    r.times.append(time.monotonic())
        except Exception as exc:
            r.error = f"{type(exc).__name__}: {exc}"

    try:
        await asyncio.gather(*(one(r) for r in trace))
    finally:
        await client.close()
    return start


def figures(requests: list[Request], seconds: float) -> dict:
    def pct(values: list[float], p: float) -> float | None:
        if not values:
            return None
        v = sorted(values)
        return round(v[min(len(v) - 1, max(0, round(p / 100 * len(v)) - 1))] * 1000, 1)

    ttft = [r.ttft_s for r in requests if r.ttft_s is not None]
    tpot = [r.mean_tpot_s for r in requests if r.mean_tpot_s is not None]
    return {
        "requests": len(requests), "failed": sum(r.error is not None for r in requests),
        "met_slo": sum(r.met_slo for r in requests),
        "goodput_rps": round(sum(r.met_slo for r in requests) / seconds, 4),
        "ttft_ms": {"p50": pct(ttft, 50), "p90": pct(ttft, 90)},
        "tpot_ms": {"p50": pct(tpot, 50), "p90": pct(tpot, 90)},
        "tpot_mean_ms": round(statistics.fmean(tpot) * 1000, 1) if tpot else None,
    }


def run(policy: str, tokenizer, scale: float, stages: str = START_STAGES) -> dict:
    from planner.admin_client import AdminClient

    trace = make_trace(tokenizer, scale)
    mode = ("--controller", "auto", *CONTROLLER) if policy == "auto" else ("--controller", "off")
    with ServeProcess(*SERVE, "--stages", stages, *mode) as server:
        began = time.time()
        asyncio.run(replay(server.base_url, trace))
        admin = AdminClient(server.base_url)
        controller = admin.controller()
        applies = admin._request("GET", "/admin/v1/applies")["data"]
        final = admin.deployment()
    total_s = sum(p[1] for p in PHASES)
    result = {
        "policy": policy,
        "all": figures(trace, total_s),
        "phases": {name: figures([r for r in trace if r.phase == name], seconds)
                   for name, seconds, *_ in PHASES},
        "decisions": [{"t_s": round(d["time"] - began, 1), "act": d["act"], "reason": d["reason"],
                       "target": d["target"], "apply_id": d["apply_id"], "error": d["error"],
                       "predicted": d["predicted"], "workload": d["workload"]}
                      for d in controller["decisions"]],
        "applies": [{"id": a["id"], "t_s": round(a["created_at"] - began, 1), "outcome": a["outcome"],
                     "stall_ms": a["measured"].get("stall_ms"), "total_s": a["measured"].get("total_s"),
                     "target": a["target"]} for a in applies],
        "final_configuration": final["configuration"],
        "workload_at_end": final.get("workload"),
    }
    return result


def device_seconds(result: dict, start_stages: str, total_s: float) -> float:
    """Returns the worker-seconds the configuration held over the segment's `total_s`: the
    start's workers until the first applied change, each applied target's after it."""
    held, at, out = len(start_stages.split(",")), 0.0, 0.0
    for a in result["applies"]:
        if a["outcome"] != "applied" or a["t_s"] >= total_s:
            continue
        out += held * (max(a["t_s"], 0.0) - at)
        at = max(a["t_s"], 0.0)
        held = sum(len(p["stages"]) for p in a["target"]["pipelines"])
    return out + held * (total_s - at)


def describe(config: dict) -> str:
    return "; ".join("[" + ",".join(f"{s['device']}:{s['start']}-{s['end']}" for s in p["stages"]) + "]"
                     for p in config["pipelines"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench/out/controller_live.json")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every phase's arrival rate")
    parser.add_argument("--start-stages", default=START_STAGES,
                        help=f"the starting configuration's stages on workers 0.. (default {START_STAGES}; "
                        "0:30 starts on one worker, two spare)")
    args = parser.parse_args()
    from agent.loaders import resolve_model
    from agent.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(resolve_model("smollm2-135m").path)
    results = {policy: run(policy, tokenizer, args.scale, args.start_stages) for policy in ("static", "auto")}
    print(f"{'policy':7} {'phase':6} {'reqs':>4} {'fail':>4} {'met':>4} {'goodput/s':>9} "
          f"{'TTFT p50':>9} {'TTFT p90':>9} {'TPOT p50':>9} {'TPOT p90':>9}")
    for policy, r in results.items():
        for phase, f in [*r["phases"].items(), ("all", r["all"])]:
            print(f"{policy:7} {phase:6} {f['requests']:>4} {f['failed']:>4} {f['met_slo']:>4} "
                  f"{f['goodput_rps']:>9.3f} {f['ttft_ms']['p50']!s:>9} {f['ttft_ms']['p90']!s:>9} "
                  f"{f['tpot_ms']['p50']!s:>9} {f['tpot_ms']['p90']!s:>9}")
    auto = results["auto"]
    print("\nauto: decisions that acted (t from the segment's start)")
    for d in auto["decisions"]:
        if d["act"]:
            print(f"  t={d['t_s']:6.1f} s -> {describe(d['target'])}: {d['reason']}"
                  + (f" [refused: {d['error']}]" if d["error"] else f" [{d['apply_id']}]"))
    print(f"  {sum(not d['act'] for d in auto['decisions'])} decisions kept the configuration")
    for a in auto["applies"]:
        print(f"  apply {a['id']} at t={a['t_s']} s: {a['outcome']}, stall {a['stall_ms']} ms, "
              f"{a['total_s'] and round(a['total_s'], 2)} s in all")
    total_s = sum(p[1] for p in PHASES)
    for r in results.values():
        r["device_seconds"] = round(device_seconds(r, args.start_stages, total_s), 1)
    print(f"  worker-seconds over the {total_s:g} s segment: auto {auto['device_seconds']}, "
          f"static {results['static']['device_seconds']}")
    applied = sum(a["outcome"] == "applied" for a in auto["applies"])
    ratio = auto["all"]["goodput_rps"] / max(results["static"]["all"]["goodput_rps"], 1e-9)
    print(f"\nauto reconfigured {applied} time(s); failed requests {auto['all']['failed']}; "
          f"goodput {auto['all']['goodput_rps']:.3f} vs static {results['static']['all']['goodput_rps']:.3f} "
          f"req/s ({ratio:.2f}x)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
