"""Live reconfiguration under load: what requests feel while the split changes, and what moves.

    python bench/reconfig.py [--contexts 128,1000,4000] [--repeats 3] [--clients 8]
                             [--skip-baselines] [--skip-full-budget]

For each context length a real `pipeshift serve` runs the real SmolLM2-135M on 5 CPU workers
under a closed loop of `--clients` streaming `openai` clients (each asks for a prompt of that
many tokens and 128 generated ones, again and again). Windows alternate: an apply of each
transition (2 -> 3 stages, 3 -> 2, a stage moved to a spare, a replica added, a replica
drained), then a control window of the same length with no apply. Per window and request:

    stall  = the largest gap between chunks inside the window - the median gap before it
    TPOT   = the mean gap inside the window;  TTFT of requests that started in it

Also: bytes moved against the plan's minimum, predicted against measured prefetch and stall,
one 2 -> 3 -> 2 with every worker's memory budget full, and the same transitions done the way
users do them today (stop admitting, drain, restart on the new split) and by dropping the KV
and recomputing it on the new split. Prints tables and writes bench/out/reconfig.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.serve_process import ServeProcess  # noqa: E402
from bench.streaming_load import Stream, prompt_token_ids  # noqa: E402
from planner.admin_client import AdminClient  # noqa: E402

OUT = ROOT / "bench" / "out"
MAX_TOKENS = 128
INITIAL = "0:15,15:30"


def machine() -> str:
    """Returns the CPU model, its vector extensions and the core count."""
    model, flags = "unknown CPU", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    import os

    vector = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f in flags]
    return f"{model} ({', '.join(vector) or 'no AVX2'}), {os.cpu_count()} cores"


# ---- load ------------------------------------------------------------------------------------
class ClosedLoop:
    """`clients` streaming clients, each sending one request after another, in a thread."""

    def __init__(self, base_url: str, prompts: list[list[int]], clients: int):
        self.base_url, self.prompts, self.clients = base_url, prompts, clients
        self.streams: list[Stream] = []
        self.paused = threading.Event()
        self.stopping = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> ClosedLoop:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._thread.join(600)

    def streaming(self) -> list[Stream]:
        return [s for s in self.streams if s.times and s.finish_reason is None and s.error is None]

    async def _run(self) -> None:
        import openai

        clients: dict[str, openai.AsyncOpenAI] = {}

        def client_now() -> openai.AsyncOpenAI:  # the restart baseline moves the server
            if self.base_url not in clients:
                clients[self.base_url] = openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key="unused",
                                                            max_retries=0, timeout=1800)
            return clients[self.base_url]

        async def one_client(c: int) -> None:
            n = 0
            while not self.stopping.is_set():
                if self.paused.is_set():
                    await asyncio.sleep(0.05)
                    continue
                prompt = self.prompts[(c + n * self.clients) % len(self.prompts)]
                n += 1
                stream = Stream(len(prompt), started_s=time.monotonic())
                self.streams.append(stream)
                try:
                    response = await client_now().completions.create(
                        model="smollm2-135m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                        extra_body={"ignore_eos": True},
                    )
                    async for chunk in response:
                        if chunk.choices and chunk.choices[0].text:
                            stream.text += chunk.choices[0].text
                            stream.times.append(time.monotonic())
                        if chunk.choices and chunk.choices[0].finish_reason:
                            stream.finish_reason = chunk.choices[0].finish_reason
                except Exception as exc:
                    stream.error = f"{type(exc).__name__}: {exc}"
                    await asyncio.sleep(0.5)

        await asyncio.gather(*(one_client(c) for c in range(self.clients)))
        for client in clients.values():
            await client.close()


# ---- windows ---------------------------------------------------------------------------------
@dataclass
class Window:
    kind: str  # a transition's name, "control", or a baseline's
    start: float
    end: float
    record: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def window_figures(window: Window, streams: list[Stream]) -> dict[str, Any]:
    """Returns the window's per-request stalls, TPOT and TTFT (ms)."""
    span = (window.start, window.end)
    stalls = [s for st in streams if (s := st.stall_s(span)) is not None]
    gaps = [g for st in streams for t, g in st.gaps() if span[0] <= t <= span[1]]
    ttfts = [st.ttft_s for st in streams if st.ttft_s is not None and span[0] <= st.started_s <= span[1]]
    return {
        "stalls_ms": [1000 * s for s in stalls],
        "tpot_ms": 1000 * statistics.fmean(gaps) if gaps else None,
        "ttft_ms": [1000 * t for t in ttfts],
        "errors": sum(1 for st in streams if st.error and st.started_s <= span[1]
                      and (not st.times or st.times[-1] >= span[0])),
    }


