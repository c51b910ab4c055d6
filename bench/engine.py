"""Engine benchmark: model runtime vs transformers, pipeline throughput, transport, memory.

    python bench/engine.py [--threads 1] [--decode-steps 32] [--repeats 3] [--skip-runtime] [--skip-pipeline]
                           [--skip-constrained]

Prints tables and writes bench/out/engine.json. All timings on the real SmolLM2-135M (fp32).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent / "out"
# `python bench/engine.py` puts bench/ first on sys.path, where bench/planner.py would hide the
# planner package the engine imports: the checkout's root goes there instead.
if sys.path and Path(sys.path[0]).resolve() == OUT.parent:
    sys.path[0] = str(OUT.parent.parent)


def machine() -> str:
    cpu = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {mp.cpu_count()} cores, {platform.system()} {platform.machine()}, torch {torch.__version__}"


# ---- our runtime, in process ---------------------------------------------------------------
def ours_decode_and_prefill(source, batch: int, prompt_len: int, steps: int) -> dict[str, float]:
    from agent.attention_metadata import build_attention_metadata
    from agent.kv_cache import KVCacheSpec, PagedKVCache
    from agent.loaders import load_stage_weights
    from agent.model import LlamaStage

    arch = source.arch
    stage = LlamaStage.from_weights(arch, 0, arch.n_layers, load_stage_weights(source, 0, arch.n_layers))
    spec = KVCacheSpec(16, arch.n_kv_heads, arch.head_dim)
    kv = PagedKVCache(spec, range(arch.n_layers), spec.blocks_for_tokens(prompt_len + steps + 1) * batch)
    ids = [f"r{i}" for i in range(batch)]
    prompt = torch.randint(100, 40000, (batch * prompt_len,))
    t0 = time.perf_counter()
    meta = build_attention_metadata(kv, ids, [0] * batch, [prompt_len] * batch)
    hidden = stage(prompt, meta, kv)
    tokens = stage.logits(hidden[meta.last_rows]).argmax(-1)
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(steps):
        meta = build_attention_metadata(kv, ids, [prompt_len + step] * batch, [1] * batch)
        tokens = stage.logits(stage(tokens, meta, kv)[meta.last_rows]).argmax(-1)
    decode_s = time.perf_counter() - t0
    return {"prefill_tok_s": batch * prompt_len / prefill_s, "decode_tok_s": batch * steps / decode_s,
            "decode_step_ms": 1000 * decode_s / steps}


def transformers_decode_and_prefill(hf_model, batch: int, prompt_len: int, steps: int) -> dict[str, float]:
    ids = torch.randint(100, 40000, (batch, prompt_len))
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=2)
    with torch.no_grad():
        t0 = time.perf_counter()
        hf_model(ids, attention_mask=torch.ones_like(ids), use_cache=True)
        prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf_model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
        one_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        hf_model.generate(ids, max_new_tokens=steps + 1, min_new_tokens=steps + 1, **kwargs)
        all_s = time.perf_counter() - t0
    decode_s = all_s - one_s
    return {"prefill_tok_s": batch * prompt_len / prefill_s, "decode_tok_s": batch * steps / decode_s,
            "decode_step_ms": 1000 * decode_s / steps}


# ---- transport between two processes -------------------------------------------------------
def _echo(spec_json: dict, back_json: dict, rounds: int) -> None:
    from agent.transport import Channel, ChannelSpec

    torch.set_num_threads(1)
    inbound = Channel(ChannelSpec.from_json(spec_json), is_sender=False)
    outbound = Channel(ChannelSpec.from_json(back_json), is_sender=True)
    for _ in range(rounds):
        header, tensors = inbound.recv()
        outbound.send(header, tensors)


def transport_latency(shapes: dict[str, tuple[int, ...]], rounds: int = 200) -> dict[str, dict[str, float]]:
    """Returns one-way latency (half the median round trip) per message size, between two processes."""
    from agent.transport import Channel, ChannelStore

    store = ChannelStore()
    results = {}
    ctx = mp.get_context("spawn")
    for label, shape in shapes.items():
        there, back = store.spec(f"bench/{label}/there"), store.spec(f"bench/{label}/back")
        child = ctx.Process(target=_echo, args=(there.to_json(), back.to_json(), rounds + 10))
        child.start()
        out, inbound = Channel(there, True), Channel(back, False)
        payload = torch.randn(shape)
        samples = []
        for i in range(rounds + 10):
            t0 = time.perf_counter()
            out.send({"op": "step", "mb": i}, [payload])
            inbound.recv()
            if i >= 10:
                samples.append(time.perf_counter() - t0)
        child.join()
        one_way_ms = 1000 * statistics.median(samples) / 2
        nbytes = payload.numel() * 4
        results[label] = {"bytes": nbytes, "one_way_ms": one_way_ms,
                          "p90_one_way_ms": 1000 * sorted(samples)[int(0.9 * len(samples))] / 2,
                          "gb_s": nbytes / (one_way_ms / 1000) / 1e9}
    return results


# ---- the real engine: throughput and memory ------------------------------------------------
def engine_run(n_devices: int, n_requests: int, max_tokens: int) -> dict[str, float]:
    from agent.engine import EngineConfig, PipelineEngine
    from agent.engine_api import SamplingParams
    from agent.process_memory import memory_breakdown

    engine = PipelineEngine(EngineConfig(n_devices=n_devices, kv_cache_bytes=64 << 20)).start()
    try:
        prompts = [engine.encode_prompt(f"Request {i}: tell me about the number {i}.") for i in range(n_requests)]

        async def one(i: int) -> int:
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
            n = 0
            async for ev in engine.generate(f"bench{i}", prompts[i], params):
                n = ev.completion_tokens
            return n

        async def run_all() -> int:
            return sum(await asyncio.gather(*(one(i) for i in range(n_requests))))

        asyncio.run(one(0))  # warm up
        t0 = time.perf_counter()
        tokens = asyncio.run(run_all())
        elapsed = time.perf_counter() - t0
        memory = []
        for stage in engine.stages:
            m = memory_breakdown(engine.workers[stage.worker_id].pid)
            memory.append({"stage": stage.index, "layers": [stage.start, stage.end],
                           "weight_bytes": engine.worker_info[stage.worker_id].weight_bytes, **m})
        # The workers are forked from one fork server; its share of their common pages is
        # part of what the deployment costs, so the total counts it too.
        fork_server = memory_breakdown(parent_pid(engine.workers[0].pid))["pss_bytes"]
        total_pss = sum(m["pss_bytes"] for m in memory) + fork_server
        return {"devices": n_devices, "micro_batches": engine.micro_batches(), "tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
                "memory": memory, "fork_server_pss_bytes": fork_server, "total_pss_bytes": total_pss}
    finally:
        engine.stop()


# An answer that cannot be complete within the bench's max_tokens (at least 100 objects), so
# every request, constrained or not, generates exactly max_tokens tokens.
BENCH_SCHEMA = {
    "type": "array", "minItems": 100,
    "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 16},
                                               "id": {"type": "integer"}},
              "required": ["name", "id"], "additionalProperties": False},
}


def constrained_run(n_devices: int, batches: tuple[int, ...], max_tokens: int, repeats: int) -> list[dict]:
    """Returns decode throughput with and without a JSON schema (response_format) for each
    batch size: `batch` concurrent greedy requests of `max_tokens` tokens each on the real engine,
    the median of `repeats` runs, alternating plain and constrained."""
    from agent.constrained import json_schema_grammar
    from agent.engine import EngineConfig, PipelineEngine
    from agent.engine_api import SamplingParams

    grammar = json_schema_grammar(BENCH_SCHEMA)
    engine = PipelineEngine(EngineConfig(n_devices=n_devices, kv_cache_bytes=64 << 20)).start()
    try:
        prompt = engine.encode_chat([{"role": "user", "content": "List people with their ids as JSON."}])

        async def one(rid: str, constrained: bool) -> int:
            params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=not constrained,
                                    grammar=grammar if constrained else None)
            n = 0
            async for ev in engine.generate(rid, prompt, params):
                n = ev.completion_tokens
            return n

        def timed(batch: int, constrained: bool, tag: str) -> dict[str, float]:
            async def run_all() -> int:
                return sum(await asyncio.gather(*(one(f"{tag}-{i}", constrained) for i in range(batch))))
            t0 = time.perf_counter()
            tokens = asyncio.run(run_all())
            elapsed = time.perf_counter() - t0
            assert tokens == batch * max_tokens, (tokens, batch, max_tokens)
            return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}

        timed(1, True, "warm-json")  # the worker builds the grammar's tokenizer once
        timed(1, False, "warm-plain")
        rows = []
        for batch in batches:
            runs: dict[str, list[dict[str, float]]] = {"plain": [], "json_schema": []}
            for r in range(repeats):
                runs["plain"].append(timed(batch, False, f"plain-{batch}-{r}"))
                runs["json_schema"].append(timed(batch, True, f"json-{batch}-{r}"))
            rows.append({"devices": n_devices, "batch": batch, "max_tokens": max_tokens,
                         **{name: median_run(r) for name, r in runs.items()}})
        return rows
    finally:
        engine.stop()


def grammar_mask_cost(samples: int = 200) -> dict[str, float]:
    """Returns the last stage's per-row cost of a JSON schema: computing the grammar's mask after
    each token of a valid answer, and applying it to a row of logits (median ms)."""
    from agent.constrained import GrammarMatchers, json_schema_grammar
    from agent.loaders import resolve_model
    from agent.sampler import process_logits
    from agent.tokenizer import load_tokenizer

    source = resolve_model("smollm2-135m")
    tokenizer = load_tokenizer(source.format, source.path)
    matchers = GrammarMatchers()
    matchers.use_tokenizer(tokenizer)
    grammar = json_schema_grammar(BENCH_SCHEMA)
    answer = json.dumps([{"name": f"Person {i}", "id": 1000 + i} for i in range(100)])
    ids = tokenizer.encode(answer, add_special_tokens=False)[:samples]
    vocab = source.arch.vocab_size
    logits = torch.randn(vocab)
    mask_ms, apply_ms = [], []
    for k in range(len(ids)):
        t0 = time.perf_counter()
        allowed = matchers.allowed("bench", grammar, ids[:k], vocab)
        t1 = time.perf_counter()
        process_logits(logits, {}, allowed)
        t2 = time.perf_counter()
        mask_ms.append(1000 * (t1 - t0))
        apply_ms.append(1000 * (t2 - t1))
    return {"tokens": len(ids), "mask_ms_p50": statistics.median(mask_ms),
            "mask_ms_p90": statistics.quantiles(mask_ms, n=10)[-1], "apply_ms_p50": statistics.median(apply_ms)}


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """Returns the median of each figure over repeated runs."""
    return {key: statistics.median(r[key] for r in runs) for key in runs[0]}


def parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def runtime_comparison(source, args) -> list[dict]:
    """Returns (and prints) decode and prefill rates of our runtime and of transformers."""
    import transformers

    gguf = Path(source.path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    rows = []
    for batch in (1, 8):
        # Alternate the two, then keep each one's median run: the machine's noise hits both.
        runs: dict[str, list[dict[str, float]]] = {"ours": [], "transformers": []}
        for _ in range(args.repeats):
            runs["ours"].append(ours_decode_and_prefill(source, batch, args.prompt_len, args.decode_steps))
            runs["transformers"].append(transformers_decode_and_prefill(hf, batch, args.prompt_len, args.decode_steps))
        rows.append({"batch": batch, **{name: median_run(r) for name, r in runs.items()}})
    print(f"\nModel runtime, {args.threads} thread(s), prompt {args.prompt_len} tokens, "
          f"{args.decode_steps} decode steps, median of {args.repeats} runs")
    print(f"{'batch':>5} | {'decode tok/s ours':>17} | {'transformers':>12} | {'speed-up':>8} | "
          f"{'prefill tok/s ours':>18} | {'transformers':>12} | {'speed-up':>8}")
    for r in rows:
        o, t = r["ours"], r["transformers"]
        print(f"{r['batch']:>5} | {o['decode_tok_s']:>17.1f} | {t['decode_tok_s']:>12.1f} | "
              f"{o['decode_tok_s'] / t['decode_tok_s']:>7.2f}x | {o['prefill_tok_s']:>18.1f} | "
              f"{t['prefill_tok_s']:>12.1f} | {o['prefill_tok_s'] / t['prefill_tok_s']:>7.2f}x")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each runtime measurement")
    parser.add_argument("--skip-pipeline", action="store_true")
    parser.add_argument("--skip-runtime", action="store_true", help="skip the comparison with transformers")
    parser.add_argument("--skip-constrained", action="store_true",
                        help="skip the cost of response_format JSON schemas (constrained decoding)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from agent.loaders import resolve_model

    source = resolve_model("smollm2-135m")
    report: dict = {"machine": machine(), "threads": args.threads}

    if not args.skip_runtime:
        report["runtime"] = runtime_comparison(source, args)

    report["transport"] = transport_latency({"decode b8 hidden": (8, source.arch.hidden_size),
                                             "prefill 512 hidden": (512, source.arch.hidden_size)})
    print("\nPer-hop transport (gloo, two processes, loopback): one-way = half the median round trip")
    for label, t in report["transport"].items():
        print(f"  {label:<20} {t['bytes'] / 1024:>8.1f} KiB  {t['one_way_ms']:>7.3f} ms  "
              f"(p90 {t['p90_one_way_ms']:.3f} ms)  {t['gb_s']:.2f} GB/s")

    if not args.skip_pipeline:
        report["pipeline"] = [engine_run(n, n_requests=16, max_tokens=48) for n in (1, 2, 3)]
        one, three = report["pipeline"][0], report["pipeline"][-1]
        print("\nPipeline throughput, 16 concurrent requests x 48 tokens (greedy)")
        for r in report["pipeline"]:
            print(f"  {r['devices']} process(es), {r['micro_batches']} micro-batch(es) in flight: "
                  f"{r['tok_s']:.1f} tok/s ({r['tokens']} tokens in {r['seconds']:.1f} s)")
        print(f"  3 vs 1: {three['tok_s'] / one['tok_s']:.2f}x")
        print("\nResident memory per worker process (MiB): RSS counts shared libraries in every process; "
              "PSS splits them")
        for r in report["pipeline"]:
            for m in r["memory"]:
                print(f"  {r['devices']}-stage run, stage {m['stage']} layers {m['layers']}: "
                      f"weights {m['weight_bytes'] / 2**20:.0f}, RSS {m['rss_bytes'] / 2**20:.0f}, "
                      f"PSS {m['pss_bytes'] / 2**20:.0f}, private {m['uss_bytes'] / 2**20:.0f}")
        for r in (one, three):
            print(f"  {r['devices']}-stage deployment, PSS of workers + fork server: "
                  f"{r['total_pss_bytes'] / 2**20:.0f}")
        print(f"  3 stages / 1 full process: deployment PSS {three['total_pss_bytes'] / one['total_pss_bytes']:.2f}x")
        for key in ("pss_bytes", "uss_bytes", "rss_bytes", "weight_bytes"):
            ratio = sum(m[key] for m in three["memory"]) / sum(m[key] for m in one["memory"])
            print(f"  3 stages / 1 full process, workers' {key.split('_')[0].upper()}: {ratio:.2f}x")
    if not args.skip_constrained:
        report["constrained"] = constrained_run(1, (1, 8), max_tokens=args.decode_steps, repeats=args.repeats)
        report["grammar_mask"] = grammar_mask_cost()
        print(f"\nConstrained decoding (response_format json_schema, llguidance), 1 process, greedy, "
              f"{args.decode_steps} tokens per request, median of {args.repeats} runs")
        print(f"{'batch':>5} | {'plain tok/s':>11} | {'json_schema tok/s':>17} | {'ratio':>6}")
        for r in report["constrained"]:
            plain, constrained = r["plain"]["tok_s"], r["json_schema"]["tok_s"]
            print(f"{r['batch']:>5} | {plain:>11.1f} | {constrained:>17.1f} | {constrained / plain:>5.2f}x")
        g = report["grammar_mask"]
        print(f"  per constrained row on the last stage: mask {g['mask_ms_p50']:.3f} ms p50 "
              f"({g['mask_ms_p90']:.3f} ms p90), applying it {g['apply_ms_p50']:.3f} ms p50 "
              f"(over {g['tokens']} tokens of an answer)")
    OUT.mkdir(exist_ok=True)
    (OUT / "engine.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {OUT / 'engine.json'}")


if __name__ == "__main__":
    main()
