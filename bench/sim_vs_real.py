"""The simulator against the real server: one segment of the Azure conversational trace, replayed
against `pipeshift serve` (SmolLM2-135M on CPU workers) and simulated with the calibrated CPU
costs; p50 and p90 TTFT and TPOT from both, and the relative error (goal: within 15 %).

    python bench/sim_vs_real.py [--requests 48] [--start-s 1200] [--rate 0.3]
        [--prompt-divisor 8] [--output-divisor 2] [--max-prompt 512] [--max-output 64] [--workers 2]
        [--batch 4] [--profile data/specs/profiles/cpu-amd-epyc-avx2.yaml] [--out FILE]

The segment: the first `--requests` requests of data/traces/AzureLLMInferenceTrace_conv.csv
from `--start-s` on; prompt lengths divided by `--prompt-divisor`, output lengths by
`--output-divisor`, clipped to [16, max-prompt] and [4, max-output] (a 2-core CPU cannot serve 1,000-token prompts at chat
rates); arrival gaps rescaled so the segment's mean rate is `--rate` requests/s (the order and
relative spacing of arrivals are the trace's). Every request streams through the official
`openai` client with greedy decoding and ignore_eos, so it produces exactly its output length.

The simulation: the same requests over the same configuration (`--workers` CPU workers, one
pipeline split evenly, `--batch` sequences per micro-batch), costed by the planner's cost
models from the measured profile (`pipeshift calibrate --out`), the workers sharing the host's
cores as the planner prices them (spec `nodes: cpu_cores`). Writes JSON (default
bench/out/sim_vs_real.json). The machine must be otherwise idle for figures worth quoting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from planner.simulator import simulate  # noqa: E402
from planner.spec import parse_spec  # noqa: E402
from planner.trace import Trace, load_trace  # noqa: E402

TRACE = ROOT / "data/traces/AzureLLMInferenceTrace_conv.csv"
PROFILE = ROOT / "data/specs/profiles/cpu-amd-epyc-avx2.yaml"
N_LAYERS = 30  # SmolLM2-135M


def segment(args: argparse.Namespace) -> Trace:
    """Returns the replayed requests: arrivals from 0 s, lengths scaled and clipped."""
    full = load_trace(TRACE)
    first = next(i for i, a in enumerate(full.arrival_s) if a >= args.start_s)
    idx = range(first, min(first + args.requests, len(full)))
    arrivals = [full.arrival_s[i] - full.arrival_s[first] for i in idx]
    span = arrivals[-1] or 1.0
    stretch = (len(arrivals) - 1) / args.rate / span  # mean rate becomes --rate
    return Trace(
        [a * stretch for a in arrivals],
        [min(args.max_prompt, max(16, round(full.prompt[i] / args.prompt_divisor))) for i in idx],
        [min(args.max_output, max(4, round(full.output[i] / args.output_divisor))) for i in idx],
    )


def stages(workers: int) -> list[tuple[int, int]]:
    cuts = [round(i * N_LAYERS / workers) for i in range(workers + 1)]
    return list(zip(cuts, cuts[1:], strict=False))


def sim_spec(args: argparse.Namespace, trace: Trace):
    profile = Path(args.profile).resolve()
    text = f"""
model: SmolLM2-135M
dtype: fp32
devices:
  - {{kind: cpu, count: {args.workers}, node: local}}
nodes:
  - {{name: local, nic_gbps: 10, cpu_cores: {os.cpu_count() or 2}, threads_per_worker: 1}}
profiles: [{profile}]
workload:
  request_rate_per_s: {args.rate}
  prompt_tokens: {{mean: {sum(trace.prompt) / len(trace):.1f}}}
  output_tokens: {{mean: {sum(trace.output) / len(trace):.1f}}}
  batch: {args.batch}
slo:
  ttft_ms: 60000
  tpot_ms: 10000