def summarize(windows: list[Window], streams: list[Stream]) -> dict[str, Any]:
    """Returns per kind: stall p50/p99, TPOT and TTFT means, and the applies' figures."""
    out: dict[str, Any] = {}
    for kind in dict.fromkeys(w.kind for w in windows):
        mine = [w for w in windows if w.kind == kind]
        figs = [window_figures(w, streams) for w in mine]
        stalls = [s for f in figs for s in f["stalls_ms"]]
        tpots = [f["tpot_ms"] for f in figs if f["tpot_ms"] is not None]
        ttfts = [t for f in figs for t in f["ttft_ms"]]
        entry: dict[str, Any] = {
            "windows": len(mine),
            "window_s": statistics.fmean(w.end - w.start for w in mine),
            "stall_p50_ms": percentile(stalls, 50),
            "stall_p99_ms": percentile(stalls, 99),
            "stall_samples": len(stalls),
            "tpot_ms": statistics.fmean(tpots) if tpots else None,
            "ttft_ms": statistics.fmean(ttfts) if ttfts else None,
            "errors": sum(f["errors"] for f in figs),
        }
        records = [w.record for w in mine if w.record]
        if records:
            def mean_of(path: tuple[str, str], records: list[dict[str, Any]] = records) -> float | None:
                vals = [r[path[0]][path[1]] for r in records if r[path[0]][path[1]] is not None]
                return statistics.fmean(vals) if vals else None

            entry |= {
                "outcomes": sorted({r["outcome"] for r in records}),
                "bytes_moved": mean_of(("measured", "bytes_moved")),
                "bytes_minimum": statistics.fmean(r["plan"]["prediction"]["minimum_bytes"] for r in records),
                "weight_bytes_moved": statistics.fmean(
                    next(p["bytes"] for p in r["phases"] if p["name"] == "prefetch") for r in records),
                "kv_bytes_planned": statistics.fmean(r["plan"]["prediction"]["kv_bytes"] for r in records),
                "requests_moved": statistics.fmean(r["measured"]["requests_moved"] for r in records),
                "prefetch_s": mean_of(("measured", "prefetch_s")),
                "prefetch_predicted_s": mean_of(("predicted", "prefetch_s")),
                "hold_ms": mean_of(("measured", "stall_ms")),
                "stall_predicted_ms": mean_of(("predicted", "stall_ms")),
                "apply_s": mean_of(("measured", "total_s")),
            }
        entry |= {k: v for w in mine for k, v in w.extra.items()}
        out[kind] = entry
    return out


# ---- one serving run -------------------------------------------------------------------------
def transitions(admin: AdminClient) -> list[tuple[str, dict[str, Any]]]:
    """Returns the cycle of targets, each computed from the deployment when its turn comes."""

    def stages_of(deployment: dict[str, Any]) -> list[list[dict[str, Any]]]:
        return [p["stages"] for p in deployment["configuration"]["pipelines"]]

    def spares(deployment: dict[str, Any]) -> list[str]:
        return [d["name"] for d in deployment["devices"] if d["state"] == "spare"]

    def move_to_spare(d):
        (p,) = stages_of(d)
        return {"target": {"pipelines": [{"stages": [p[0], {**p[1], "device": spares(d)[0]}]}]}}

    def add_replica(d):
        a, b = spares(d)[:2]
        replica = [{"device": a, "start": 0, "end": 15}, {"device": b, "start": 15, "end": 30}]
        return {"target": {"pipelines": [{"stages": stages_of(d)[0]}, {"stages": replica}]}}

    def drain_replica(d):
        return {"target": {"pipelines": [{"stages": stages_of(d)[0]}]}}

    return [
        ("2->3 stages", lambda d: {"stages": "0:10,10:20,20:30"}),
        ("3->2 stages", lambda d: {"stages": INITIAL}),
        ("stage to spare", move_to_spare),
        ("add replica", add_replica),
        ("drain replica", drain_replica),
    ]


def run_context(context: int, repeats: int, clients: int, prompts: list[list[int]], serve_args: list[str],
                kv: str = "copy", cycle: list[str] | None = None) -> dict[str, Any]:
    windows: list[Window] = []
    with ServeProcess("--devices", "5", "--stages", INITIAL, *serve_args) as server:
        admin = AdminClient(server.base_url)
        load = ClosedLoop(server.base_url, prompts, clients).start()
        deadline = time.monotonic() + 1800
        while len(load.streaming()) < clients and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2.0)  # gaps before the first window
        steps = [t for t in transitions(admin) if cycle is None or t[0] in cycle]
        for _ in range(repeats):
            for name, target_of in steps:
                begin = time.monotonic()
                started = admin.apply(target_of(admin.deployment()), kv=kv)
                record = admin.wait(started["id"])
                end = time.monotonic()
                windows.append(Window(name if kv == "copy" else f"{name} (recompute KV)", begin, end, record))
                print(f"  context {context}, {name} ({kv} KV): {record['outcome']} in {end - begin:.1f} s, "
                      f"hold {record['measured']['stall_ms']} ms, {record['measured']['requests_moved']} moved",
                      flush=True)
                time.sleep(end - begin)  # a control window as long as the apply, right after it
                windows.append(Window("control", end, end + (end - begin)))
        load.stop()
        rss = [d["rss_bytes"] for d in admin.deployment()["devices"]]
    result = summarize(windows, load.streams)
    result["_meta"] = {"context": context, "requests": len(load.streams),
                       "failed": sum(1 for s in load.streams if s.error), "worker_rss_bytes": rss}
    return result


