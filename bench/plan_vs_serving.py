"""The planner's predictions against the same configuration served for real: plan a spec,
`pipeshift serve --plan` the plan, stream requests through the official `openai` client, and
compare TPOT p50 and throughput.

    python bench/plan_vs_serving.py [--spec data/specs/local-cpu-smollm2.yaml] [--calibrate]
                                    [--duration-s 120] [--json bench/out/plan_vs_serving.json]

--calibrate first measures this machine's CPU worker (`pipeshift calibrate --out`, a small
grid) and plans the spec with that profile, so the prediction speaks of this CPU, not the
one the catalog's defaults were fitted on; a spec that references profiles keeps its own.

Two loads, each against its prediction:
  * the spec's rate: Poisson arrivals at `workload.request_rate_per_s` (as many as the rate
    times the duration, at random times), prompts and outputs of
    the spec's mean lengths; predicted by cost_models/load_point.py from the plan's stage
    costs at the batches the engine forms at that rate, on the shared host;
  * saturation: as many clients at once as the plan's micro-batches hold (in flight x batch),
    each sending its next request when the last ends: the planner's operating point, where
    its own predicted TPOT and throughput apply.
TPOT of a request is (last token - first token) / (tokens - 1); p50 over the requests that
start after the warm-up. Throughput is the tokens that arrive inside the measured window
over its length.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the checkout's packages before bench/planner.py

from agent.stream_record import Stream  # noqa: E402
from bench.serve_process import ServeProcess  # noqa: E402
from bench.streaming_load import prompt_token_ids  # noqa: E402


async def _one(client, prompt: list[int], max_tokens: int, out: list[Stream]) -> Stream:
    req = Stream(len(prompt), started_s=time.monotonic())
    out.append(req)
    try:
        stream = await client.completions.create(
            model="smollm2-135m", prompt=prompt, max_tokens=max_tokens, temperature=0,
            stream=True, extra_body={"ignore_eos": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                req.times.append(time.monotonic())
    except Exception as exc:  # reported in the table
        req.error = f"{type(exc).__name__}: {exc}"
    return req


async def open_loop(base_url: str, prompts, max_tokens: int, rate: float, duration_s: float,
                    seed: int) -> list[Stream]:
    """Poisson arrivals at `rate` for `duration_s`, conditioned on their count: exactly
    round(rate * duration_s) requests at uniformly random times (a Poisson process given its
    count), so the load offered is the spec's rate and not a draw around it; waits for every
    request to end."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=1800)
    rng = random.Random(seed)
    offsets = sorted(rng.uniform(0, duration_s) for _ in range(round(rate * duration_s)))
    out: list[Stream] = []
    tasks = []
    t0 = time.monotonic()
    for i, at in enumerate(offsets):
        await asyncio.sleep(max(0.0, t0 + at - time.monotonic()))
        tasks.append(asyncio.create_task(_one(client, prompts[i % len(prompts)], max_tokens, out)))
    await asyncio.gather(*tasks)
    await client.close()
    return out


async def closed_loop(base_url: str, prompts, max_tokens: int, clients: int,
                      duration_s: float) -> list[Stream]:
    """`clients` streams at once, each sending its next request when the last ends."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=1800)
    out: list[Stream] = []
    t_end = time.monotonic() + duration_s

    async def loop(k: int) -> None:
        j = 0
        while time.monotonic() < t_end:
            req = await _one(client, prompts[(k + j * clients) % len(prompts)], max_tokens, out)
            if req.error:  # a server that refuses would only be hammered
                return
            j += 1

    await asyncio.gather(*(loop(k) for k in range(clients)))
    await client.close()
    return out


def measured(requests: list[Stream], window: tuple[float, float]) -> dict:
    """Returns TPOT p50 / TTFT p50 of the requests started in the window, and tokens/s in it."""
    inside = [r for r in requests if window[0] <= r.started_s <= window[1] and not r.error]
    tpots = [r.mean_tpot_s for r in inside if r.mean_tpot_s is not None]
    ttfts = [r.ttft_s for r in inside if r.ttft_s is not None]
    tokens = sum(1 for r in requests for t in r.times if window[0] <= t <= window[1])
    return {
        "requests": len(inside),
        "errors": sum(1 for r in requests if r.error),
        "tpot_p50_ms": 1000 * statistics.median(tpots) if tpots else None,
        "ttft_p50_ms": 1000 * statistics.median(ttfts) if ttfts else None,
        "throughput_tok_s": tokens / (window[1] - window[0]),
    }


def predictions(spec, problem, result) -> dict:
    """Returns the planner's own figures and the load-point predictions for both loads."""
    from planner.load_prediction import predict_at_load

    load = predict_at_load(spec, problem, result)

    def point(p) -> dict:
        return {"tpot_ms": p.tpot_s * 1000, "throughput_tok_s": p.throughput_tok_s,
                "ttft_ms": p.ttft_s * 1000, "batch": p.batch_per_pipeline,
                "busy_workers": p.busy_workers, "contention": p.contention, "saturated": p.saturated}

    return {
        "planner": {"tpot_ms": result.tpot_s * 1000, "throughput_tok_s": result.throughput_tok_s,
                    "ttft_ms": result.ttft_s * 1000},
        "at_rate": point(load.at_rate),
        "at_saturation": {"clients": load.full_batch_clients, **point(load.at_full_batches)},
    }