objective: max_throughput
"""
    return parse_spec(text, "sim-vs-real", str(ROOT / "data/specs"))


def percentiles(values: list[float]) -> dict[str, float]:
    import numpy as np

    q = np.percentile(np.asarray(values) * 1000, [50, 90])
    return {"p50": float(q[0]), "p90": float(q[1])}


async def replay(base_url: str, trace: Trace, tokenizer) -> list[dict[str, Any]]:
    """Streams every request at its arrival time; returns per request TTFT and TPOT (s)."""
    from bench.streaming_load import prompt_token_ids, stream_completions

    t0 = time.monotonic() + 1.0

    async def one(i: int) -> dict[str, Any]:
        await asyncio.sleep(max(0.0, t0 + trace.arrival_s[i] - time.monotonic()))
        ids = prompt_token_ids(tokenizer, trace.prompt[i], seed=i)
        (s,) = await stream_completions(base_url, [ids], max_tokens=trace.output[i])
        n = s.completion_tokens or len(s.times)
        tpot = (s.times[-1] - s.times[0]) / (n - 1) if n > 1 and len(s.times) > 1 else 0.0
        return {"ttft_s": s.ttft_s, "tpot_s": tpot, "tokens": n, "error": s.error}

    return await asyncio.gather(*(one(i) for i in range(len(trace))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--start-s", type=float, default=1200.0)
    ap.add_argument("--rate", type=float, default=0.3, help="mean requests/s of the replay")
    ap.add_argument("--prompt-divisor", type=float, default=8.0)
    ap.add_argument("--output-divisor", type=float, default=2.0)
    ap.add_argument("--max-prompt", type=int, default=512)
    ap.add_argument("--max-output", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4, help="sequences per micro-batch")
    ap.add_argument("--profile", default=str(PROFILE), help="`pipeshift calibrate --out` file")
    ap.add_argument("--sim-only", action="store_true", help="skip the real server")
    ap.add_argument("--out", default=str(ROOT / "bench/out/sim_vs_real.json"))
    args = ap.parse_args()

    trace = segment(args)
    spec = sim_spec(args, trace)
    names = [n for n, _, _ in spec.device_names()]
    config = [[(names[j], a, b) for j, (a, b) in enumerate(stages(args.workers))]]
    sim = simulate(spec, trace, "static", initial=config)
    report: dict[str, Any] = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "args": vars(args),
        "requests": len(trace),
        "duration_s": trace.duration_s,
        "prompt_mean": sum(trace.prompt) / len(trace),
        "output_mean": sum(trace.output) / len(trace),
        "sim": {"ttft_ms": sim.ttft_ms, "tpot_ms": sim.tpot_ms},
    }
    print(
        f"segment: {len(trace)} requests over {trace.duration_s:.0f} s, prompt mean "
        f"{report['prompt_mean']:.0f}, output mean {report['output_mean']:.0f} tokens; "
        f"{args.workers} CPU workers, stages {stages(args.workers)}, batch {args.batch}"
    )
    if not args.sim_only:
        from agent.loaders import resolve_model
        from agent.tokenizer import Tokenizer
        from bench.serve_process import ServeProcess

        tokenizer = Tokenizer.from_gguf(resolve_model("smollm2-135m").path)

        split = ",".join(f"{a}:{b}" for a, b in stages(args.workers))
        with ServeProcess(
            "--model",
            "smollm2-135m",
            "--devices",
            str(args.workers),
            "--stages",
            split,
            "--max-batch-size",
            str(args.batch),
            "--threads-per-worker",
            "1",
        ) as server:
            # one request alone first: how fast this machine serves right now (a busy machine
            # shows here, before the replay's figures are read)
            solo_trace = Trace([0.0], [128], [32])
            (solo,) = asyncio.run(replay(server.base_url, solo_trace, tokenizer))
            rows = asyncio.run(replay(server.base_url, trace, tokenizer))
        solo_sim = simulate(spec, solo_trace, "static", initial=config)
        report["solo_probe"] = {
            "prompt": 128,
            "output": 32,
            "real_ttft_ms": solo["ttft_s"] * 1000,
            "real_tpot_ms": solo["tpot_s"] * 1000,
            "sim_ttft_ms": solo_sim.ttft_ms["p50"],
            "sim_tpot_ms": solo_sim.tpot_ms["p50"],
        }
        p = report["solo_probe"]
        print(
            f"one request alone (128 + 32 tokens): TTFT real {p['real_ttft_ms']:.0f} ms, "
            f"simulated {p['sim_ttft_ms']:.0f} ms; TPOT real {p['real_tpot_ms']:.0f} ms, "
            f"simulated {p['sim_tpot_ms']:.0f} ms"
        )
        failed = [r for r in rows if r["error"]]
        ok = [r for r in rows if not r["error"]]
        real = {
            "ttft_ms": percentiles([r["ttft_s"] for r in ok]),
            "tpot_ms": percentiles([r["tpot_s"] for r in ok]),
            "failed": len(failed),
            "per_request": rows,
        }
        report["real"] = real
        report["relative_error"] = {
            f"{m}_{q}": (sim_q - real[m][q]) / real[m][q]
            for m in ("ttft_ms", "tpot_ms")
            for q in ("p50", "p90")
            for sim_q in [report["sim"][m][q]]
        }
    print("| figure | real | simulated | error |")
    print("| --- | --- | --- | --- |")
    for m in ("ttft_ms", "tpot_ms"):
        for q in ("p50", "p90"):
            s = report["sim"][m][q]
            if "real" in report:
                r = report["real"][m][q]
                e = report["relative_error"][f"{m}_{q}"]
                print(f"| {m[:4].upper()} {q} ms | {r:.0f} | {s:.0f} | {e:+.1%} |")
            else:
                print(f"| {m[:4].upper()} {q} ms | - | {s:.0f} | - |")
    if "real" in report and report["real"]["failed"]:
        print(f"failed requests: {report['real']['failed']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