def run_restart_baseline(context: int, clients: int, prompts: list[list[int]], serve_args: list[str]) -> dict[str, Any]:
    """Today's way: stop admitting, let running requests finish, restart on the new split."""
    downtimes, ttfts, drains = [], [], []
    load = None
    server = ServeProcess("--devices", "5", "--stages", INITIAL, *serve_args)
    try:
        load = ClosedLoop(server.base_url, prompts, clients)
        load.start()
        while len(load.streaming()) < clients:
            time.sleep(0.2)
        for target in ("0:10,10:20,20:30", INITIAL):
            begin = time.monotonic()
            load.paused.set()  # no new requests; wait for the running ones
            while load.streaming() or any(not s.times and s.error is None for s in load.streams[-clients:]):
                time.sleep(0.05)
            drained = time.monotonic()
            server.stop()
            server = ServeProcess("--devices", "5", "--stages", target, *serve_args)
            load.base_url = server.base_url
            load.paused.clear()
            while len(load.streaming()) < 1:
                time.sleep(0.05)
            first = min(s.times[0] for s in load.streams if s.times and s.started_s >= begin)
            downtimes.append(first - drained)
            drains.append(drained - begin)
            ttfts += [1000 * s.ttft_s for s in load.streams if s.ttft_s is not None and s.started_s >= begin][:clients]
    finally:
        if load is not None:
            load.stop()
        server.stop()
    return {"restart (stop, drain, restart)": {
        "drain_s": statistics.fmean(drains), "no_tokens_s": statistics.fmean(downtimes),
        "ttft_ms": statistics.fmean(ttfts) if ttfts else None, "windows": len(downtimes),
    }}


# ---- report ----------------------------------------------------------------------------------
def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if unit == "MiB":
        return f"{value / 2**20:.1f}"
    if isinstance(value, float):
        return f"{value:.1f}"
    return str(value)


def print_table(context: int, result: dict[str, Any]) -> None:
    control = result.get("control", {})
    print(f"\n== context {context} tokens: {result['_meta']['requests']} requests, "
          f"{result['_meta']['failed']} failed ==")
    head = (f"{'window':<28}{'stall p50':>10}{'p99':>8}{'TPOT':>8}{'TTFT':>9}{'MiB moved':>11}{'min':>8}"
            f"{'prefetch s':>11}{'pred':>6}{'hold ms':>8}{'pred':>6}")
    print(head)
    for kind, e in result.items():
        if kind.startswith("_"):
            continue
        print(f"{kind:<28}{fmt(e.get('stall_p50_ms')):>10}{fmt(e.get('stall_p99_ms')):>8}{fmt(e.get('tpot_ms')):>8}"
              f"{fmt(e.get('ttft_ms')):>9}{fmt(e.get('bytes_moved'), 'MiB'):>11}{fmt(e.get('bytes_minimum'), 'MiB'):>8}"
              f"{fmt(e.get('prefetch_s')):>11}{fmt(e.get('prefetch_predicted_s')):>6}{fmt(e.get('hold_ms')):>8}"
              f"{fmt(e.get('stall_predicted_ms')):>6}")
    restart = result.get("restart (stop, drain, restart)")
    if restart:
        print(f"restart baseline: drain {restart['drain_s']:.1f} s, then no token for {restart['no_tokens_s']:.1f} s "
              f"(new server start to first token), TTFT after {fmt(restart['ttft_ms'])} ms")
    if control.get("tpot_ms"):
        applies = [e for k, e in result.items() if not k.startswith("_") and e.get("outcomes")]
        worst = max((e["tpot_ms"] / control["tpot_ms"] - 1 for e in applies if e.get("tpot_ms")), default=None)
        if worst is not None:
            print(f"worst TPOT overhead in an apply window: {100 * worst:+.1f} % (control {control['tpot_ms']:.1f} ms)")