def error_pct(predicted: float, measured_value: float | None) -> float | None:
    return None if not measured_value else 100 * (predicted - measured_value) / measured_value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default="data/specs/local-cpu-smollm2.yaml")
    parser.add_argument("--duration-s", type=float, default=120.0)
    parser.add_argument("--warmup-s", type=float, default=20.0)
    parser.add_argument("--saturation-s", type=float, default=90.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench/out/plan_vs_serving.json")
    parser.add_argument("--measured", help="a JSON this script wrote: predict again, serve nothing")
    parser.add_argument("--calibrate", action="store_true",
                        help="measure this CPU first and plan with the profile")
    args = parser.parse_args()
    from planner.build_problem import build_problem
    from planner.solve import plan
    from planner.spec import load_spec

    spec_path = Path(args.spec)
    if args.calibrate:
        spec_path = calibrated_spec(spec_path, Path(args.json).parent)
    spec = load_spec(spec_path)
    print(f"spec: {spec_path}; costs: {[k.cost_source.describe() for k in build_problem(spec).kinds]}")
    problem = build_problem(spec)
    result = plan(problem)
    if not result.pipelines:
        raise SystemExit(f"the spec does not plan on these costs: {result.status} {result.message}")
    predicted = predictions(spec, problem, result)
    split = [[(s.device, s.start, s.end) for s in p.stages] for p in result.pipelines]
    print(f"plan: {split}")
    print(json.dumps(predicted, indent=2))

    if args.measured:
        old = json.loads(Path(args.measured).read_text())
        at_rate, at_full = old["measured"]["at_rate"], old["measured"]["at_saturation"]
    else:
        at_rate, at_full = serve_and_measure(args, spec, problem, result, predicted)
    report(args, split, predicted, at_rate, at_full)


def calibrated_spec(spec_path: Path, out_dir: Path) -> Path:
    """Returns a copy of the spec that references a profile of this machine's CPU worker,
    measured now (`pipeshift calibrate --out`, batches 1-8, contexts 128-1024)."""
    import subprocess

    import yaml

    out_dir.mkdir(parents=True, exist_ok=True)
    profile = out_dir / "plan_vs_serving-cpu-profile.yaml"
    subprocess.run(
        [sys.executable, "-m", "planner.cli", "calibrate", "--batches", "1,2,4,8",
         "--contexts", "128,512,1024", "--prefill-tokens", "32,128,512", "--repeats", "3",
         "--out", str(profile)],
        check=True,
    )
    doc = yaml.safe_load(spec_path.read_text())
    if not doc.get("profiles"):
        doc["profiles"] = [profile.name]
    copy = out_dir / f"plan_vs_serving-{spec_path.name}"
    copy.write_text(yaml.safe_dump(doc, sort_keys=False))
    return copy


def serve_and_measure(args, spec, problem, result, predicted) -> tuple[dict, dict]:
    """Serves the plan for real and measures both loads."""
    from agent.loaders import resolve_model
    from agent.tokenizer import Tokenizer

    prompt, output = spec.lengths()
    tokenizer = Tokenizer.from_gguf(resolve_model("smollm2-135m").path)
    prompts = [prompt_token_ids(tokenizer, round(prompt.mean), seed=i) for i in range(64)]
    max_tokens = round(output.mean)
    with tempfile.TemporaryDirectory() as tmp:
        plan_file = Path(tmp) / "plan.json"
        plan_file.write_text(json.dumps(result.to_json()))
        devices = len({d.name for d in problem.devices})
        with ServeProcess("--devices", str(devices), "--plan", str(plan_file)) as server:
            t0 = time.monotonic()
            rate_reqs = asyncio.run(open_loop(server.base_url, prompts, max_tokens,
                                              spec.workload.request_rate_per_s, args.duration_s, args.seed))
            at_rate = measured(rate_reqs, (t0 + args.warmup_s, t0 + args.duration_s))
            clients = predicted["at_saturation"]["clients"]
            t1 = time.monotonic()
            full_reqs = asyncio.run(closed_loop(server.base_url, prompts, max_tokens, clients,
                                                args.saturation_s))
            at_full = measured(full_reqs, (t1 + args.warmup_s, t1 + args.saturation_s))
    return at_rate, at_full


def report(args, split, predicted, at_rate: dict, at_full: dict) -> None:
    """Prints the table and writes the JSON."""
    rows = [
        ("spec's rate: load-point model", predicted["at_rate"], at_rate),
        ("spec's rate: planner figures", predicted["planner"], at_rate),
        ("saturation: load-point model", predicted["at_saturation"], at_full),
        ("saturation: planner figures", predicted["planner"], at_full),
    ]
    print(f"\n{'load / prediction':34} {'TPOT p50 ms':>22} {'err %':>7} {'tok/s':>18} {'err %':>7}")
    table = []
    for name, pred, meas in rows:
        e_tpot = error_pct(pred["tpot_ms"], meas["tpot_p50_ms"])
        e_tput = error_pct(pred["throughput_tok_s"], meas["throughput_tok_s"])
        print(f"{name:34} {pred['tpot_ms']:9.1f} vs {meas['tpot_p50_ms'] or 0:9.1f} {e_tpot or 0:+7.1f} "
              f"{pred['throughput_tok_s']:7.1f} vs {meas['throughput_tok_s']:7.1f} {e_tput or 0:+7.1f}")
        table.append({"case": name, "predicted": pred, "measured": meas,
                      "tpot_error_pct": e_tpot, "throughput_error_pct": e_tput})
    import os
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    machine = {"cpu": cpu, "cores": os.cpu_count(), "load_average_1m_at_end": os.getloadavg()[0]}
    print(f"machine: {machine} (another load on the cores makes every figure slower)")
    out = {"spec": args.spec, "plan": split, "predicted": predicted, "machine": machine,
           "measured": {"at_rate": at_rate, "at_saturation": at_full}, "table": table}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