def markdown(report: dict[str, Any]) -> str:
    """Returns the report's tables in Markdown, for docs/results.md."""

    def ratio(e: dict[str, Any]) -> str:
        if not e.get("bytes_minimum"):
            return "-"
        return f"{e['bytes_moved'] / e['bytes_minimum']:.2f}x"

    out = []
    results = [(f"context {c} tokens", r) for c, r in report["contexts"].items()]
    if "full_budget" in report:
        results.append(("every worker's memory budget full (context "
                        f"{report['full_budget']['_meta']['context']})", report["full_budget"]))
    for title, result in results:
        meta, control = result["_meta"], result.get("control", {})
        out += [f"**{title}**: {meta['requests']} requests, {meta['failed']} failed", "",
                "| window | applies | stall p50 ms | stall p99 ms | TPOT ms (vs control) | MiB moved / minimum "
                "| prefetch s measured / predicted | longest hold ms / predicted stall ms |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for kind, e in result.items():
            if kind.startswith("_") or kind.startswith("restart"):
                continue
            tpot = fmt(e.get("tpot_ms"))
            if e.get("tpot_ms") and control.get("tpot_ms") and kind != "control":
                tpot += f" ({100 * (e['tpot_ms'] / control['tpot_ms'] - 1):+.0f} %)"
            moved = "-" if e.get("bytes_moved") is None else (
                f"{fmt(e['bytes_moved'], 'MiB')} / {fmt(e['bytes_minimum'], 'MiB')} ({ratio(e)})")
            prefetch = "-" if e.get("prefetch_s") is None else f"{fmt(e['prefetch_s'])} / {fmt(e['prefetch_predicted_s'])}"
            hold = "-" if e.get("hold_ms") is None else f"{fmt(e['hold_ms'])} / {fmt(e['stall_predicted_ms'])}"
            stall_p50 = fmt(e.get("stall_p50_ms")) + ("" if e.get("stall_samples") else " (no sample)")
            out.append(f"| {kind} | {e['windows']} | {stall_p50} | {fmt(e.get('stall_p99_ms'))} | {tpot} | {moved} "
                       f"| {prefetch} | {hold} |")
        restart = result.get("restart (stop, drain, restart)")
        if restart:
            out += ["", f"Stop, drain, restart (mean of {restart['windows']}): {restart['drain_s']:.1f} s draining "
                    f"(no new request admitted), then {restart['no_tokens_s']:.1f} s with no token at all until the "
                    f"new server's first; TTFT right after {fmt(restart['ttft_ms'])} ms."]
        out.append("")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contexts", default="128,1000,4000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--skip-full-budget", action="store_true")
    parser.add_argument("--only-full-budget", action="store_true", help="run only the memory-full transitions")
    parser.add_argument("--out", default=str(OUT / "reconfig.json"), help="where to write the JSON")
    parser.add_argument("--markdown", metavar="JSON", help="print the tables of an earlier run's JSON and exit")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return
    from agent.loaders import resolve_model
    from agent.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_gguf(resolve_model("smollm2-135m").path)
    report: dict[str, Any] = {"machine": machine(), "command": " ".join(sys.argv), "contexts": {}}
    print(f"machine: {report['machine']}")
    out = Path(args.out)
    for context in [] if args.only_full_budget else [int(c) for c in args.contexts.split(",")]:
        prompts = [prompt_token_ids(tokenizer, context, seed=s) for s in range(4 * args.clients)]
        # Room for every client's request on a 20-layer stage, with half again to spare.
        kv_mb = max(256, (context + MAX_TOKENS) * args.clients * 1536 * 20 * 3 // 2 // 2**20)
        serve_args = ["--kv-cache-mb", str(kv_mb)]
        result = run_context(context, args.repeats, args.clients, prompts, serve_args)
        if not args.skip_baselines:
            recompute = run_context(context, 1, args.clients, prompts, serve_args, kv="recompute",
                                    cycle=["2->3 stages", "3->2 stages"])
            result |= {k: v for k, v in recompute.items() if not k.startswith("_") and k != "control"}
            result |= run_restart_baseline(context, args.clients, prompts, serve_args)
        report["contexts"][str(context)] = result
        print_table(context, result)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2))
    if not args.skip_full_budget:
        context = int(args.contexts.split(",")[0])
        prompts = [prompt_token_ids(tokenizer, context, seed=s) for s in range(4 * args.clients)]
        # Every worker's budget full: weights of the largest stage plus a pool it fills.
        full = run_context(context, 1, args.clients, prompts,
                           ["--memory-budget", "400", "--kv-cache-mb", "4096"], cycle=["2->3 stages", "3->2 stages"])
        report["full_budget"] = full
        print_table(context, {**full, "_meta": full["_meta"]})
        print(f"worker RSS after (MiB): {[round(r / 2**20) for r in full['_meta']['worker_rss_bytes']]}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
